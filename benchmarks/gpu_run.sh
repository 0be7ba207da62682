#!/usr/bin/env bash
# One device call: GPU tests, kernel benchmark, end-to-end benchmarks. Logs go to $OUT.
# Usage (device machine): bash benchmarks/gpu_run.sh STEP... with STEP one of the names below
set -uo pipefail
export PYTHONPATH=. PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$OUT/gpu.txt"
for step in "$@"; do
  case $step in
    tests)   timeout 300 python -m pytest -q tests/gpu tests/kernels 2>&1 | tail -25 | tee "$OUT/tests.txt" ;;
    enginetests) timeout 200 python -m pytest -q tests/gpu/test_engine_gpu.py 2>&1 | tail -8 | tee "$OUT/tests.txt" ;;
    tpsmoke) timeout 90 python benchmarks/nccl_graph_check.py 2>&1 | tail -20 | tee "$OUT/nccl_graph_check.txt"
             PYTHONFAULTHANDLER=1 timeout 150 python benchmarks/tp_smoke.py --eager 2>&1 | grep -v Warning | tail -40 | tee "$OUT/tp_smoke_eager.txt"
             PYTHONFAULTHANDLER=1 timeout 150 python benchmarks/tp_smoke.py 2>&1 | grep -v Warning | tail -40 | tee "$OUT/tp_smoke_graphs.txt" ;;
    tp)      timeout 200 python -m pytest -q tests/gpu/test_tp_gpu.py 2>&1 | tail -8 | tee "$OUT/tests_tp.txt"
             timeout 200 python bench.py --quiet --tensor-parallel-size 2 --json "$OUT/bench.jsonl" 2>&1 | grep -v Warning | tee "$OUT/bench_tp2.txt" ;;
    kernels) timeout 240 python benchmarks/bench_kernels.py 2>&1 | tee "$OUT/kernels.txt" ;;
    bench)   timeout 300 python bench.py --quiet --json "$OUT/bench.jsonl" 2>&1 | grep -v Warning | tee "$OUT/bench.txt" ;;
    hf)      timeout 400 python bench.py --quiet --engine nanovllm hf --hf-time-limit ${HF_LIMIT:-120} --json "$OUT/bench.jsonl" 2>&1 | grep -v Warning | tee "$OUT/bench_hf.txt" ;;
    qwen2)   timeout 200 python bench.py --quiet --shape qwen2.5-0.5b --json "$OUT/bench.jsonl" 2>&1 | grep -v Warning | tee "$OUT/bench_qwen2.txt" ;;
    timeline) timeout 150 python benchmarks/step_timeline.py 2>&1 | grep -v Warning | tee "$OUT/timeline.txt"
              timeout 150 python benchmarks/step_timeline.py --shape qwen2.5-0.5b 2>&1 | grep -v Warning | tee "$OUT/timeline_qwen2.txt" ;;
    profile) timeout 200 python benchmarks/profile_step.py 1 2>&1 | tee "$OUT/profile1.txt"
             timeout 200 python benchmarks/profile_step.py 256 2>&1 | tee "$OUT/profile256.txt" ;;
    profile2) timeout 200 python benchmarks/profile_step.py 256 qwen2.5-0.5b 2>&1 | tee "$OUT/profile256_qwen2.txt" ;;
    sampler) timeout 120 python benchmarks/bench_sampler.py 2>&1 | tee "$OUT/sampler.txt" ;;
    instep)  timeout 150 python benchmarks/sampler_in_step.py 2>&1 | grep -v INFO | tee "$OUT/instep.txt" ;;
    sweep)   timeout 150 python benchmarks/bench_sampler.py --sweep 2>&1 | tee "$OUT/sweep.txt" ;;
    single)  timeout 120 python benchmarks/single_request.py 2>&1 | tee "$OUT/single.txt" ;;
    prefill) timeout 120 python benchmarks/prefill.py --profile 2>&1 | grep -v Warning | tee "$OUT/prefill.txt" ;;
    w4rows)  for r in 1 8; do timeout 60 python benchmarks/bench_w4a16.py --model smollm2-135m --rows 1 2 4 5 8 \
               --gemv-max-rows $r 2>&1 | tee -a "$OUT/w4rows.txt"; done ;;
    specstep) timeout 120 python benchmarks/spec_step_profile.py --shape smollm2-135m-gptq --top 15 2>&1 \
               | grep -v Warning | tee "$OUT/specstep.txt" ;;
  esac
done
