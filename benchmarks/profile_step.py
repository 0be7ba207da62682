"""Where a decode step's time goes: host (cProfile) and device (torch.profiler).

    PYTHONPATH=. python benchmarks/profile_step.py [BATCH] [SHAPE] [KV_CACHE_DTYPE] [--phases]   # default: 1 qwen3-0.6b auto

--phases: also each engine phase's wall-clock time per step (phase_timers.py), which cProfile's
overhead distorts at large batches.
"""
import cProfile
import pstats
import random
import sys
import time

import torch

from nanovllm import LLM, SamplingParams
from nanovllm.models.shapes import shape_checkpoint_dir
from nanovllm.sampling_params import RequestOutputKind
from phase_timers import timed_phases

phases = "--phases" in sys.argv
argv = [a for a in sys.argv if a != "--phases"]
batch = int(argv[1]) if len(argv) > 1 else 1
shape = argv[2] if len(argv) > 2 else "qwen3-0.6b"
kv_cache_dtype = argv[3] if len(argv) > 3 else "auto"
llm = LLM(shape_checkpoint_dir(shape), load_format="dummy", max_model_len=4096, kv_cache_dtype=kv_cache_dtype)
engine = llm.llm_engine
rng = random.Random(0)
for i in range(batch):
    engine.add_request(str(i), [rng.randint(0, 10000) for _ in range(1024)],
                       SamplingParams(temperature=0.6, max_tokens=400, ignore_eos=True,
                                      output_kind=RequestOutputKind.FINAL_ONLY))  # as LLM.generate
while engine.scheduler.waiting:
    engine.step()
for _ in range(20):
    engine.step()
torch.cuda.synchronize()
start = time.perf_counter()
for _ in range(50):
    engine.step()
torch.cuda.synchronize()
print(f"batch {batch}: {1000 * (time.perf_counter() - start) / 50:.2f} ms per decode step")
if phases:
    with timed_phases() as times:
        for _ in range(50):
            engine.step()
    torch.cuda.synchronize()
    times.print(50)
prof = cProfile.Profile()
prof.enable()
for _ in range(50):
    engine.step()
prof.disable()
pstats.Stats(prof).sort_stats("tottime").print_stats(22)
with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]) as p:
    for _ in range(10):
        engine.step()
    torch.cuda.synchronize()
print(p.key_averages().table(sort_by="cuda_time_total", row_limit=18))
