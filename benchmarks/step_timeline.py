"""Where a workload's time goes, step by step: host work vs waiting for the device, and each
step's prefill/decode token mix.

    python benchmarks/step_timeline.py                                 # bench.py's workload (CPU preset without a GPU)
    python benchmarks/step_timeline.py --workload chat --plot chat.png # one picture: time and tokens per step
    python benchmarks/step_timeline.py --shape qwen2.5-0.5b --cprofile
    python benchmarks/step_timeline.py --kv-cache-dtype fp8 --phases   # each engine phase's time a step

Each engine step is timed, and so is the part of it spent waiting for the device (the event wait
in ModelRunner.resolve). A step that hardly waits is host-bound: the GPU idled. The table sums the
steps by kind and batch size; --plot draws every step (matplotlib).
"""
import argparse
import contextlib
import cProfile
import gc
import pstats
import time
from collections import defaultdict
from dataclasses import dataclass

import torch

from nanovllm import LLM, SamplingParams
from nanovllm.bench_workload import (CPU_MAX_NUM_SEQS, CPU_SHAPE, GPU_SHAPE, add_workload_args, make_workload,
                                     use_cpu_preset)
from nanovllm.models.shapes import SHAPES, shape_checkpoint_dir
from nanovllm.sampling_params import RequestOutputKind


@dataclass
class Step:
    seconds: float          # the whole engine.step() call
    waiting: float          # of it, waiting for the device
    prefill_tokens: int     # prompt tokens computed by the step it launched
    decode_tokens: int      # sequences it advanced by one token

    @property
    def kind(self) -> str:
        if self.prefill_tokens and self.decode_tokens:
            return "mixed"
        if self.prefill_tokens:
            return "prefill"
        return "decode" if self.decode_tokens else "read-back"


def count_waits(runner) -> None:
    """Add up the runner's waits for the device (ModelRunner.wait_ready) in runner.seconds_waiting."""
    wait, runner.seconds_waiting = runner.wait_ready, 0.0

    def timed(ready):
        start = time.perf_counter()
        try:
            return wait(ready)
        finally:
            runner.seconds_waiting += time.perf_counter() - start
    runner.wait_ready = timed


def engine_counters(engine) -> tuple[int, int, int, float]:
    """(steps launched so far, prefill tokens and decode tokens of the last launched step, seconds
    spent waiting for the device so far). The one place this script reads the engine's internals:
    LLMEngine.num_steps, LLMEngine.last_step and the waits count_waits adds up."""
    last = engine.last_step
    if last is None:                                   # nothing launched yet
        prefill = decode = 0
    else:                                              # a ScheduledBatch: a span per sequence
        # A decode computes one token past the prompt; longer spans are prompt chunks (or recompute).
        decode = sum(n == 1 and start >= seq.num_prompt_tokens
                     for seq, start, n in zip(last.seqs, last.starts, last.num_new_tokens))
        prefill = last.num_tokens - decode
    return engine.num_steps, prefill, decode, engine.runner.seconds_waiting


class GcPauses:
    """Python's garbage collector during the run: collections per generation and their time
    (a full collection walks every tracked object the process holds)."""

    def __init__(self):
        self.counts, self.seconds, self.longest, self._start = [0, 0, 0], 0.0, 0.0, 0.0

    def __enter__(self):
        gc.callbacks.append(self._on_gc)
        return self

    def __exit__(self, *exc):
        gc.callbacks.remove(self._on_gc)

    def _on_gc(self, phase: str, info: dict) -> None:
        if phase == "start":
            self._start = time.perf_counter()
            return
        elapsed = time.perf_counter() - self._start
        self.counts[info["generation"]] += 1
        self.seconds += elapsed
        self.longest = max(self.longest, elapsed)

    def __str__(self) -> str:
        return (f"garbage collector, during the run: {sum(self.counts)} collections (by generation {self.counts}), "
                f"{1000 * self.seconds:.1f} ms in all, the longest {1000 * self.longest:.1f} ms")


def run_steps(engine, profiler: cProfile.Profile | None = None) -> list[Step]:
    """Step the engine until every request is done, timing each call."""
    steps = []
    if not hasattr(engine.runner, "seconds_waiting"):
        count_waits(engine.runner)
    if profiler:
        profiler.enable()
    while engine.has_unfinished_requests():
        launched, _, _, waited = engine_counters(engine)
        start = time.perf_counter()
        engine.step()
        elapsed = time.perf_counter() - start
        now_launched, prefill, decode, now_waited = engine_counters(engine)
        if now_launched == launched:        # the call only read back the last pipelined step
            prefill = decode = 0
        steps.append(Step(elapsed, now_waited - waited, prefill, decode))
    if profiler:
        profiler.disable()
    return steps


def summary(steps: list[Step]) -> str:
    """Steps summed by kind and batch size (64-sequence buckets for decodes)."""
    buckets = defaultdict(lambda: [0, 0.0, 0.0])          # key -> [steps, seconds, seconds waiting]
    for s in steps:
        key = s.kind
        if s.kind == "decode":
            top = min(256, 64 * ((s.decode_tokens + 63) // 64))
            key = f"decode {max(1, top - 63):>3}-{top}"
        b = buckets[key]
        b[0] += 1
        b[1] += s.seconds
        b[2] += s.waiting
    lines = [f"{'steps':<16}{'count':>7}{'total s':>9}{'ms/step':>9}{'host ms':>9}{'wait ms':>9}"]
    for key in sorted(buckets):
        n, secs, wait = buckets[key]
        lines.append(f"{key:<16}{n:>7}{secs:>9.2f}{1000 * secs / n:>9.2f}"
                     f"{1000 * (secs - wait) / n:>9.2f}{1000 * wait / n:>9.2f}")
    # A step that finds the one before it already done on the device (it waits under 50 us) was
    # bound by the host's work, not the GPU's: count those among the steps of 64+ sequences.
    large = [s for s in steps if s.decode_tokens >= 64]
    host_bound = sum(s.waiting < 50e-6 for s in large)
    lines.append(f"steps of 64+ sequences: {len(large)}, of which host-bound (no wait for the device): {host_bound}")
    return "\n".join(lines)


def plot(steps: list[Step], path: str, title: str) -> None:
    """Two panels over the steps: host and device-wait milliseconds, and prefill/decode tokens."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x = list(range(len(steps) + 1))
    def per_step(values):                      # stackplot with step="post" needs one more point
        return values + values[-1:]
    host = per_step([1000 * (s.seconds - s.waiting) for s in steps])
    wait = per_step([1000 * s.waiting for s in steps])
    prefill = per_step([s.prefill_tokens for s in steps])
    decode = per_step([s.decode_tokens for s in steps])
    fig, (time_ax, tokens_ax) = plt.subplots(2, 1, sharex=True, figsize=(12, 6.5))
    time_ax.stackplot(x, host, wait, labels=["host", "waiting for the device"], step="post",
                      colors=["tab:orange", "tab:blue"])
    time_ax.set_ylabel("ms per step")
    time_ax.legend(loc="upper right")
    time_ax.set_title(title)
    tokens_ax.stackplot(x, prefill, decode, labels=["prefill tokens", "decode tokens (sequences)"], step="post",
                        colors=["tab:red", "tab:green"])
    tokens_ax.set_ylabel("tokens per step")
    tokens_ax.set_xlabel("engine step")
    tokens_ax.legend(loc="upper right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=list(SHAPES),
                        help=f"model shape, random weights (default: {GPU_SHAPE}; {CPU_SHAPE} with the CPU preset)")
    add_workload_args(parser)
    parser.add_argument("--max-num-seqs", type=int, help=f"default: 256, or {CPU_MAX_NUM_SEQS} with the CPU preset")
    parser.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    parser.add_argument("--kv-cache-dtype", default="auto", help="LLM's kv_cache_dtype (auto, fp8)")
    parser.add_argument("--plot", metavar="FILE.png", help="draw each step's time and token mix into this file")
    parser.add_argument("--cprofile", action="store_true", help="also print the host's hottest functions")
    parser.add_argument("--phases", action="store_true", help="also print each engine phase's wall time a step")
    parser.add_argument("--trace-prefill", action="store_true", help="torch.profiler table of the first two steps")
    parser.add_argument("--sync-debug", action="store_true", help="warn at every op that syncs with the GPU")
    args = parser.parse_args()

    cpu_preset = use_cpu_preset(args, not torch.cuda.is_available())
    shape = args.shape or (CPU_SHAPE if cpu_preset else GPU_SHAPE)
    max_num_seqs = args.max_num_seqs or (CPU_MAX_NUM_SEQS if cpu_preset else 256)
    workload = make_workload(args, cpu=cpu_preset)
    print(f"workload {args.workload}{' (CPU preset)' if cpu_preset else ''}: {len(workload.prompts)} requests, "
          f"{workload.prompt_tokens} prompt tokens, {workload.output_tokens} output tokens; {shape} shape, "
          f"max_num_seqs {max_num_seqs}", flush=True)
    llm = LLM(shape_checkpoint_dir(shape), load_format="dummy", max_model_len=workload.max_model_len,
              max_num_seqs=max_num_seqs, gpu_memory_utilization=args.gpu_memory_utilization,
              kv_cache_dtype=args.kv_cache_dtype)
    engine = llm.llm_engine
    for i, (prompt, n) in enumerate(zip(workload.prompts, workload.output_lens)):
        engine.add_request(str(i), prompt, SamplingParams(temperature=0.6, max_tokens=n, ignore_eos=True,
                                                          output_kind=RequestOutputKind.FINAL_ONLY))
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        before = torch.cuda.memory_stats()
        if args.sync_debug:
            torch.cuda.set_sync_debug_mode("warn")
    if args.trace_prefill:
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU,
                                                torch.profiler.ProfilerActivity.CUDA]) as trace:
            engine.step()
            engine.step()
            if torch.cuda.is_available():
                torch.cuda.synchronize()
        print(trace.key_averages().table(sort_by="cpu_time_total", row_limit=25))
    profiler = cProfile.Profile() if args.cprofile else None
    begin = time.perf_counter()
    if args.phases:
        from phase_timers import timed_phases      # beside this script (on sys.path when it runs)
    with GcPauses() as gc_pauses, timed_phases() if args.phases else contextlib.nullcontext() as phases:
        steps = run_steps(engine, profiler)
    total = time.perf_counter() - begin
    if profiler:
        pstats.Stats(profiler).sort_stats("tottime").print_stats(25)
    print(f"{shape}: {workload.output_tokens} output tokens in {total:.2f} s = "
          f"{workload.output_tokens / total:.0f} tok/s, {len(steps)} steps")
    print(summary(steps))
    if phases:
        print("engine phases, wall time (resolve includes wait_ready):")
        phases.print(len(steps))
    print(gc_pauses)
    if torch.cuda.is_available():
        stats = torch.cuda.memory_stats()
        print("allocator, during the run: " + ", ".join(f"{k} {stats.get(k, 0) - before.get(k, 0)}" for k in
                                       ("num_alloc_retries", "num_device_alloc", "num_device_free", "num_sync_all_streams")))
    if args.plot:
        device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "CPU"
        plot(steps, args.plot, f"{args.workload} workload, {shape} shape, {device}: "
                               f"{workload.output_tokens / total:.0f} output tok/s, {len(steps)} steps")
        print(f"plot: {args.plot}")


if __name__ == "__main__":
    main()
