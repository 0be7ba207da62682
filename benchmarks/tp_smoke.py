"""Tensor parallelism on two GPUs, step by step, with stack dumps if it hangs.

    PYTHONFAULTHANDLER=1 PYTHONPATH=. python benchmarks/tp_smoke.py [--eager] [--hang-s 60]

Builds a Qwen3-0.6B-shaped engine with dummy weights on 2 ranks, then drives a few requests
through `engine.step()` and prints every step. If no step completes for --hang-s seconds, it
prints rank 0's Python stacks and sends SIGABRT to the workers (with PYTHONFAULTHANDLER=1 in
the environment they print theirs), so a hang shows where each rank waits.
"""
import argparse
import faulthandler
import os
import signal
import sys
import threading
import time

from nanovllm import LLM, SamplingParams
from nanovllm.models.shapes import shape_checkpoint_dir


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--eager", action="store_true", help="no CUDA graphs")
    parser.add_argument("--hang-s", type=float, default=60.0)
    args = parser.parse_args()
    start = time.perf_counter()
    llm = LLM(shape_checkpoint_dir("qwen3-0.6b"), load_format="dummy", tensor_parallel_size=2,
              max_model_len=1024, enforce_eager=args.eager)
    print(f"engine up in {time.perf_counter() - start:.1f} s", flush=True)
    engine = llm.llm_engine
    last_progress = [time.monotonic()]

    def watchdog():
        while True:
            time.sleep(1.0)
            if time.monotonic() - last_progress[0] > args.hang_s:
                print(f"no step finished for {args.hang_s:.0f} s: stacks follow", flush=True)
                faulthandler.dump_traceback(all_threads=True)
                for pid in engine.runner.worker_pids:
                    os.kill(pid, signal.SIGABRT)
                time.sleep(3.0)
                os._exit(1)

    threading.Thread(target=watchdog, daemon=True).start()
    for i in range(4):
        engine.add_request(str(i), [1 + i] * (50 + 30 * i), SamplingParams(max_tokens=40, ignore_eos=True))
    step = 0
    while engine.has_unfinished_requests():
        t = time.perf_counter()
        engine.step()
        last_progress[0] = time.monotonic()
        batch = engine.last_step
        if step < 5 or step % 10 == 0:
            print(f"step {step}: {'decode' if batch.is_decode else 'mixed'} of {batch.num_tokens} tokens, "
                  f"{1000 * (time.perf_counter() - t):.1f} ms", flush=True)
        step += 1
    print(f"done: {step} steps", flush=True)
    llm.llm_engine.shutdown()
    sys.exit(0)


if __name__ == "__main__":
    main()
