"""What the data-parallel driver costs: nano-vllm's workload (bench.py's) through a plain `LLM`,
then through `LLM(..., data_parallel_size=N, distributed_executor_backend=B)`, on the same
machine. Prints the time to the first finished request and the total time of each.

    python benchmarks/scale_out.py                          # one GPU: plain LLM vs the engine in one Ray actor
    python benchmarks/scale_out.py --data-parallel-size 2   # two GPUs: plain LLM (one GPU) vs two Ray replicas
"""
import argparse
import multiprocessing
import time
from concurrent.futures import ProcessPoolExecutor

import torch

from nanovllm import LLM, SamplingParams
from nanovllm.bench_workload import add_workload_args, make_workload, use_cpu_preset
from nanovllm.models.shapes import SHAPES, shape_checkpoint_dir
from nanovllm.sampling_params import RequestOutputKind


def timed_run(llm: LLM, workload) -> tuple[float, float, int]:
    """(seconds to the first finished request, seconds to the last, output tokens), driving the
    engine as generate does, so the first finished request is seen when it finishes."""
    engine = llm.llm_engine
    params = [SamplingParams(temperature=0.6, ignore_eos=True, max_tokens=n, output_kind=RequestOutputKind.FINAL_ONLY)
              for n in workload.output_lens]
    start = time.perf_counter()
    for i, (prompt, p) in enumerate(zip(workload.prompts, params)):
        engine.add_request(str(i), prompt, p)
    first, tokens = None, 0
    while engine.has_unfinished_requests():
        for output in engine.step():
            if output.finished:
                first = first or time.perf_counter() - start
                tokens += len(output.outputs[0].token_ids)
    return first, time.perf_counter() - start, tokens


def measure(name: str, model: str, kwargs: dict, workload) -> tuple[float, float]:
    start = time.perf_counter()
    llm = LLM(model, load_format="dummy", max_model_len=4096, **kwargs)
    print(f"{name}: start-up {time.perf_counter() - start:.1f} s", flush=True)
    llm.generate(["Benchmark: "], SamplingParams(), use_tqdm=False)          # warm-up
    first, total, tokens = timed_run(llm, workload)
    print(f"{name}: first request done at {first:.2f} s, all at {total:.2f} s, {tokens / total:,.0f} tok/s",
          flush=True)
    llm.llm_engine.shutdown()
    return first, total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="qwen3-0.6b", choices=list(SHAPES))
    parser.add_argument("--data-parallel-size", type=int, default=1)
    parser.add_argument("--backend", default="ray", choices=["ray", "mp"])
    add_workload_args(parser)
    args = parser.parse_args()
    workload = make_workload(args, cpu=use_cpu_preset(args, not torch.cuda.is_available()))
    model = shape_checkpoint_dir(args.shape)
    runs = [("plain LLM", {}),
            (f"data_parallel_size={args.data_parallel_size}, {args.backend}",
             {"data_parallel_size": args.data_parallel_size, "distributed_executor_backend": args.backend})]
    results = {}
    for name, kwargs in runs:
        # Each engine in a fresh process: nothing the one before held (GPU memory, threads) is left.
        with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
            results[name] = pool.submit(measure, name, model, kwargs, workload).result()
    (base_first, base_total), (first, total) = results.values()
    print(f"ratio against the plain LLM: first request {first / base_first:.3f}x, total {total / base_total:.3f}x")


if __name__ == "__main__":
    main()
