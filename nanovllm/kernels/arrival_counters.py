"""Arrival counters, for kernels whose last program to finish a share of the work completes it (the
W4A16 GEMM's split-K sum, split-KV decode attention's merge): int32 zeros in device memory, one per
share. Each program adds one as it finishes; the one that reads count - 1 is last, completes the
share and sets its counter back to zero, so the next launch and every CUDA graph replay find zeros.
"""
import torch

_COUNTERS: dict[tuple[str, torch.device], torch.Tensor] = {}
_OUTGROWN: list[torch.Tensor] = []


def arrival_counters(user: str, device: torch.device, count: int) -> torch.Tensor:
    """At least `count` counters of the kernel `user`, zero between its launches. Never freed: a
    captured CUDA graph replays their address (a buffer outgrown by a larger launch is kept for the
    graphs that use it)."""
    counters = _COUNTERS.get((user, device))
    if counters is None or counters.numel() < count:
        if counters is not None:
            _OUTGROWN.append(counters)
        counters = _COUNTERS[user, device] = torch.zeros(max(4096, count), dtype=torch.int32, device=device)
    return counters
