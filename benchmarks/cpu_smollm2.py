"""CPU figures for the demo model: batch-1 and batch-16 decode speed, first-run time, peak memory.

SmolLM2-135M-Instruct (the Q4_1 GGUF example.py uses), greedy, chat prompts, ignore EOS. Decode
speed leaves the prompts out: it is (tokens of a run of 1 + N new tokens minus those of a run
of 1) over the difference of the two runs' times. Peak RSS is the process's (run one setting
per process to compare settings).

    python benchmarks/cpu_smollm2.py                       # defaults: dtype auto, eager
    NANOVLLM_CPU_COMPILE=1 python benchmarks/cpu_smollm2.py   # through torch.compile
    python benchmarks/cpu_smollm2.py --hf                  # transformers' batched generate beside it
"""
import argparse
import resource
import time

import torch

from nanovllm import LLM, SamplingParams
from nanovllm.demo_assets import fetch_smollm2_gguf

QUESTIONS = ["What is the capital of France?", "Give me three tips for writing readable code.",
             "Explain what a GPU does in one paragraph.", "Write a haiku about the sea.",
             "What is 12 times 7?", "Name the planets of the solar system.",
             "How do I boil an egg?", "Why is the sky blue?"]


def timed_generate(llm, prompts, max_tokens: int) -> tuple[float, int]:
    params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
    start = time.perf_counter()
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    return time.perf_counter() - start, sum(len(o.outputs[0].token_ids) for o in outs)


def decode_tok_s(llm, prompts, new_tokens: int, repeats: int) -> float:
    """Median over `repeats` of the decode speed (prefill subtracted)."""
    speeds = []
    for _ in range(repeats):
        t1, n1 = timed_generate(llm, prompts, 1)
        tn, nn = timed_generate(llm, prompts, 1 + new_tokens)
        speeds.append((nn - n1) / (tn - t1))
    return sorted(speeds)[len(speeds) // 2]


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--dtype", default="auto")
    p.add_argument("--eager", action="store_true", help="enforce_eager (no torch.compile even with NANOVLLM_CPU_COMPILE=1)")
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 16])
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    p.add_argument("--hf", action="store_true", help="also time transformers' batched generate")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    path = fetch_smollm2_gguf()
    if path is None:
        raise SystemExit("SmolLM2 could not be fetched (offline?)")
    start = time.perf_counter()
    llm = LLM(path, device="cpu", dtype=args.dtype, enforce_eager=args.eager)
    tok = llm.get_tokenizer()
    prompts = [tok.apply_chat_template([{"role": "user", "content": QUESTIONS[i % len(QUESTIONS)]}],
                                       add_generation_prompt=True, tokenize=True, return_dict=False)
               for i in range(max(args.batch_sizes))]
    for b in sorted(set(args.batch_sizes)):      # the first run of each shape compiles what it needs
        timed_generate(llm, prompts[:b], 4)
    ready = time.perf_counter() - start
    dtype = str(llm.llm_engine.config.torch_dtype).removeprefix("torch.")
    mode = "compiled" if llm.llm_engine.runner.graphs is not None else "eager"
    print(f"SmolLM2-135M-Instruct, {dtype}, {mode}, {torch.get_num_threads()} threads; "
          f"load + first runs: {ready:.1f} s")
    for b in args.batch_sizes:
        speed = decode_tok_s(llm, prompts[:b], args.new_tokens, args.repeats)
        print(f"batch {b:>3}: {speed:8.1f} decode tok/s")
    print(f"peak RSS: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MB")

    if args.hf:
        from transformers import AutoModelForCausalLM
        from nanovllm.gguf import gguf_to_hf_dir
        model = AutoModelForCausalLM.from_pretrained(gguf_to_hf_dir(path), dtype=torch.float32).eval()
        tok.padding_side = "left"
        for b in args.batch_sizes:
            batch = tok.pad({"input_ids": prompts[:b]}, return_tensors="pt")
            start = time.perf_counter()
            with torch.no_grad():
                model.generate(**batch, max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens,
                               do_sample=False, pad_token_id=tok.pad_token_id)
            print(f"transformers float32, batch {b:>3}: {b * args.new_tokens / (time.perf_counter() - start):8.1f} "
                  f"tok/s (prefill included)")


if __name__ == "__main__":
    main()
