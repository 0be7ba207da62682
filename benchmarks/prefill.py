"""Prefill throughput: many long prompts, one output token each, and the arithmetic rate it reaches.

    python benchmarks/prefill.py                                  # 128 x 4,000 tokens, Qwen3-0.6B shape
    python benchmarks/prefill.py --shape llama-3.2-1b --quantization fp8
    python benchmarks/prefill.py --profile                        # and where the GPU time goes
    python benchmarks/prefill.py --text                           # prompts as text: tokenizing them is timed too

FLOPs counted: 2 per active weight of the decoder layers per prompt token, causal attention
(4 per head dimension per query-key pair: QK^T and PV over the n(n+1)/2 pairs of a prompt), and
the LM head for the one position per prompt that is sampled. The rate is set against the GPU's
dense bf16 peak (bench.py's table, or --flops).
"""
import argparse
import os
import random
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from bench import KNOWN_GPUS, head_dim_of, layer_weights  # noqa: E402
from nanovllm import LLM, SamplingParams  # noqa: E402
from nanovllm.models.shapes import SHAPES, shape_checkpoint_dir  # noqa: E402


def prefill_flops(c, prompt_lens: list[int]) -> float:
    """c: the model's Hugging Face config."""
    attention, mlp, _ = layer_weights(c)
    pairs = sum(n * (n + 1) / 2 for n in prompt_lens)
    layers, heads = c.num_hidden_layers, c.num_attention_heads
    return (2 * layers * (attention + mlp) * sum(prompt_lens) + 4 * layers * heads * head_dim_of(c) * pairs
            + 2 * c.vocab_size * c.hidden_size * len(prompt_lens))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", default="qwen3-0.6b", choices=list(SHAPES))
    p.add_argument("--num-seqs", type=int, default=128)
    p.add_argument("--input", type=int, default=4000, help="tokens per prompt")
    p.add_argument("--max-num-batched-tokens", type=int, default=None)
    p.add_argument("--quantization", default=None)
    p.add_argument("--kv-cache-dtype", default="auto")
    p.add_argument("--flops", type=float, default=None, help="peak FLOP/s (default: the GPU's dense bf16, if known)")
    p.add_argument("--text", action="store_true",
                   help="pass the prompts as text (the random ids decoded), so that generate tokenizes them")
    p.add_argument("--profile", action="store_true", help="then profile one run: GPU time by kernel")
    args = p.parse_args()

    # decoded text may tokenize to more tokens than the ids it came from: room for twice as many
    max_model_len = 2 * args.input if args.text else args.input + 16
    llm = LLM(shape_checkpoint_dir(args.shape), load_format="dummy", max_model_len=max_model_len,
              enable_prefix_caching=False, max_num_batched_tokens=args.max_num_batched_tokens,
              quantization=args.quantization, kv_cache_dtype=args.kv_cache_dtype)
    rng = random.Random(0)
    prompts = [[rng.randint(0, 10000) for _ in range(args.input)] for _ in range(args.num_seqs)]
    if args.text:
        prompts = llm.get_tokenizer().batch_decode(prompts)
    params = SamplingParams(temperature=0, max_tokens=1)
    llm.generate(prompts[:8], params, use_tqdm=False)                          # warm-up
    times = []
    for _ in range(3):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        start = time.perf_counter()
        llm.generate(prompts, params, use_tqdm=False)
        times.append(time.perf_counter() - start)
    seconds = min(times)
    lengths = [len(x) for x in llm.get_tokenizer()(prompts).input_ids] if args.text else [len(x) for x in prompts]
    flops = prefill_flops(llm.llm_engine.config.hf_config, lengths)
    tokens = sum(lengths)
    line = (f"prefill {args.num_seqs} x {tokens / args.num_seqs:,.0f} tokens{' as text' if args.text else ''} "
            f"({args.shape}, quantization {args.quantization}): "
            f"{seconds:.3f} s (best of 3), {tokens / seconds:,.0f} prompt tok/s, {flops / seconds / 1e12:.1f} TFLOP/s")
    peak = args.flops
    if peak is None and torch.cuda.is_available():
        name = torch.cuda.get_device_name(0)
        peak = next((v[1] for k, v in KNOWN_GPUS.items() if k in name), None)
    if peak:
        line += f", {100 * flops / seconds / peak:.1f}% of {peak / 1e12:.0f} TFLOP/s"
    print(line, flush=True)
    if args.profile:
        print_gpu_time_by_kernel(lambda: llm.generate(prompts, params, use_tqdm=False))


def print_gpu_time_by_kernel(run) -> None:
    """torch's profiler over one call of `run`: each kernel's share of the GPU time."""
    activities = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
    with torch.profiler.profile(activities=activities) as prof:
        run()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
    kernels = [e for e in prof.key_averages() if e.device_type == torch.autograd.DeviceType.CUDA]
    total = sum(e.self_device_time_total for e in kernels)
    print(f"GPU time {total / 1e6:.3f} s, by kernel:")
    for e in sorted(kernels, key=lambda e: -e.self_device_time_total)[:15]:
        print(f"{100 * e.self_device_time_total / total:5.1f}%  {e.self_device_time_total / 1e3:9.1f} ms "
              f"{e.count:7d} calls  {e.key[:100]}")


if __name__ == "__main__":
    main()
