"""Decode latency: one request (or `--batch` copies of it), CUDA graphs, dummy weights. Per-token time =
(time for 1 + N tokens - time for 1 token) / N.

    python benchmarks/single_request.py                              # Qwen3-0.6B shape, 1,024-token prompt
    python benchmarks/single_request.py --shape llama-3.2-1b-gptq    # a 4-bit GPTQ model of Llama-3.2-1B's shape
    python benchmarks/single_request.py --shape llama-3.2-1b-gptq --batch 4 --gemv-max-rows 1
                                          # 4 copies decoded together; 4-bit GEMMs on tensor cores above 1 row
    python benchmarks/single_request.py --shape llama-3.2-1b-gptq --gluon-gemv-max-rows 0
                                          # the Triton GEMV where the Gluon one would run
    python benchmarks/single_request.py --shape llama-3.2-1b-gptq --batch 4 --gluon-mma-rows 0 0
                                          # the Triton kernels where the Gluon tensor-core one would run
    python benchmarks/single_request.py --shape llama-3.2-1b-gptq --half-unpack-max-rows 4
                                          # the 4-bit GEMV unpacking through float16
"""
import argparse
import json
import random
import time

from nanovllm import LLM, SamplingParams
from nanovllm.kernels import w4a16_gemm
from nanovllm.models.shapes import SHAPES, shape_checkpoint_dir

p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
p.add_argument("--shape", default="qwen3-0.6b", choices=list(SHAPES))
p.add_argument("--prompt-tokens", type=int, default=1024)
p.add_argument("--new-tokens", type=int, default=256)
p.add_argument("--kv-cache-dtype", default="auto")
p.add_argument("--quantization", default=None)
p.add_argument("--batch", type=int, default=1, help="copies of the request decoded together")
p.add_argument("--gemv-max-rows", type=int, default=None,
               help="4-bit weights: rows up to which the CUDA-core kernel runs (default: w4a16_gemm.GEMV_MAX_ROWS)")
p.add_argument("--gluon-gemv-max-rows", type=int, default=None,
               help="4-bit weights: rows up to which the Gluon GEMV runs (0: never; at most 2)")
p.add_argument("--gluon-mma-rows", type=int, nargs=2, default=None, metavar=("LOW", "HIGH"),
               help="4-bit weights: rows for which the Gluon tensor-core kernel runs (0 0: never)")
p.add_argument("--half-unpack-max-rows", type=int, default=None,
               help="4-bit weights: rows up to which the CUDA-core kernel unpacks through float16")
p.add_argument("--gemv-config", type=json.loads, default={},
               help='4-bit weights: settings of the CUDA-core kernel, as JSON (e.g. \'{"split_per_sm": 4}\'; '
                    'default: w4a16_gemm.GEMV_CONFIG)')
p.add_argument("--gluon-gemv-config", type=json.loads, default={},
               help="4-bit weights: settings of the Gluon GEMV, as JSON (default: w4a16_gemv.GLUON_GEMV_CONFIG)")
p.add_argument("--gluon-mma-config", type=json.loads, default={},
               help="4-bit weights: settings of the Gluon tensor-core kernel, as JSON (default: "
                    "w4a16_mma.GLUON_MMA_CONFIG)")
args = p.parse_args()
w4a16_gemm.GEMV_CONFIG.update(args.gemv_config)
w4a16_gemm.w4a16_gemv.GLUON_GEMV_CONFIG.update(args.gluon_gemv_config)
w4a16_gemm.w4a16_mma.GLUON_MMA_CONFIG.update(args.gluon_mma_config)
if args.gemv_max_rows is not None:
    w4a16_gemm.set_gemv_max_rows(args.gemv_max_rows)
if args.half_unpack_max_rows is not None:
    w4a16_gemm.set_half_unpack_max_rows(args.half_unpack_max_rows)
if args.gluon_gemv_max_rows is not None:
    w4a16_gemm.w4a16_gemv.set_gluon_gemv_max_rows(args.gluon_gemv_max_rows)
if args.gluon_mma_rows is not None:
    w4a16_gemm.w4a16_mma.set_gluon_mma_rows(*args.gluon_mma_rows)

start = time.perf_counter()
llm = LLM(shape_checkpoint_dir(args.shape), load_format="dummy", max_model_len=4096, enable_prefix_caching=False,
          kv_cache_dtype=args.kv_cache_dtype, quantization=args.quantization)
print(f"start-up (dummy weights, warm-up, KV cache, graph capture): {time.perf_counter() - start:.1f} s")
prompt = [random.Random(0).randint(0, 10000) for _ in range(args.prompt_tokens)]
N = args.new_tokens


def timed(max_tokens: int) -> float:
    start = time.perf_counter()
    llm.generate([prompt] * args.batch, SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True), use_tqdm=False)
    return time.perf_counter() - start


timed(N + 1)                                  # warm-up
prefill = min(timed(1) for _ in range(3))
total = min(timed(N + 1) for _ in range(3))
print(f"{args.shape} (quantization {args.quantization}, KV cache {args.kv_cache_dtype}): batch-{args.batch} decode at "
      f"~{args.prompt_tokens + N // 2:,}-token context: {1000 * (total - prefill) / N:.3f} ms/token "
      f"(prefill of {args.prompt_tokens:,} tokens: {1000 * prefill:.1f} ms)")
