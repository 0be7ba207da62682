"""Programmatic dependent launch (Hopper and later): a kernel starts before the one ahead of it
on the stream has finished, and waits only where it first needs that kernel's results.

A 4-bit decode step is a chain of small dependent kernels, and each of its GEMVs spends a few
microseconds starting up and waiting for its first weights from HBM, though the weights never
depend on the kernel before. With this, the kernel ahead signals at its start that the next may
launch (`launch_dependents`); the GEMV, launched with `launch_pdl=True`, pulls its weights into L2
(`prefetch_l2`) while that kernel still runs, then waits for it (`wait_for_previous`) before it
reads the activations. A kernel launched this way must wait before it reads or writes anything
the kernels ahead touch; the signal itself is harmless when no dependent was launched this way.

Both are no-ops (PDL=False) under the interpreter, before sm_90, or with NANOVLLM_PDL=0.
"""
import functools
import os

import torch
import triton
import triton.language as tl

try:    # triton >= 3.4
    from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait
except ImportError:
    gdc_launch_dependents = gdc_wait = None


@functools.lru_cache(maxsize=None)
def _capable(device_index: int) -> bool:
    return torch.cuda.get_device_capability(device_index) >= (9, 0)


def pdl_enabled(device: torch.device) -> bool:
    """Launch with programmatic dependent launch on this device?"""
    if device.type != "cuda" or gdc_wait is None or os.environ.get("NANOVLLM_PDL", "1") == "0":
        return False
    return _capable(device.index if device.index is not None else torch.cuda.current_device())


@triton.jit
def launch_dependents(PDL: tl.constexpr):
    """Let the next kernel launch now (it waits for this one's results itself)."""
    if PDL:
        gdc_launch_dependents()


@triton.jit
def wait_for_previous(PDL: tl.constexpr):
    """Block until the kernels ahead on the stream have finished and their writes are visible."""
    if PDL:
        gdc_wait()


@triton.jit
def prefetch_l2(ptrs):
    """Start loading the 128-byte lines at `ptrs` into L2; nothing waits for them."""
    tl.inline_asm_elementwise("prefetch.global.L2 [$1];\nmov.u32 $0, 0;", "=r,l", [ptrs], dtype=tl.int32,
                              is_pure=False, pack=1)
