"""Tensor-parallel helpers: this process's rank and the collectives layers need.

With one rank (or before `torch.distributed` is initialised) every helper is a no-op,
so single-device code pays nothing for tensor-parallel support.
"""
import torch
import torch.distributed as dist


def tp_rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def tp_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def check_tp_size(tensor_parallel_size: int) -> None:
    """A ModelRunner's ranks must be the process group's (made by engine/tensor_parallel.py)."""
    if tp_size() != tensor_parallel_size:
        raise RuntimeError(f"tensor_parallel_size={tensor_parallel_size} but this process is one of "
                           f"{tp_size()} torch.distributed ranks (is another tensor-parallel engine alive here?)")


def all_reduce(x: torch.Tensor) -> torch.Tensor:
    """Sum `x` over the ranks in place (row-parallel layers' partial outputs)."""
    if tp_size() > 1:
        dist.all_reduce(x)
    return x


def gather_on_rank0(x: torch.Tensor) -> torch.Tensor | None:
    """Concatenate each rank's slice of the last dimension on rank 0 (vocab-parallel logits).
    Other ranks get None."""
    if tp_size() == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(tp_size())] if tp_rank() == 0 else None
    dist.gather(x, parts, dst=0)
    return torch.cat(parts, dim=-1) if tp_rank() == 0 else None


def min_over_ranks(value: int, device: torch.device) -> int:
    """The smallest of every rank's `value` (e.g. the KV-cache blocks all ranks can hold)."""
    if tp_size() == 1:
        return value
    t = torch.tensor([value], dtype=torch.int64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return int(t.item())
