"""Beam search with nanovllm (vLLM's `LLM.beam_search`).

    python examples/beam_search.py                  # the demo model, any CPU
    python examples/beam_search.py --model Qwen/Qwen3-0.6B --device cuda --beam-width 4

Each beam is an ordinary request per step; beams of one prompt share its KV blocks through the
prefix cache. The sequences come back best first, by vLLM's length-penalised score.
"""
import argparse
import time

from nanovllm import LLM
from nanovllm.beam_search import get_beam_search_score
from nanovllm.sampling_params import BeamSearchParams


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="demo", help="checkpoint directory, .gguf file or Hugging Face "
                                                        "repo id (default: demo, the built-in demo model)")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--beam-width", type=int, default=3)
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--length-penalty", type=float, default=1.0)
    args = parser.parse_args()

    llm = LLM(args.model, device=args.device)
    tokenizer = llm.get_tokenizer()
    questions = ["What is the capital of France?", "Name a fruit that is yellow."]
    # Chat prompts, as token ids (the template already holds the special tokens).
    prompts = [{"prompt_token_ids": tokenizer.apply_chat_template(
        [{"role": "user", "content": q}], add_generation_prompt=True, tokenize=True, return_dict=False)}
        for q in questions]
    params = BeamSearchParams(beam_width=args.beam_width, max_tokens=args.max_tokens,
                              length_penalty=args.length_penalty)
    start = time.perf_counter()
    outputs = llm.beam_search(prompts, params)
    print(f"Beam search of {len(prompts)} prompts in {time.perf_counter() - start:.1f} s")
    for question, prompt, output in zip(questions, prompts, outputs):
        print(f"\n{question!r}")
        for rank, seq in enumerate(output.sequences, 1):
            # `seq.text` is the prompt and the completion (as vLLM's); show the completion alone.
            completion = tokenizer.decode(seq.tokens[len(prompt["prompt_token_ids"]):], skip_special_tokens=True)
            score = get_beam_search_score(seq.tokens, seq.cum_logprob, seq.stop_reason, args.length_penalty)
            print(f"  {rank}. score {score:7.4f}  logprob {seq.cum_logprob:8.3f}  [{seq.finish_reason}] {completion!r}")


if __name__ == "__main__":
    main()
