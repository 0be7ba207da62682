"""CPU throughput on the real demo model: nanovllm vs transformers' batched `generate`.

SmolLM2-135M-Instruct (Q4_1 GGUF, dequantized to float32), the same chat prompts for both,
greedy, a fixed number of new tokens per prompt (ignore EOS), all prompts in one batch.

    python benchmarks/cpu_smollm2.py [--num-prompts 16] [--max-tokens 64]
"""
import argparse
import time

import torch

from nanovllm import LLM, SamplingParams
from nanovllm.demo_assets import fetch_smollm2_gguf
from nanovllm.gguf import gguf_to_hf_dir

QUESTIONS = ["What is the capital of France?", "Give me three tips for writing readable code.",
             "Explain what a GPU does in one paragraph.", "Write a haiku about the sea.",
             "What is 12 times 7?", "Name the planets of the solar system.",
             "How do I boil an egg?", "Why is the sky blue?"]


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--num-prompts", type=int, default=16)
    p.add_argument("--max-tokens", type=int, default=64)
    args = p.parse_args()
    path = fetch_smollm2_gguf()
    if path is None:
        raise SystemExit("SmolLM2 could not be fetched (offline?)")
    torch.set_num_threads(torch.get_num_threads())
    llm = LLM(path, device="cpu", dtype="float32")
    tok = llm.get_tokenizer()
    conversations = [[{"role": "user", "content": QUESTIONS[i % len(QUESTIONS)]}] for i in range(args.num_prompts)]
    prompts = [tok.apply_chat_template(c, add_generation_prompt=True, tokenize=True, return_dict=False)
               for c in conversations]
    params = SamplingParams(temperature=0, max_tokens=args.max_tokens, ignore_eos=True)
    llm.generate(prompts[:1], SamplingParams(max_tokens=4), use_tqdm=False)          # warm-up
    start = time.perf_counter()
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    ours = time.perf_counter() - start
    tokens = sum(len(o.outputs[0].token_ids) for o in outs)

    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(gguf_to_hf_dir(path), dtype=torch.float32).eval()
    tok.padding_side = "left"
    batch = tok.pad({"input_ids": prompts}, return_tensors="pt")
    start = time.perf_counter()
    with torch.no_grad():
        out = model.generate(**batch, max_new_tokens=args.max_tokens, min_new_tokens=args.max_tokens,
                             do_sample=False, pad_token_id=tok.pad_token_id)
    theirs = time.perf_counter() - start
    hf_tokens = (out.shape[1] - batch["input_ids"].shape[1]) * out.shape[0]
    print(f"{'engine':<14} {'tokens':>7} {'seconds':>8} {'tok/s':>8}")
    print(f"{'nanovllm':<14} {tokens:>7} {ours:>8.2f} {tokens / ours:>8.1f}")
    print(f"{'transformers':<14} {hf_tokens:>7} {theirs:>8.2f} {hf_tokens / theirs:>8.1f}")
    print(f"threads: {torch.get_num_threads()}, prompts: {args.num_prompts}, new tokens each: {args.max_tokens}")


if __name__ == "__main__":
    main()
