"""Offline throughput benchmark: a workload on nanovllm, and on vLLM or transformers side by side.

What runs where:
  on a CUDA GPU   the workload as given (default: nano-vllm's, 256 requests, 133,966 output
                  tokens) on a Qwen3-0.6B-shaped model with random weights (load_format="dummy";
                  with ignore_eos the throughput does not depend on the weights).
  without one     the CPU preset: the same kind of workload scaled down (nano: 16 requests,
                  64-256 prompt and 32-128 output tokens), max_num_seqs 16, on the SmolLM2-135M
                  shape; the timed run takes about 17 s on a 2-core CPU. --preset full runs
                  the GPU's sizes anyway. Then the decode speed of 1 and of 16 sequences
                  (--decode-batches) and the process's peak memory.

The floor (the fastest the workload can run: decode reading weights and KV cache at the memory
bandwidth, prefill computing at the matmul peak) is printed on a GPU bench.py knows (H100, H200)
or with --bandwidth and --flops.

    python bench.py                                   # nanovllm, Qwen3-0.6B shape (CPU preset without a GPU)
    python bench.py --workload chat                   # many short requests joining as others finish
    python bench.py --engine nanovllm hf              # side by side with transformers (GPU)
    python bench.py --shape qwen2.5-0.5b --num-seqs 64
    python bench.py --model demo                      # a CPU: the demo model (SmolLM2-135M, 4-bit GGUF)
"""
import argparse
import json
import math
import os
import sys
import time

from nanovllm.bench_workload import (CPU_MAX_NUM_SEQS, CPU_SHAPE, GPU_SHAPE, Workload, add_workload_args,
                                     make_workload, use_cpu_preset)
from nanovllm.models.shapes import SHAPES

# name in torch.cuda.get_device_name -> (bytes/s, bf16 FLOP/s, where the figures come from)
KNOWN_GPUS = {
    "H100": (3.0e12, 790e12, "measured on an H100: device-to-device copy, bf16 matmul"),
    "H200": (4.8e12, 989e12, "the H200's nominal HBM3e bandwidth and dense bf16 peak"),
}


def head_dim_of(c) -> int:
    return getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads


def layer_weights(c, batch: int = 1) -> tuple[int, float, float]:
    """One decoder layer's weights: (attention, MLP weights one token computes with, MLP weights a
    step of `batch` sequences reads). A mixture of experts reads every expert one of the
    sequences is routed to: with k of E experts per token, E * (1 - (1 - k/E)^batch) of them."""
    attention = c.hidden_size * head_dim_of(c) * (2 * c.num_attention_heads + 2 * c.num_key_value_heads)
    experts, active = getattr(c, "num_experts", 0) or 0, getattr(c, "num_experts_per_tok", 0) or 0
    if not experts:
        mlp = 3 * c.hidden_size * c.intermediate_size
        return attention, mlp, mlp
    expert = 3 * c.hidden_size * c.moe_intermediate_size
    return attention, expert * active, expert * experts * (1 - (1 - active / experts) ** batch)


def floor_seconds(w: Workload, hf_config, bandwidth: float, flops: float, max_num_seqs: int,
                  tp: int = 1) -> float:
    """The fastest `w` can run on `tp` GPUs (bf16 weights and KV cache).

    Decode is memory-bound: each step reads the weights once, and each decoded token reads its
    sequence's whole KV cache once; there are at least as many steps as the longest output, and
    at least (all output tokens) / max_num_seqs. Prefill is compute-bound: 2 FLOP per parameter
    per computed prompt token, plus causal attention (4 FLOP per head dimension per query-key
    pair); a shared prefix is computed once (prefix cache). A mixture of experts computes with
    its active experts but reads every expert a step's sequences are routed to (layer_weights)."""
    c = hf_config
    head_dim = head_dim_of(c)
    kv_per_token = 2 * c.num_hidden_layers * c.num_key_value_heads * head_dim * 2
    attention, mlp, mlp_read = layer_weights(c, max_num_seqs)
    embedding = c.vocab_size * c.hidden_size
    params = c.num_hidden_layers * (attention + mlp) + embedding
    kv_bytes = sum(kv_per_token * (len(p) * o + o * (o - 1) // 2) for p, o in zip(w.prompts, w.output_lens))
    decode_steps = max(max(w.output_lens), math.ceil(w.output_tokens / max_num_seqs))
    weight_bytes = 2 * (c.num_hidden_layers * (attention + mlp_read) + embedding) * decode_steps
    prefix = w.shared_prefix
    computed_tokens = prefix + sum(len(p) - prefix for p in w.prompts)
    pairs = prefix * prefix / 2 + sum((len(p) ** 2 - prefix ** 2) / 2 for p in w.prompts)
    prefill_flops = 2 * params * computed_tokens + 4 * c.num_hidden_layers * c.num_attention_heads * head_dim * pairs
    return ((kv_bytes + weight_bytes) / bandwidth + prefill_flops / flops) / tp


def peak_rates(args, device: str) -> tuple[float, float, str] | None:
    """(bandwidth, FLOP/s, source) for the floor: --bandwidth/--flops where given, else the known
    GPU's; None on a CPU or an unknown GPU without both flags."""
    known = None
    if device == "cuda":
        import torch
        name = torch.cuda.get_device_name(0)
        known = next((v for k, v in KNOWN_GPUS.items() if k in name), None)
    bandwidth = args.bandwidth or (known and known[0])
    flops = args.flops or (known and known[1])
    if not (bandwidth and flops):
        return None
    given = args.bandwidth is not None or args.flops is not None
    return bandwidth, flops, "--bandwidth/--flops" if given else known[2]


def run_nanovllm(model_dir: str, w: Workload, args) -> tuple[int, float]:
    from nanovllm import LLM, SamplingParams
    start = time.perf_counter()
    llm = LLM(model_dir, load_format=args.load_format, max_model_len=args.max_model_len,
              enforce_eager=args.enforce_eager, tensor_parallel_size=args.tensor_parallel_size,
              device=args.device, block_size=args.block_size, max_num_seqs=args.max_num_seqs,
              max_num_batched_tokens=args.max_num_batched_tokens, dtype=args.dtype,
              quantization=args.quantization, kv_cache_dtype=args.kv_cache_dtype)
    print(f"nanovllm start-up: {time.perf_counter() - start:.1f} s", flush=True)
    llm.generate(["Benchmark: "], SamplingParams(), use_tqdm=False)          # warm-up
    params = [SamplingParams(temperature=0.6, ignore_eos=True, max_tokens=n) for n in w.output_lens]
    steps_before = llm.llm_engine.num_steps
    start = time.perf_counter()
    outs = llm.generate(w.prompts, params, use_tqdm=not args.quiet)
    seconds = time.perf_counter() - start
    steps = llm.llm_engine.num_steps - steps_before
    print(f"nanovllm: {steps} engine steps, {1000 * seconds / max(1, steps):.2f} ms each", flush=True)
    for batch in args.decode_batches:
        prompts = [w.prompts[i % len(w.prompts)] for i in range(batch)]
        speed = decode_tok_s(llm, prompts, args.decode_tokens)
        print(f"nanovllm decode, {batch} sequence(s): {speed:.1f} tok/s", flush=True)
    return sum(len(o.outputs[0].token_ids) for o in outs), seconds


def decode_tok_s(llm, prompts: list[list[int]], new_tokens: int = 64, repeats: int = 3) -> float:
    """Decode speed with the prompts left out: (tokens of a run to 1 + new_tokens tokens, minus
    those of a run to 1) over the difference of the two runs' times. Median of `repeats`."""
    from nanovllm import SamplingParams

    def run(max_tokens: int) -> tuple[float, int]:
        params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
        start = time.perf_counter()
        outs = llm.generate(prompts, params, use_tqdm=False)
        return time.perf_counter() - start, sum(len(o.outputs[0].token_ids) for o in outs)
    speeds = []
    for _ in range(repeats):
        (t1, n1), (tn, nn) = run(1), run(1 + new_tokens)
        speeds.append((nn - n1) / (tn - t1))
    return sorted(speeds)[len(speeds) // 2]


def run_vllm(model_dir: str, w: Workload, args) -> tuple[int, float]:
    from vllm import LLM, SamplingParams, TokensPrompt
    llm = LLM(model_dir, load_format=args.load_format, max_model_len=args.max_model_len,
              enforce_eager=args.enforce_eager, tensor_parallel_size=args.tensor_parallel_size,
              max_num_seqs=args.max_num_seqs)
    llm.generate(["Benchmark: "], SamplingParams())
    params = [SamplingParams(temperature=0.6, ignore_eos=True, max_tokens=n) for n in w.output_lens]
    start = time.perf_counter()
    outs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in w.prompts], params, use_tqdm=not args.quiet)
    return sum(len(o.outputs[0].token_ids) for o in outs), time.perf_counter() - start


def run_hf(model_dir: str, w: Workload, args) -> tuple[int, float]:
    """transformers' continuous batching (paged attention), with a time limit: the tokens of
    the requests finished when it runs out are what count."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig
    config = AutoConfig.from_pretrained(model_dir)
    if args.load_format == "dummy":
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16).cuda()
    else:
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16).cuda()
    model.generation_config = GenerationConfig(do_sample=True, temperature=0.6, max_new_tokens=max(w.output_lens),
                                               eos_token_id=-1, pad_token_id=0)
    manager = model.init_continuous_batching()
    manager.start()
    start, produced, finished = time.perf_counter(), 0, 0
    for i, (p, n) in enumerate(zip(w.prompts, w.output_lens)):
        manager.add_request(p, request_id=str(i), max_new_tokens=n)
    while finished < len(w.prompts) and time.perf_counter() - start < args.hf_time_limit:
        result = manager.get_result(timeout=1)
        if result is not None and result.is_finished():
            produced += len(result.generated_tokens)
            finished += 1
    seconds = time.perf_counter() - start
    manager.stop(block=False)
    if finished < len(w.prompts):
        print(f"hf: time limit reached after {finished}/{len(w.prompts)} requests", flush=True)
    return produced, seconds


def shapes_table() -> str:
    lines = ["model shapes (--shape; random weights of that shape):"]
    for name, s in SHAPES.items():
        lines.append(f"  {name:<14} {s['architectures'][0]:<20} {s['num_hidden_layers']} layers, hidden {s['hidden_size']}, "
                     f"{s['num_attention_heads']}/{s['num_key_value_heads']} query/KV heads, vocab {s['vocab_size']}")
    lines.append(f"  default: {GPU_SHAPE} on a GPU, {CPU_SHAPE} with the CPU preset")
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, epilog=shapes_table(),
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--engine", nargs="+", default=["nanovllm"], choices=["nanovllm", "vllm", "hf"],
                   help="engines to run side by side (vllm and hf: GPU only, when installed)")
    p.add_argument("--model", help="checkpoint directory or repo id (real weights) instead of --shape")
    p.add_argument("--shape", choices=list(SHAPES), help="model shape for random weights (listed below)")
    add_workload_args(p)
    p.add_argument("--max-model-len", type=int, default=None, help="default: long enough for the workload")
    p.add_argument("--max-num-seqs", type=int, default=None,
                   help=f"default: 256, or {CPU_MAX_NUM_SEQS} with the CPU preset")
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--max-num-batched-tokens", type=int, default=None,
                   help="tokens per step (default: LLM's; `nanovllm serve` uses vllm serve's smaller one)")
    p.add_argument("--tensor-parallel-size", type=int, default=1)
    p.add_argument("--enforce-eager", action="store_true")
    p.add_argument("--dtype", default="auto", help="LLM's dtype (auto: the checkpoint's; bfloat16 or float32 on a CPU)")
    p.add_argument("--quantization", default=None, help="LLM's quantization (fp8, gptq, awq, gguf; default: the checkpoint's)")
    p.add_argument("--kv-cache-dtype", default="auto", help="LLM's kv_cache_dtype (auto, fp8)")
    p.add_argument("--device", default="auto", choices=["auto", "cuda", "cpu"])
    p.add_argument("--bandwidth", type=float, default=None,
                   help="memory bytes/s for the floor (default: the GPU's, if known: " +
                        ", ".join(f"{k} {v[0] / 1e12:.1f}e12" for k, v in KNOWN_GPUS.items()) + ")")
    p.add_argument("--flops", type=float, default=None,
                   help="bf16 FLOP/s for the floor (default: the GPU's, if known: " +
                        ", ".join(f"{k} {v[1] / 1e12:.0f}e12" for k, v in KNOWN_GPUS.items()) + ")")
    p.add_argument("--decode-batches", type=int, nargs="*", default=None,
                   help="after the workload, nanovllm's decode speed for these numbers of sequences "
                        "(default: 1 16 with the CPU preset, none on a GPU)")
    p.add_argument("--decode-tokens", type=int, default=64, help="new tokens per sequence for --decode-batches")
    p.add_argument("--hf-time-limit", type=float, default=120.0)
    p.add_argument("--json", help="append the results as JSON lines to this file")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p.parse_args(argv)


def main() -> None:
    args = parse_args()
    import torch
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    cpu_preset = use_cpu_preset(args, args.device == "cpu")
    if args.max_num_seqs is None:
        args.max_num_seqs = CPU_MAX_NUM_SEQS if cpu_preset else 256
    if args.decode_batches is None:
        args.decode_batches = [1, 16] if cpu_preset else []
    args.shape = args.shape or (CPU_SHAPE if cpu_preset else GPU_SHAPE)
    if args.model:
        model_dir, args.load_format = args.model, "auto"
    else:
        from nanovllm.models.shapes import shape_checkpoint_dir
        model_dir, args.load_format = shape_checkpoint_dir(args.shape), "dummy"
    w = make_workload(args, cpu=cpu_preset)
    args.max_model_len = args.max_model_len or w.max_model_len
    if cpu_preset:
        why = "the engine runs on the CPU" if args.preset == "auto" else "--preset cpu"
        print(f"CPU preset ({why}): the {args.workload!r} workload scaled down, max_num_seqs {args.max_num_seqs}, "
              f"{args.model or args.shape + ' shape'}; `--preset full` for the GPU's sizes", flush=True)
    prefix = f" ({w.shared_prefix} shared by all)" if w.shared_prefix else ""
    print(f"workload {args.workload}: {len(w.prompts)} requests, {w.prompt_tokens} prompt tokens{prefix}, "
          f"{w.output_tokens} output tokens; model {args.model or args.shape + ' (dummy weights)'}, "
          f"device {args.device}", flush=True)
    if args.device == "cpu" and args.engine != ["nanovllm"]:
        print("vllm and hf need a CUDA GPU; running nanovllm only", file=sys.stderr)
        args.engine = ["nanovllm"]
    runners = {"nanovllm": run_nanovllm, "vllm": run_vllm, "hf": run_hf}
    rows = []
    for engine in args.engine:
        try:
            tokens, seconds = runners[engine](model_dir, w, args)
        except ImportError as e:
            print(f"{engine}: not installed ({e}); skipped", file=sys.stderr)
            continue
        rows.append(dict(engine=engine, output_tokens=tokens, seconds=round(seconds, 2),
                         tok_per_s=round(tokens / seconds, 1)))

    rates = peak_rates(args, args.device)
    floor = None
    if rates is not None:
        from transformers import AutoConfig
        floor = floor_seconds(w, AutoConfig.from_pretrained(model_dir), rates[0], rates[1], args.max_num_seqs,
                              args.tensor_parallel_size)
        for r in rows:
            r["floor_tok_per_s"] = round(w.output_tokens / floor, 1)
    print(f"\n{'engine':<10} {'output tokens':>14} {'time (s)':>9} {'tok/s':>10}"
          + (f" {'% of floor':>11}" if floor else "") + f" {'x first':>8}")
    for r in rows:
        print(f"{r['engine']:<10} {r['output_tokens']:>14} {r['seconds']:>9.2f} {r['tok_per_s']:>10.1f}"
              + (f" {100 * r['tok_per_s'] / r['floor_tok_per_s']:>10.1f}%" if floor else "")
              + f" {r['tok_per_s'] / rows[0]['tok_per_s']:>8.2f}")
    if floor:
        print(f"floor at {rates[0] / 1e12:.1f} TB/s and {rates[1] / 1e12:.0f} TFLOP/s ({rates[2]}): "
              f"{floor:.2f} s = {w.output_tokens / floor:.0f} tok/s")
    elif args.device == "cuda":
        print("no floor: unknown GPU; give --bandwidth and --flops (bytes/s, bf16 FLOP/s) to compute it")
    if args.device == "cpu":
        import resource
        print(f"peak memory (RSS) of this process: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MB; "
              f"{torch.get_num_threads()} torch threads")
    if args.json:
        with open(args.json, "a") as f:
            for r in rows:
                f.write(json.dumps({**r, "workload": args.workload, "preset": "cpu" if cpu_preset else "full",
                                    "device": args.device, "shape": args.shape, "model": args.model,
                                    "num_seqs": len(w.prompts)}) + "\n")
    sys.stdout.flush()
    os._exit(0)    # skip slow interpreter teardown of large engines


if __name__ == "__main__":
    main()
