"""Where bench.py's time goes, step by step: host work vs waiting for the GPU, by batch size.

    PYTHONPATH=. python benchmarks/step_timeline.py [--shape qwen3-0.6b] [workload flags]

Each engine step is timed, and so is the part of it spent waiting for the device (the event
wait in ModelRunner.resolve). A step that hardly waits is host-bound: the GPU idled.
"""
import argparse
import cProfile
import pstats
import time
from collections import defaultdict

import torch

from nanovllm import LLM, SamplingParams
from nanovllm.bench_workload import add_workload_args, make_workload
from nanovllm.models.shapes import shape_checkpoint_dir
from nanovllm.sampling_params import RequestOutputKind

parser = argparse.ArgumentParser()
parser.add_argument("--shape", default="qwen3-0.6b")
parser.add_argument("--gpu-memory-utilization", type=float, default=0.9)
parser.add_argument("--cprofile", action="store_true", help="also print the host's hottest functions")
parser.add_argument("--trace-prefill", action="store_true", help="torch.profiler table of the first two steps")
parser.add_argument("--sync-debug", action="store_true", help="warn at every op that syncs with the GPU")
add_workload_args(parser)
args = parser.parse_args()
workload = make_workload(args)
llm = LLM(shape_checkpoint_dir(args.shape), load_format="dummy", max_model_len=4096,
          gpu_memory_utilization=args.gpu_memory_utilization)
engine = llm.llm_engine

for i, (prompt, n) in enumerate(zip(workload.prompts, workload.output_lens)):
    engine.add_request(str(i), prompt, SamplingParams(temperature=0.6, max_tokens=n, ignore_eos=True,
                                                      output_kind=RequestOutputKind.FINAL_ONLY))
# bucket -> [steps, seconds, seconds waiting]
buckets = defaultdict(lambda: [0, 0.0, 0.0])
if torch.cuda.is_available():
    torch.cuda.synchronize()
    before = torch.cuda.memory_stats()
    if args.sync_debug:
        torch.cuda.set_sync_debug_mode("warn")
profiler = cProfile.Profile() if args.cprofile else None
if args.trace_prefill:
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU,
                                            torch.profiler.ProfilerActivity.CUDA]) as trace:
        engine.step()
        engine.step()
        torch.cuda.synchronize()
    print(trace.key_averages().table(sort_by="cpu_time_total", row_limit=25))
begin = time.perf_counter()
if profiler:
    profiler.enable()
while engine.has_unfinished_requests():
    waited = engine.runner.seconds_waiting
    start = time.perf_counter()
    engine.step()
    elapsed = time.perf_counter() - start
    is_prefill, num_tokens = engine.last_step
    key = "prefill" if is_prefill else f"decode {min(256, 64 * ((num_tokens + 63) // 64)) - 63:>3}-{min(256, 64 * ((num_tokens + 63) // 64))}"
    b = buckets[key]
    b[0] += 1
    b[1] += elapsed
    b[2] += engine.runner.seconds_waiting - waited
total = time.perf_counter() - begin
if profiler:
    profiler.disable()
    pstats.Stats(profiler).sort_stats("tottime").print_stats(25)
print(f"{args.shape}: {workload.output_tokens} tokens in {total:.2f} s = {workload.output_tokens / total:.0f} tok/s")
print(f"{'steps':<16}{'count':>7}{'total s':>9}{'ms/step':>9}{'host ms':>9}{'wait ms':>9}")
for key in sorted(buckets):
    n, secs, wait = buckets[key]
    print(f"{key:<16}{n:>7}{secs:>9.2f}{1000 * secs / n:>9.2f}{1000 * (secs - wait) / n:>9.2f}{1000 * wait / n:>9.2f}")
if torch.cuda.is_available():
    stats = torch.cuda.memory_stats()
    print("allocator, during the run: " + ", ".join(f"{k} {stats.get(k, 0) - before.get(k, 0)}" for k in
                                   ("num_alloc_retries", "num_device_alloc", "num_device_free", "num_sync_all_streams")))
