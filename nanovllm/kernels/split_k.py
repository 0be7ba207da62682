"""Split-K for the W4A16 kernels: K cut into ranges summed at the end of one launch.

With few output tiles (a decode step's few rows) there are too few programs to fill the GPU, so
K is cut into `split_k` ranges. Each program writes a float32 partial tile and counts itself in on
an atomic counter per output tile; the one that arrives last sums the partials in K order (so the
result does not depend on which came last), writes the output and sets the counter back to zero
for the next launch. One launch a linear: summing in torch took two more, each as long as a small
GEMV.
"""
import functools

import torch
import triton
import triton.language as tl


@triton.jit
def finish_tile(acc, out_ptrs, mask, partials_ptr, offsets, partial_stride, counter_ptr, pid_k, split_k,
                 SPLIT: tl.constexpr):
    """Store a program's result: the output itself, or (SPLIT) its float32 partial at `offsets` in
    slice pid_k of the partials, and, in the tile's last program to arrive, the partials' sum."""
    if not SPLIT:
        tl.store(out_ptrs, acc.to(out_ptrs.dtype.element_ty), mask=mask)
    else:
        tl.store(partials_ptr + pid_k * partial_stride + offsets, acc, mask=mask)
        tl.debug_barrier()                    # every thread's partial stored before the tile counts in
        arrived = tl.atomic_add(counter_ptr, 1, sem="acq_rel", scope="gpu")
        if arrived == split_k - 1:
            total = tl.zeros_like(acc)
            for s in range(0, split_k):       # in K order: the same sum whoever arrived last
                # .cg: read from L2, where the other programs' stores are, not from a stale L1 line
                total += tl.load(partials_ptr + s * partial_stride + offsets, mask=mask, other=0.0,
                                 cache_modifier=".cg")
            tl.store(out_ptrs, total.to(out_ptrs.dtype.element_ty), mask=mask)
            tl.atomic_xchg(counter_ptr, 0)    # ready for the next launch (and CUDA graph replay)


@functools.lru_cache(maxsize=None)
def _num_sms(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def sm_count(device: torch.device) -> int:
    if device.type != "cuda":
        return 2                  # the CPU interpreter: a couple of "SMs", so that split-K gets exercised
    return _num_sms(device.index if device.index is not None else torch.cuda.current_device())


def default_split_k(programs: int, k_steps: int, device: torch.device, per_sm: int = 2) -> int:
    """K ranges per output tile, so that programs x split_k fill the GPU (about `per_sm` per SM).
    Splitting costs a float32 round trip of the partials, so only a GPU left mostly idle splits."""
    target = per_sm * sm_count(device)
    split = 1
    while split * 2 <= k_steps and programs * split * 2 <= target:
        split *= 2
    return split


def k_ranges(K: int, k_step: int, split_k: int) -> tuple[int, int]:
    """(values a range, ranges) for split_k ranges of whole k_step steps over K (the last may be
    shorter; asking for more ranges than steps gives one a step)."""
    steps = triton.cdiv(K, k_step)
    per_range = triton.cdiv(steps, max(1, min(split_k, steps))) * k_step
    return per_range, triton.cdiv(K, per_range)


_COUNTERS: dict[torch.device, torch.Tensor] = {}
_OUTGROWN: list[torch.Tensor] = []


def tile_counters(device: torch.device, tiles: int) -> torch.Tensor:
    """The device's split-K arrival counters, one per output tile, all zero between launches (each
    tile's last program resets its own). Never freed: a captured CUDA graph replays their address
    (a buffer outgrown by a larger launch is kept for the graphs that use it)."""
    counters = _COUNTERS.get(device)
    if counters is None or counters.numel() < tiles:
        if counters is not None:
            _OUTGROWN.append(counters)
        counters = _COUNTERS[device] = torch.zeros(max(4096, tiles), dtype=torch.int32, device=device)
    return counters


def split_buffers(out: torch.Tensor, split_k: int, tiles: int,
                  columns: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The float32 partials [split_k, M, N] (N: `columns` of the product, default out's) and the
    arrival counters; unsplit, `out` stands in for both (the kernels do not touch them)."""
    if split_k == 1:
        return out, out
    M, N = out.shape[0], columns or out.shape[1]
    return (torch.empty(split_k, M, N, dtype=torch.float32, device=out.device), tile_counters(out.device, tiles))
