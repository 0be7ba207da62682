"""Does an NCCL all-reduce captured in a CUDA graph replay correctly here, interleaved with
eager broadcasts, as the tensor-parallel engine's decode steps do? Two processes, one per GPU;
each step is synchronised and printed, so a hang shows where.

    PYTHONPATH=. timeout 120 python benchmarks/nccl_graph_check.py
"""
import os
import socket
import sys
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def say(rank: int, what: str) -> None:
    print(f"[rank {rank} {time.strftime('%H:%M:%S')}] {what}", flush=True)


def worker(rank: int, port: int) -> None:
    torch.cuda.set_device(rank)
    store = dist.TCPStore("127.0.0.1", port, 2, rank == 0)
    dist.init_process_group("nccl", store=store, rank=rank, world_size=2)
    x = torch.full((1024,), float(rank + 1), device="cuda")
    dist.all_reduce(x)
    torch.cuda.synchronize()
    say(rank, f"eager all-reduce: {x[0].item()} (want 3.0)")

    static = torch.ones(1024, device="cuda")
    for _ in range(2):                      # warm-up outside capture, as the engine does
        dist.all_reduce(static)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        dist.all_reduce(static)
    torch.cuda.synchronize()
    say(rank, "captured")

    payload = torch.zeros(64, dtype=torch.uint8, device="cuda")
    for step in range(5):
        if rank == 0:
            payload.fill_(step)
        dist.broadcast(payload, src=0)      # the step's inputs, eager
        static.fill_(1.0)
        graph.replay()                      # the step's forward, all-reduce inside the graph
        torch.cuda.synchronize()
        say(rank, f"step {step}: broadcast {payload[0].item()} (want {step}), replayed sum {static[0].item()} (want 2.0)")
    dist.destroy_process_group()
    say(rank, "done")


def main() -> None:
    if torch.cuda.device_count() < 2:
        sys.exit("needs two GPUs")
    os.environ.setdefault("NCCL_DEBUG", "WARN")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(worker, args=(port,), nprocs=2)


if __name__ == "__main__":
    main()
