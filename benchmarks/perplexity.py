"""Perplexity of a model on English prose every Python ships: what a quantization setting costs.

The text is `pydoc_data.topics` (the help texts of Python's language reference, ~465,000
characters), its topics in sorted order, joined by blank lines. Its first --tokens tokens are cut
into windows of --window tokens, each scored on its own (no overlap: a window's first token is
not scored, the others see the window's earlier tokens). The engine returns each prompt token's
logprob (SamplingParams(prompt_logprobs=0)); perplexity = exp(mean negative logprob).

    python benchmarks/perplexity.py                                   # the demo model, 16-bit/float32 weights
    python benchmarks/perplexity.py --kv-cache-dtype fp8              # float8 KV cache
    python benchmarks/perplexity.py --quantization gguf               # a GGUF's Q4_0/Q4_1/Q8_0 kept (CPU: asked for)
    python benchmarks/perplexity.py --model Qwen/Qwen3-0.6B --device cuda --dtype bfloat16 --quantization fp8

Lower is better; compare settings on one model with the same --tokens and --window.
"""
import argparse
import math
import time

from nanovllm import LLM, SamplingParams


def prose() -> str:
    from pydoc_data.topics import topics
    return "\n\n".join(topics[name] for name in sorted(topics))


def windows(token_ids: list[int], size: int, limit: int) -> list[list[int]]:
    token_ids = token_ids[:limit]
    return [token_ids[i:i + size] for i in range(0, len(token_ids) - 1, size) if len(token_ids[i:i + size]) > 1]


def perplexity(llm: LLM, token_ids: list[int], window: int, limit: int) -> tuple[float, int]:
    """(perplexity, tokens scored) of llm on token_ids, in windows of `window` tokens."""
    chunks = windows(token_ids, window, limit)
    params = SamplingParams(temperature=0, max_tokens=1, prompt_logprobs=0)
    outs = llm.generate([{"prompt_token_ids": c} for c in chunks], params, use_tqdm=False)
    nll, count = 0.0, 0
    for chunk, out in zip(chunks, outs):
        for token, logprobs in zip(chunk[1:], out.prompt_logprobs[1:]):
            nll -= logprobs[token].logprob
            count += 1
    return math.exp(nll / count), count


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="demo", help="checkpoint directory, .gguf file, repo id or 'demo'")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--dtype", default="auto")
    p.add_argument("--quantization", default=None, help="fp8 | gptq | awq | gguf (default: the checkpoint's)")
    p.add_argument("--kv-cache-dtype", default="auto", help="auto | fp8 | fp8_e4m3")
    p.add_argument("--calculate-kv-scales", action="store_true", help="fp8 KV cache: scales from the first batch")
    p.add_argument("--tokens", type=int, default=16384, help="tokens of the text to score (default 16384)")
    p.add_argument("--window", type=int, default=512, help="tokens per scored window (default 512)")
    p.add_argument("--eager", action="store_true", help="enforce_eager (no CUDA graphs / compiled CPU steps)")
    args = p.parse_args()

    start = time.perf_counter()
    llm = LLM(args.model, device=args.device, dtype=args.dtype, quantization=args.quantization,
              kv_cache_dtype=args.kv_cache_dtype, calculate_kv_scales=args.calculate_kv_scales,
              max_model_len=args.window + 1, enforce_eager=args.eager, max_num_seqs=16)
    loaded = time.perf_counter() - start
    token_ids = llm.get_tokenizer().encode(prose(), add_special_tokens=False)
    start = time.perf_counter()
    ppl, count = perplexity(llm, token_ids, args.window, args.tokens)
    config = llm.llm_engine.config
    print(f"model {args.model}  dtype {str(config.torch_dtype)[6:]}  quantization "
          f"{config.quant_config.method if config.quant_config else None}  kv_cache_dtype {args.kv_cache_dtype}"
          f"{' (scales from the first batch)' if args.calculate_kv_scales else ''}")
    print(f"perplexity {ppl:.3f} over {count} tokens (windows of {args.window}; text: pydoc_data.topics, "
          f"{len(token_ids)} tokens in all)  load {loaded:.1f} s, scoring {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    main()
