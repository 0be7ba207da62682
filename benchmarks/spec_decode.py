"""Speculative decoding's figures: per-token latency at batch 1 and throughput at batch 64 with
and without n-gram speculation, on prompts whose answers copy their input, and the mean tokens
emitted per verifying step.

    python benchmarks/spec_decode.py                        # the demo model (SmolLM2-135M-Instruct)
    python benchmarks/spec_decode.py --model DIR_OR_GGUF -k 4
    python benchmarks/spec_decode.py --disable-by-batch-size 8   # batch 64 then runs plain steps
    python benchmarks/spec_decode.py --gemv-max-rows 1           # 4-bit weights: the CUDA-core kernel at 1 row only
    python benchmarks/spec_decode.py --draft random              # a draft model: random weights (2 layers,
                                                                 # the target's vocabulary); or `same`, or a path

Workloads (chat prompts built from passages of Python's own reference text, pydoc_data.topics):
    repeat     "Repeat the following text exactly"
    edit       "Rewrite the following text with every 'the' in capitals"
    summarise  "Summarise the following text" (copies less: the hard case for n-gram)
Greedy decoding; the tokens must be equal with and without speculation (the script counts how
many requests agree).
"""
import argparse
import tempfile
import time

import torch

from pydoc_data.topics import topics

from nanovllm import LLM, SamplingParams
from nanovllm.kernels import w4a16_gemm

INSTRUCTIONS = {
    "repeat": "Repeat the following text exactly, word for word:\n\n",
    "edit": "Rewrite the following text with every occurrence of the word 'the' in capitals, otherwise unchanged:\n\n",
    "summarise": "Summarise the following text in a few sentences:\n\n",
}


def passages(count: int, words: int = 120) -> list[str]:
    texts = []
    for name in sorted(topics):
        body = " ".join(topics[name].split())
        if len(body.split()) >= words:
            texts.append(" ".join(body.split()[:words]))
    return [texts[i % len(texts)] for i in range(count)]


def run(llm: LLM, conversations: list, max_tokens: int) -> tuple[float, list[list[int]]]:
    params = SamplingParams(temperature=0, max_tokens=max_tokens)
    start = time.perf_counter()
    outs = llm.chat(conversations, params, use_tqdm=False)
    return time.perf_counter() - start, [list(o.outputs[0].token_ids) for o in outs]


def random_draft(target: LLM, path: str) -> str:
    """A 2-layer Llama with random weights and the target's vocabulary and tokenizer, saved to `path`."""
    from transformers import LlamaConfig, LlamaForCausalLM
    vocab = target.llm_engine.config.hf_config.vocab_size
    config = LlamaConfig(vocab_size=vocab, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    torch.manual_seed(0)
    LlamaForCausalLM(config).to(torch.float16).save_pretrained(path)
    target.get_tokenizer().save_pretrained(path)
    return path


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="demo")
    p.add_argument("-k", "--num-speculative-tokens", type=int, default=4)
    p.add_argument("--lookup-max", type=int, default=4)
    p.add_argument("--lookup-min", type=int, default=2)
    p.add_argument("--disable-by-batch-size", type=int, default=None,
                   help="speculative_config's disable_by_batch_size: larger batches run plain steps")
    p.add_argument("--max-tokens", type=int, default=256)
    p.add_argument("--batches", type=int, nargs="+", default=[1, 64])
    p.add_argument("--single-requests", type=int, default=4, help="requests timed one at a time for batch 1")
    p.add_argument("--workloads", nargs="+", default=list(INSTRUCTIONS), choices=list(INSTRUCTIONS))
    p.add_argument("--draft", default=None,
                   help="speculate with a draft model instead of n-grams: a path, `same` (the target: every "
                        "proposal accepted) or `random` (random weights: nearly none)")
    p.add_argument("--gemv-max-rows", type=int, default=None,
                   help="4-bit weights: rows up to which the CUDA-core kernel runs (default: w4a16_gemm.GEMV_MAX_ROWS)")
    args = p.parse_args()
    if args.gemv_max_rows is not None:
        w4a16_gemm.set_gemv_max_rows(args.gemv_max_rows)
    spec = {"method": "ngram", "num_speculative_tokens": args.num_speculative_tokens,
            "prompt_lookup_max": args.lookup_max, "prompt_lookup_min": args.lookup_min,
            "disable_by_batch_size": args.disable_by_batch_size}
    method = "ngram" if args.draft is None else "draft"
    random_dir = None
    results = {}        # (workload, batch, label) -> (seconds per output token, tokens, mean acceptance)
    for label, config in (("plain", None), (method, spec)):
        if label == "draft":
            draft = {"same": args.model, "random": random_dir}.get(args.draft, args.draft)
            config = {"model": draft, "num_speculative_tokens": args.num_speculative_tokens,
                      "disable_by_batch_size": args.disable_by_batch_size}
        llm = LLM(args.model, speculative_config=config, max_model_len=2048)
        llm.generate("Hello", SamplingParams(max_tokens=8), use_tqdm=False)      # warm-up
        for workload in args.workloads:
            for batch in args.batches:
                convs = [[{"role": "user", "content": INSTRUCTIONS[workload] + text}] for text in passages(max(batch, args.single_requests))]
                before = llm.llm_engine.speculator.metrics if config else None
                before = (before.num_accepted_tokens, before.num_drafts) if before else None
                steps_before = llm.llm_engine.num_steps
                seconds, tokens = 0.0, []
                groups = [convs[i:i + 1] for i in range(args.single_requests)] if batch == 1 else [convs[:batch]]
                for group in groups:
                    t, toks = run(llm, group, args.max_tokens)
                    seconds += t
                    tokens += toks
                accept = verifying = None
                steps = llm.llm_engine.num_steps - steps_before
                if config:
                    m = llm.llm_engine.speculator.metrics
                    drafts = m.num_drafts - before[1]
                    accept = 1 + (m.num_accepted_tokens - before[0]) / drafts if drafts else None
                    verifying = f", {drafts} of {steps} steps verified proposals" if batch == 1 else ""
                n = sum(map(len, tokens))
                results[workload, batch, label] = (seconds / n, tokens, accept)
                per_token = 1000 * seconds / n if batch == 1 else None
                print(f"[{label}] {workload} batch {batch}: {n} tokens in {seconds:.2f} s ({n / seconds:,.0f} tok/s"
                      + (f", {per_token:.2f} ms/token" if per_token else "") + ")"
                      + (f", {accept:.2f} tokens per verifying step" if accept else "") + (verifying or ""), flush=True)
        if label == "plain" and args.draft == "random":       # built from the target's vocabulary
            random_dir = random_draft(llm, tempfile.mkdtemp(prefix="nanovllm-draft-"))
        del llm
    print(f"\n{'workload':<10} {'batch':>5} {'plain':>12} {method:>12} {'speed-up':>9} {'tokens/verify':>14} {'same tokens':>12}")
    for workload in args.workloads:
        for batch in args.batches:
            plain, ngram = results[workload, batch, "plain"], results[workload, batch, method]
            same = sum(a == b for a, b in zip(plain[1], ngram[1]))
            unit = "ms/token" if batch == 1 else "us/token"
            scale = 1e3 if batch == 1 else 1e6
            print(f"{workload:<10} {batch:>5} {scale * plain[0]:>8.3f} {unit[:2]} {scale * ngram[0]:>8.3f} {unit[:2]} "
                  f"{plain[0] / ngram[0]:>8.2f}x {ngram[2] or 0:>14.2f} {same:>6}/{len(plain[1])}")


if __name__ == "__main__":
    main()
