"""Programmatic dependent launch (Hopper and later): a kernel starts before the one ahead of it
on the stream has finished, and waits where it first needs that kernel's results.

A decode step at small batches is a chain of small dependent kernels (a 4-bit model's, all of them
ours), and launched plainly each is started only once the one before has finished. Launched with
`launch_pdl=True`, a kernel of the chain is launched while the one ahead runs; at its top it waits
for that one and then lets the next launch (`wait_for_previous`).
A kernel launched this way must wait before it writes memory or reads what the kernel ahead
writes. It may read earlier data first: a kernel is launched only once the one ahead has passed
its own wait, so every kernel before that one has finished. So the W4A16 GEMV pulls its weights
into L2 before it waits (`prefetch_l2`), the rotary kernel reads the positions and its cos/sin
table, and decode attention the sequence lengths and block tables and prefetches its first keys
and values (the newest key, which the kernel ahead stores, is only prefetched). Kernels launched
plainly are unaffected.

All of it is off (PDL=False) on a CPU and under Triton's interpreter, on GPUs before sm_90 and on
ROCm, and with NANOVLLM_PDL=0.
"""
import functools
import os

import torch
import triton
import triton.language as tl

from nanovllm.kernels import triton_interpreting

try:    # triton >= 3.4
    from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait
except ImportError:
    gdc_launch_dependents = gdc_wait = None


@functools.lru_cache(maxsize=None)
def _capable(device_index: int) -> bool:
    # (a ROCm build reports its GPUs' gfx versions as capabilities: 9.4 is an MI300, without PDL)
    return torch.version.hip is None and torch.cuda.get_device_capability(device_index) >= (9, 0)


def pdl_options(device: torch.device) -> dict:
    """A chain kernel's PDL constexpr and launch option: on for sm_90+ CUDA GPUs (`launch_pdl` is
    given only then: triton before 3.4 refuses it)."""
    if (device.type != "cuda" or gdc_wait is None or os.environ.get("NANOVLLM_PDL", "1") == "0"
            or triton_interpreting()
            or not _capable(device.index if device.index is not None else torch.cuda.current_device())):
        return {"PDL": False}
    return {"PDL": True, "launch_pdl": True}


@triton.jit
def wait_for_previous(PDL: tl.constexpr):
    """Block until the kernel ahead on the stream has finished and its writes are visible; then let
    the next kernel launch (it waits for this one in turn)."""
    if PDL:
        gdc_wait()
        gdc_launch_dependents()


@triton.jit
def prefetch_l2(ptrs):
    """Start loading the 128-byte lines at `ptrs` into L2; nothing waits for them."""
    tl.inline_asm_elementwise("prefetch.global.L2 [$1];\nmov.u32 $0, 0;", "=r,l", [ptrs], dtype=tl.int32,
                              is_pure=False, pack=1)
