"""Offline throughput benchmark: nano-vllm's workload on nanovllm, vLLM or transformers.

Default workload (nano-vllm's bench.py): 256 requests, seed 0, prompts of 100..1024 random
token ids, 100..1024 output tokens each with ignore_eos, max_model_len 4096. With no
--model, a Qwen3-0.6B-shaped model with random weights (load_format="dummy"): with
ignore_eos the throughput does not depend on the weights.

    python bench.py                                   # nanovllm, Qwen3-0.6B shape
    python bench.py --engine nanovllm hf              # side by side with transformers
    python bench.py --shape qwen2.5-0.5b --num-seqs 64
"""
import argparse
import json
import os
import sys
import time

from nanovllm.bench_workload import Workload, add_workload_args, make_workload


def hbm_floor_seconds(w: Workload, hf_config, bandwidth: float, flops: float, tp: int = 1) -> float:
    """The fastest this workload can run on `tp` GPUs, assuming every request runs at once: each
    decode step reads the weights once and each running sequence's whole KV cache once; prefill
    costs 2 FLOP per parameter per prompt token."""
    c = hf_config
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    kv_per_token = 2 * c.num_hidden_layers * c.num_key_value_heads * head_dim * 2        # bf16
    params = c.num_hidden_layers * (c.hidden_size * head_dim * (2 * c.num_attention_heads + 2 * c.num_key_value_heads)
                                    + 3 * c.hidden_size * c.intermediate_size) + c.vocab_size * c.hidden_size
    kv_bytes = sum(kv_per_token * (len(p) * o + o * (o - 1) // 2) for p, o in zip(w.prompts, w.output_lens))
    weight_bytes = 2 * params * max(w.output_lens)
    prefill = 2 * params * sum(len(p) for p in w.prompts) / flops
    return ((kv_bytes + weight_bytes) / bandwidth + prefill) / tp


def run_nanovllm(model_dir: str, w: Workload, args) -> tuple[int, float, object]:
    from nanovllm import LLM, SamplingParams
    start = time.perf_counter()
    llm = LLM(model_dir, load_format=args.load_format, max_model_len=args.max_model_len,
              enforce_eager=args.enforce_eager, tensor_parallel_size=args.tensor_parallel_size,
              device=args.device, block_size=args.block_size, max_num_seqs=args.max_num_seqs,
              max_num_batched_tokens=args.max_num_batched_tokens)
    print(f"nanovllm start-up: {time.perf_counter() - start:.1f} s", flush=True)
    llm.generate(["Benchmark: "], SamplingParams(), use_tqdm=False)          # warm-up
    params = [SamplingParams(temperature=0.6, ignore_eos=True, max_tokens=n) for n in w.output_lens]
    steps_before = llm.llm_engine.num_steps
    start = time.perf_counter()
    outs = llm.generate(w.prompts, params, use_tqdm=not args.quiet)
    seconds = time.perf_counter() - start
    steps = llm.llm_engine.num_steps - steps_before
    print(f"nanovllm: {steps} engine steps, {1000 * seconds / max(1, steps):.2f} ms each", flush=True)
    return sum(len(o.outputs[0].token_ids) for o in outs), seconds, llm.llm_engine.config.hf_config


def run_vllm(model_dir: str, w: Workload, args) -> tuple[int, float, None]:
    from vllm import LLM, SamplingParams, TokensPrompt
    llm = LLM(model_dir, load_format=args.load_format, max_model_len=args.max_model_len,
              enforce_eager=args.enforce_eager, tensor_parallel_size=args.tensor_parallel_size)
    llm.generate(["Benchmark: "], SamplingParams())
    params = [SamplingParams(temperature=0.6, ignore_eos=True, max_tokens=n) for n in w.output_lens]
    start = time.perf_counter()
    outs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in w.prompts], params, use_tqdm=not args.quiet)
    return sum(len(o.outputs[0].token_ids) for o in outs), time.perf_counter() - start, None


def run_hf(model_dir: str, w: Workload, args) -> tuple[int, float, None]:
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
    return produced, seconds, None


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--engine", nargs="+", default=["nanovllm"], choices=["nanovllm", "vllm", "hf"])
    p.add_argument("--model", help="checkpoint directory or repo id (real weights)")
    p.add_argument("--shape", default="qwen3-0.6b", help="model shape for dummy weights when --model is not given")
    add_workload_args(p)
    p.add_argument("--max-model-len", type=int, default=4096)
    p.add_argument("--max-num-seqs", type=int, default=256)
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--max-num-batched-tokens", type=int, default=None,
                   help="tokens per step (default: LLM's; `nanovllm serve` uses vllm serve's smaller one)")
    p.add_argument("--tensor-parallel-size", type=int, default=1)
    p.add_argument("--enforce-eager", action="store_true")
    p.add_argument("--device", default="auto")
    p.add_argument("--bandwidth", type=float, default=3.0e12, help="HBM bytes/s for the floor (H100: 3.0e12)")
    p.add_argument("--flops", type=float, default=790e12, help="bf16 FLOP/s for the floor (H100: 790e12)")
    p.add_argument("--hf-time-limit", type=float, default=120.0)
    p.add_argument("--json", help="append the results as JSON lines to this file")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    args = p.parse_args()

    if args.model:
        model_dir, args.load_format = args.model, "auto"
    else:
        from nanovllm.models.shapes import shape_checkpoint_dir
        model_dir, args.load_format = shape_checkpoint_dir(args.shape), "dummy"
    w = make_workload(args)
    print(f"workload: {len(w.prompts)} requests, {sum(map(len, w.prompts))} prompt tokens, "
          f"{w.output_tokens} output tokens; model {args.model or args.shape + ' (dummy weights)'}", flush=True)
    from transformers import AutoConfig
    floor = hbm_floor_seconds(w, AutoConfig.from_pretrained(model_dir), args.bandwidth, args.flops,
                              args.tensor_parallel_size)
    runners = {"nanovllm": run_nanovllm, "vllm": run_vllm, "hf": run_hf}
    rows = []
    for engine in args.engine:
        try:
            tokens, seconds, _ = runners[engine](model_dir, w, args)
        except ImportError as e:
            print(f"{engine}: not installed ({e}); skipped", file=sys.stderr)
            continue
        rows.append(dict(engine=engine, output_tokens=tokens, seconds=round(seconds, 2),
                         tok_per_s=round(tokens / seconds, 1), floor_tok_per_s=round(w.output_tokens / floor, 1)))
    print(f"\n{'engine':<10} {'output tokens':>14} {'time (s)':>9} {'tok/s':>10} {'% of floor':>11} {'x first':>8}")
    for r in rows:
        print(f"{r['engine']:<10} {r['output_tokens']:>14} {r['seconds']:>9.2f} {r['tok_per_s']:>10.1f} "
              f"{100 * r['tok_per_s'] / r['floor_tok_per_s']:>10.1f}% {r['tok_per_s'] / rows[0]['tok_per_s']:>8.2f}")
    print(f"HBM floor ({args.bandwidth / 1e12:.1f} TB/s, {args.flops / 1e12:.0f} TFLOP/s): "
          f"{floor:.2f} s = {w.output_tokens / floor:.0f} tok/s")
    if args.json:
        with open(args.json, "a") as f:
            for r in rows:
                f.write(json.dumps({**r, "shape": args.shape, "model": args.model, "num_seqs": args.num_seqs}) + "\n")
    os._exit(0)    # skip slow interpreter teardown of large engines


if __name__ == "__main__":
    main()
