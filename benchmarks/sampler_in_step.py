"""What each sampling setting adds to a whole decode step at 256 sequences, end to end.

    PYTHONPATH=. python benchmarks/sampler_in_step.py [--shape qwen3-0.6b] [--profile SETTING] [workload flags]

bench.py's 256 prompts (100 to 1,024 tokens) on the Qwen3-0.6B shape with dummy weights, all
running at once; for each setting of bench_sampler.py, the same requests are run until every
one is decoding, then 64 decode steps are timed (wall time per `engine.step()`: the GPU's
step, or the host's when that is longer, since decode is pipelined). The first column is the
step with greedy sampling; the others say how much longer each setting's step is. "waiting"
is the part of a step the host spent waiting for the GPU (ModelRunner's event wait): near
zero means the host is the bound (its work per step is longer than the GPU's), so host work
then adds to the step one for one. --profile SETTING also prints that setting's hottest host
functions (cProfile) over its timed steps.
"""
import argparse
import cProfile
import pstats
import sys
import time

import torch

from nanovllm import LLM, SamplingParams
from nanovllm.bench_workload import add_workload_args, make_workload
from nanovllm.models.shapes import shape_checkpoint_dir
from nanovllm.sampling_params import RequestOutputKind

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from bench_sampler import SETTINGS  # noqa: E402
from phase_timers import timed_phases  # noqa: E402

WARMUP, TIMED = 8, 64


def decode_step_ms(engine, prompts: list[list[int]], kwargs: dict, profile: bool = False) -> tuple[float, float]:
    """-> (ms per decode step, ms of it waiting for the GPU)."""
    params = SamplingParams(**kwargs, ignore_eos=True, max_tokens=WARMUP + TIMED + 64,
                            output_kind=RequestOutputKind.FINAL_ONLY)
    ids = [f"{id(kwargs)}-{i}" for i in range(len(prompts))]
    engine.last_step = None
    for request_id, prompt in zip(ids, prompts):
        engine.add_request(request_id, prompt, params)
    while engine.last_step is None or not engine.last_step.is_decode or len(engine.last_step.seqs) < len(prompts):
        engine.step()                           # prompts, until a decode step runs every sequence
    for _ in range(WARMUP):
        engine.step()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    profiler = cProfile.Profile() if profile else None
    with timed_phases() as times:           # its ModelRunner.wait_ready: the waits for the GPU
        start = time.perf_counter()
        if profiler:
            profiler.enable()
        for _ in range(TIMED):
            engine.step()
        seconds = time.perf_counter() - start
    if profiler:
        profiler.disable()
        pstats.Stats(profiler).sort_stats("tottime").print_stats(25)
    engine.abort_request(ids)
    while engine.has_unfinished_requests():
        engine.step()
    return 1000 * seconds / TIMED, 1000 * times.seconds["ModelRunner.wait_ready"] / TIMED


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--shape", default="qwen3-0.6b")
    parser.add_argument("--profile", default=None, help="a setting's name: cProfile its timed steps")
    add_workload_args(parser)
    args = parser.parse_args()
    prompts = make_workload(args).prompts
    llm = LLM(shape_checkpoint_dir(args.shape), load_format="dummy", max_model_len=4096)
    engine = llm.llm_engine
    decode_step_ms(engine, prompts, dict(temperature=0.0))      # warm-up (and the prefix cache)
    base = None
    print(f"{'setting':<24} {'decode step ms':>14} {'vs greedy':>10} {'waiting ms':>11}")
    for name, kwargs in SETTINGS.items():
        ms, waiting = decode_step_ms(engine, prompts, kwargs, profile=name == args.profile)
        base = ms if base is None else base
        print(f"{name:<24} {ms:>14.2f} {100 * (ms - base) / base:>+9.1f}% {waiting:>11.2f}", flush=True)


if __name__ == "__main__":
    main()
