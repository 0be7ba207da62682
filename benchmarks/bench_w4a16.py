"""The W4A16 GEMM (nanovllm/kernels/w4a16_gemm.py) at decode batch sizes: its memory bandwidth on
the packed weights, beside torch's bf16 matmul of the same layer.

    python benchmarks/bench_w4a16.py            # Llama-3.2-1B's four linears, 1-16 rows, group 128
    python benchmarks/bench_w4a16.py --sweep    # also try a grid of kernel settings (~2-3 minutes)
    python benchmarks/bench_w4a16.py --sweep --rows 1 4         # the sweep at these row counts only
    python benchmarks/bench_w4a16.py --half-unpack-max-rows 4   # the GEMV's float16 unpacking up to 4 rows
    python benchmarks/bench_w4a16.py --gluon-gemv-max-rows 0    # the Triton GEMV where the Gluon one would run
    python benchmarks/bench_w4a16.py --gluon-mma-rows 0 0       # the Triton kernels at 2-32 rows too
    python benchmarks/bench_w4a16.py --gluon-mma-config '{"T": 1}'    # its programs 64 columns wide
    python benchmarks/bench_w4a16.py --model llama-3.1-8b       # an 8B model's larger linears
    python benchmarks/bench_w4a16.py --model smollm2-135m --rows 1 5
                                                # the demo model's linears (group 32, as its Q4_1 GGUF);
                                                # 5 rows: a verifying step of k = 4 proposals

Bytes counted: the packed int32 weights, the scales and mins, the activations in and out. Each
time is triton.testing.do_bench_cudagraph's median (launches replayed from a CUDA graph, as the
engine's decode steps are). The launches take turns over enough copies of the layer's weights to
fill the L2 cache four times over, so each reads its weights from HBM, as a decode step's layers
do: with one copy, a layer smaller than the L2 (an H100's is 50 MB) was read from what the last
replay left there. The bandwidth is set against a device-to-device copy measured here.
Every setting's output is first checked against dequantize-then-matmul; a wrong one is reported
and left out.

The sweep's summary prints the defaults to set in w4a16_gemm.py: GEMV_MAX_ROWS, GEMV_CONFIG, and
the first entry of DOT_CONFIGS (the tensor-core kernel's settings for up to 16 rows), each chosen
by the least total time over the four layers (a decode step runs each once per transformer block).
"""
import argparse
import itertools
import json
import time

import torch
import triton

from nanovllm.kernels import w4a16_gemm as kernel_module
from nanovllm.kernels.w4a16_gemm import w4a16_gemm
from nanovllm.quantization.int_linear import dequantize

from bench_kernels import copy_bandwidth     # benchmarks/, this script's folder

# Each model's linears, (name, N output features, K input features), and group size
MODELS = {
    "llama-3.2-1b": ([("qkv_proj", 3072, 2048), ("o_proj", 2048, 2048), ("gate_up_proj", 16384, 2048),
                      ("down_proj", 2048, 8192)], 128),
    # Llama-3.1-8B's: large enough that a launch's fixed cost (a few us) no longer hides the bandwidth
    "llama-3.1-8b": ([("qkv_proj", 6144, 4096), ("o_proj", 4096, 4096), ("gate_up_proj", 28672, 4096),
                      ("down_proj", 4096, 14336)], 128),
    "smollm2-135m": ([("qkv_proj", 960, 576), ("o_proj", 576, 576), ("gate_up_proj", 3072, 576),
                      ("down_proj", 576, 1536)], 32),
}
LAYERS, GROUP = MODELS["llama-3.2-1b"]          # main() sets them from --model
ROWS = (1, 2, 4, 8, 16)

# The sweep's grid. Each distinct (kernel, BLOCK_N, BLOCK_K, warps, stages) compiles once per output
# dtype (bfloat16, or float32 partials when split) and, for the tensor-core kernel, per kind of M
# (16 is specialised as divisible by 16): 12 GEMV + 24 tensor-core settings, ~72 compilations.
# The GEMV kernel takes up to 8 rows a program (each weight unpacked once for them); run a program a
# row, before 6f4b988, it lost to the tensor-core kernel from 4 rows up on Llama-3.2-1B's linears.
# At 16 rows (two programs of 8 along M) it is timed too: from HBM the tensor-core kernel was 1.3-2x
# slower than bf16's matmul there (docs/benchmarks.md, twenty-fourth session).
GEMV_ROWS = (1, 2, 4, 8, 16)
DOT_ROWS = (2, 4, 8, 16)
GEMV_GRID = [dict(GEMV=True, BLOCK_N=bn, BLOCK_K=128, num_warps=w, num_stages=s)
             for bn, w, s in itertools.product((32, 64, 128), (4, 8), (2, 4))]
DOT_GRID = [dict(GEMV=False, BLOCK_M=16, BLOCK_N=bn, BLOCK_K=128, num_warps=w, num_stages=s)
            for bn, w, s in itertools.product((32, 64, 128), (4, 8), (2, 4))]
SPLIT_PER_SM = (0, 1, 2, 4, 8)  # split-K targets (programs per SM); settings giving the same split are run once
SWEEP_REP_MS = 3                # do_bench_cudagraph's rep: a short graph per setting keeps the sweep quick


def make_layer(n: int, k: int):
    qweight = torch.randint(-2**31, 2**31, (n, k // 8), dtype=torch.int32, device="cuda")
    scales = torch.rand(n, k // GROUP, dtype=torch.bfloat16, device="cuda") * 0.01
    mins = -8 * scales
    return qweight, scales, mins


def bytes_moved(m: int, n: int, k: int) -> int:
    """The packed 4-bit weight, its scales and mins (16-bit), the activations in and out."""
    return n * k // 2 + 2 * n * (k // GROUP) * 2 + (m * k + m * n) * 2


def in_turn(make, nbytes: int):
    """A function giving, call after call, one of enough copies of make() (each `nbytes`) that
    they fill the GPU's L2 cache four times over: a copy is read again only after the L2 has
    been refilled by the others."""
    l2 = torch.cuda.get_device_properties(0).L2_cache_size
    return itertools.cycle([make() for _ in range(-(-4 * l2 // nbytes))]).__next__


def bench(fn, rep: int = 20) -> float:
    return triton.testing.do_bench_cudagraph(fn, rep=rep, return_mode="median")


def table(copy: float, rows=ROWS) -> None:
    print(f"{'layer':<13} {'rows':>4} {'w4a16 us':>9} {'GB/s':>7} {'% copy':>7} {'bf16 us':>8} {'bf16/w4a16':>10}")
    for name, n, k in LAYERS:
        layer = in_turn(lambda: make_layer(n, k), bytes_moved(0, n, k))
        dense = in_turn(lambda: torch.randn(n, k, dtype=torch.bfloat16, device="cuda") * 0.02, 2 * n * k)
        for m in rows:
            x = torch.randn(m, k, dtype=torch.bfloat16, device="cuda")
            ms = bench(lambda: w4a16_gemm(x, *layer(), 4, GROUP))
            ms_dense = bench(lambda: torch.nn.functional.linear(x, dense()))
            rate = bytes_moved(m, n, k) / (ms / 1e3)
            print(f"{name:<13} {m:>4} {1e3 * ms:>9.1f} {rate / 1e9:>7.0f} {100 * rate / copy:>6.1f}% "
                  f"{1e3 * ms_dense:>8.1f} {ms_dense / ms:>10.2f}", flush=True)


def split_for(cfg: dict, per_sm: int, m: int, n: int, k: int) -> int:
    """The split-K that w4a16_gemm would pick for this setting with split_per_sm = per_sm."""
    row_tiles = m if cfg["GEMV"] else triton.cdiv(m, cfg["BLOCK_M"])
    programs = row_tiles * triton.cdiv(n, cfg["BLOCK_N"])
    return kernel_module.default_split_k(programs, triton.cdiv(k, cfg["BLOCK_K"]), torch.device("cuda"), per_sm)


def describe(cfg: dict) -> str:
    kind = "gemv" if cfg["GEMV"] else f"dot M{cfg['BLOCK_M']}"
    return (f"{kind:<6} N{cfg['BLOCK_N']:<4} K{cfg['BLOCK_K']:<4} w{cfg['num_warps']} s{cfg['num_stages']} "
            f"split/SM {cfg['split_per_sm']}")


def sweep(copy: float, show: int = 4) -> None:
    """Time every setting per (layer, rows); print the best few, then the defaults to set."""
    started = time.time()
    times = {}                  # (setting key, m) -> {layer: ms}
    settings = {}
    wrong = []
    for name, n, k in LAYERS:
        qweight, scales, mins = make_layer(n, k)
        w = dequantize(qweight, scales, mins, 4, GROUP).float()
        layer = in_turn(lambda: make_layer(n, k), bytes_moved(0, n, k))       # for the timing
        for m in ROWS:
            x = torch.randn(m, k, dtype=torch.bfloat16, device="cuda")
            expected = x.float() @ w.t()
            tolerance = 2e-2 * expected.abs().max().item()
            grid = [c for c in GEMV_GRID if m in GEMV_ROWS] + [c for c in DOT_GRID if m in DOT_ROWS]
            results = []
            for base in grid:
                seen_splits = {}
                for per_sm in SPLIT_PER_SM:
                    cfg = {**base, "split_per_sm": per_sm}
                    split = split_for(cfg, per_sm, m, n, k)
                    if split in seen_splits:        # same launch as a setting already timed
                        times.setdefault((describe(cfg), m), {})[name] = times[(seen_splits[split], m)][name]
                        settings[describe(cfg)] = cfg
                        continue
                    key = describe(cfg)
                    seen_splits[split] = key
                    settings[key] = cfg
                    fn = lambda: w4a16_gemm(x, qweight, scales, mins, 4, GROUP, config=cfg)  # noqa: E731
                    try:
                        error = (fn().float() - expected).abs().max().item()
                    except Exception as e:      # a setting the compiler rejects (too many registers, ...)
                        error = None
                        wrong.append(f"{name} rows {m} {key}: {type(e).__name__}: {str(e)[:200]}")
                    if error is None:
                        ms = float("inf")
                    elif not error <= tolerance:
                        wrong.append(f"{name} rows {m} {key}: max error {error:.3g} (allowed {tolerance:.3g})")
                        ms = float("inf")
                    else:
                        ms = bench(lambda: w4a16_gemm(x, *layer(), 4, GROUP, config=cfg), rep=SWEEP_REP_MS)
                    times.setdefault((key, m), {})[name] = ms
                    results.append((ms, key, split))
            results.sort()
            moved = bytes_moved(m, n, k)
            print(f"{name} (N={n}, K={k}) rows {m}: best of {len(results)}", flush=True)
            for ms, key, split in results[:show]:
                rate = moved / (ms / 1e3)
                print(f"    {1e3 * ms:7.1f} us {100 * rate / copy:5.1f}% copy  {key} (split_k {split})")
    print(f"\nsweep took {time.time() - started:.0f} s")
    for line in wrong:
        print("WRONG RESULT:", line)
    summarize(times, settings, copy)


def total(times: dict, key: str, rows) -> float:
    """Sum over layers and the given row counts (inf where a layer or row count is missing)."""
    sums = 0.0
    for m in rows:
        per_layer = times.get((key, m), {})
        if len(per_layer) < len(LAYERS):
            return float("inf")
        sums += sum(per_layer.values())
    return sums


def summarize(times: dict, settings: dict, copy: float) -> None:
    keys = sorted(settings)
    print("\nPer row count, the setting with the least total time over the four layers:")
    best_by_rows = {}
    for m in ROWS:
        ranked = sorted((total(times, key, [m]), key) for key in keys)
        best_by_rows[m] = ranked[0]
        print(f"  rows {m:>2}: {1e3 * ranked[0][0]:7.1f} us  {ranked[0][1]}"
              + "".join(f"\n           {1e3 * t:7.1f} us  {key}" for t, key in ranked[1:3]))
    # One GEMV setting for rows 1..R and one tensor-core setting for the rest, for the R that is best.
    gemv_keys = [k for k in keys if settings[k]["GEMV"]]
    dot_keys = [k for k in keys if not settings[k]["GEMV"]]
    plans = []
    for r in (0,) + GEMV_ROWS:
        gemv_rows, dot_rows = [m for m in ROWS if m <= r], [m for m in ROWS if m > r]
        if any(m not in DOT_ROWS for m in dot_rows) or (dot_rows and not dot_keys):
            continue
        g = min(((total(times, k, gemv_rows), k) for k in gemv_keys), default=(0.0, None)) if gemv_rows else (0.0, None)
        d = min((total(times, k, dot_rows), k) for k in dot_keys) if dot_rows else (0.0, None)
        plans.append((g[0] + d[0], r, g[1], d[1]))
    plans.sort()
    _, r, g, d = plans[0]
    print(f"\nBest simple rule (least time summed over rows {ROWS} and the four layers):")
    for plan_time, plan_r, plan_g, plan_d in plans:
        print(f"  GEMV up to {plan_r} rows: {1e3 * plan_time:8.1f} us  ({plan_g or '-'} | {plan_d})")
    oracle = sum(t for t, _ in best_by_rows.values())
    print(f"  (best setting per row count and layer-summed: {1e3 * oracle:.1f} us)")
    print("\nSet in nanovllm/kernels/w4a16_gemm.py:")
    print(f"  GEMV_MAX_ROWS = {r}")
    if g is not None:
        cfg = {k: v for k, v in settings[g].items() if k != "GEMV"}
        print(f"  GEMV_CONFIG = {cfg}")
    if d is not None:
        cfg = {k: v for k, v in settings[d].items() if k != "GEMV"}
        print(f"  DOT_CONFIGS[0] = (16, {cfg})")
    print("\nThat rule per layer and row count:")
    print(f"{'layer':<13} {'rows':>4} {'us':>7} {'% copy':>7}")
    for name, n, k in LAYERS:
        for m in ROWS:
            key = g if m <= r else d
            ms = times[(key, m)][name]
            print(f"{name:<13} {m:>4} {1e3 * ms:>7.1f} {100 * bytes_moved(m, n, k) / (ms / 1e3) / copy:>6.1f}%")


def main() -> None:
    global LAYERS, GROUP, ROWS
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sweep", action="store_true", help="try a grid of kernel settings and print the best")
    parser.add_argument("--model", default="llama-3.2-1b", choices=list(MODELS), help="whose linears")
    parser.add_argument("--rows", type=int, nargs="+", default=list(ROWS), help="rows of the table (and of the sweep)")
    parser.add_argument("--gemv-max-rows", type=int, default=None,
                        help="the table with the CUDA-core kernel up to this many rows")
    parser.add_argument("--gluon-gemv-max-rows", type=int, default=None,
                        help="rows up to which the Gluon GEMV runs (0: never; at most 2)")
    parser.add_argument("--gluon-mma-rows", type=int, nargs=2, default=None, metavar=("LOW", "HIGH"),
                        help="rows for which the Gluon tensor-core kernel runs (0 0: never)")
    parser.add_argument("--gluon-mma-config", type=json.loads, default={},
                        help="settings of the Gluon tensor-core kernel, as JSON (default: w4a16_mma.GLUON_MMA_CONFIG)")
    parser.add_argument("--half-unpack-max-rows", type=int, default=None,
                        help="the CUDA-core kernel's float16 unpacking in programs of up to this many rows")
    args = parser.parse_args()
    LAYERS, GROUP = MODELS[args.model]
    ROWS = tuple(args.rows)
    if args.gemv_max_rows is not None:
        kernel_module.set_gemv_max_rows(args.gemv_max_rows)
    if args.half_unpack_max_rows is not None:
        kernel_module.set_half_unpack_max_rows(args.half_unpack_max_rows)
    if args.gluon_gemv_max_rows is not None:
        kernel_module.w4a16_gemv.set_gluon_gemv_max_rows(args.gluon_gemv_max_rows)
    if args.gluon_mma_rows is not None:
        kernel_module.w4a16_mma.set_gluon_mma_rows(*args.gluon_mma_rows)
    kernel_module.w4a16_mma.GLUON_MMA_CONFIG.update(args.gluon_mma_config)
    torch.manual_seed(0)
    copy = copy_bandwidth()
    print(f"{torch.cuda.get_device_name(0)}: device-to-device copy {copy / 1e12:.2f} TB/s")
    print(f"{args.model}'s linears, group {GROUP}, the CUDA-core kernel up to {kernel_module.GEMV_MAX_ROWS} rows, "
          f"its float16 unpacking up to {kernel_module.HALF_UNPACK_MAX_ROWS}")
    table(copy, args.rows)
    if args.sweep:
        print()
        sweep(copy)


if __name__ == "__main__":
    main()
