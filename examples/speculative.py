"""Speculative decoding with nanovllm (vLLM's `speculative_config`): n-gram proposals.

    python examples/speculative.py                         # the demo model, any CPU
    python examples/speculative.py --model Qwen/Qwen3-0.6B --device cuda -k 4

The prompt asks the model to copy text with a small change, the kind of output n-gram
("prompt lookup") proposals guess well: the last few tokens are looked up in the prompt and
what followed them there is proposed; the model checks all proposals in one forward pass.
Greedy tokens are the same with and without speculation; the script prints both, the
acceptance and the number of steps.
"""
import argparse
import time

from nanovllm import LLM, SamplingParams

CODE = '''def mean(values):
    total = 0
    for value in values:
        total += value
    return total / len(values)
'''


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="demo", help="checkpoint directory, .gguf file or Hugging Face "
                                                        "repo id (default: demo, the built-in demo model)")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("-k", "--num-speculative-tokens", type=int, default=4)
    parser.add_argument("--max-tokens", type=int, default=64)
    args = parser.parse_args()

    messages = [{"role": "user", "content": f"Rename `values` to `numbers` in this code and show all of it:\n{CODE}"}]
    params = SamplingParams(temperature=0, max_tokens=args.max_tokens)
    speculative_config = {"method": "ngram", "num_speculative_tokens": args.num_speculative_tokens,
                          "prompt_lookup_max": 4, "prompt_lookup_min": 2}
    texts = []
    for config in (None, speculative_config):
        llm = LLM(args.model, device=args.device, speculative_config=config)
        llm.generate("Hello", SamplingParams(max_tokens=2), use_tqdm=False)        # warm-up
        steps_before = llm.llm_engine.num_steps
        start = time.perf_counter()
        out = llm.chat(messages, params, use_tqdm=False)[0]
        seconds = time.perf_counter() - start
        engine = llm.llm_engine
        label = "plain" if config is None else f"n-gram, k={args.num_speculative_tokens}"
        steps = engine.num_steps - steps_before
        print(f"\n[{label}] {len(out.outputs[0].token_ids)} tokens in {steps} steps, {seconds:.2f} s")
        if config is not None:
            m = out.metrics          # this request's counts (engine.speculator.metrics: all requests')
            print(f"proposed {m.num_draft_tokens} tokens, accepted {m.num_accepted_tokens} "
                  f"({m.acceptance_rate:.0%}); tokens per verifying step: {m.mean_acceptance_length:.2f}")
        print(out.outputs[0].text)
        texts.append(out.outputs[0].text)
        del llm
    print("\nsame text with and without speculation:", texts[0] == texts[1])


if __name__ == "__main__":
    main()
