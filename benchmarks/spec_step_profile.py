"""Where a speculative step's time goes: plain steps against n-gram verifying steps on a
SmolLM2-shaped model with dummy weights, prompts that repeat a 40-token pattern (so proposals
are found), greedy; then cProfile's hottest functions of the speculative run.

    python benchmarks/spec_step_profile.py                # batch 1, k = 4, 128 new tokens
    python benchmarks/spec_step_profile.py --batch 8 -k 6 --top 40 [--sort cumulative]
    python benchmarks/spec_step_profile.py --shape smollm2-135m-gptq --top 0 --gpu-profile
    python benchmarks/spec_step_profile.py --shape smollm2-135m-gptq -k 7 --top 0 --phases

--phases times the engine's phases (proposing, scheduling, inputs, launch, waiting for the
device, processing) by wall clock, with no profiler's overhead: the host work of a verifying
step is in series with its device time, unlike a plain step's.
"""
import argparse
import contextlib
import cProfile
import pstats
import random
import time

from nanovllm import LLM, SamplingParams
from nanovllm.kernels import w4a16_gemm
from nanovllm.models.shapes import SHAPES, shape_checkpoint_dir
from phase_timers import timed_phases
from prefill import print_gpu_time_by_kernel


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", default="smollm2-135m", choices=list(SHAPES))
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("-k", "--num-speculative-tokens", type=int, default=4)
    p.add_argument("--tokens", type=int, default=128, help="new tokens per request")
    p.add_argument("--top", type=int, default=30, help="functions to list (0: no cProfile)")
    p.add_argument("--sort", default="tottime", choices=["tottime", "cumulative"], help="order of the list")
    p.add_argument("--gpu-profile", action="store_true", help="then each run's GPU time by kernel")
    p.add_argument("--phases", action="store_true", help="each run's wall-clock time by engine phase")
    p.add_argument("--gemv-max-rows", type=int, default=None,
                   help="4-bit weights: rows up to which the CUDA-core kernel runs (default: w4a16_gemm.GEMV_MAX_ROWS)")
    args = p.parse_args()
    if args.gemv_max_rows is not None:
        w4a16_gemm.set_gemv_max_rows(args.gemv_max_rows)
    rng = random.Random(0)
    prompts = [[rng.randint(100, 5000) for _ in range(40)] * 5 for _ in range(args.batch)]
    params = SamplingParams(temperature=0, max_tokens=args.tokens, ignore_eos=True)
    spec = {"method": "ngram", "num_speculative_tokens": args.num_speculative_tokens,
            "prompt_lookup_max": 4, "prompt_lookup_min": 2}
    for label, config in (("plain", None), ("ngram", spec)):
        llm = LLM(shape_checkpoint_dir(args.shape), load_format="dummy", max_model_len=1024,
                  speculative_config=config)
        llm.generate(prompts[:2], params, use_tqdm=False)             # warm-up
        engine = llm.llm_engine
        steps_before = engine.num_steps
        profile = cProfile.Profile() if config and args.top > 0 else None
        if profile:
            profile.enable()
        with timed_phases() if args.phases else contextlib.nullcontext() as phases:
            start = time.perf_counter()
            outs = llm.generate(prompts, params, use_tqdm=False)
            seconds = time.perf_counter() - start
        if profile:
            profile.disable()
        steps = engine.num_steps - steps_before
        tokens = sum(len(o.outputs[0].token_ids) for o in outs)
        line = f"{label}, batch {args.batch}: {tokens} tokens in {steps} steps, {seconds:.3f} s, " \
               f"{1000 * seconds / steps:.2f} ms a step"
        if config:
            m = engine.speculator.metrics
            line += f"{' (under cProfile)' if profile else ''}; {m.num_accepted_tokens} of {m.num_draft_tokens} proposed tokens " \
                    f"accepted, in {m.num_drafts} proposals"
        print(line, flush=True)
        if phases is not None:
            phases.print(steps)
        if profile:
            pstats.Stats(profile).sort_stats(args.sort).print_stats(args.top)
        if args.gpu_profile:
            print_gpu_time_by_kernel(lambda: llm.generate(prompts, params, use_tqdm=False))
        engine.shutdown()


if __name__ == "__main__":
    main()
