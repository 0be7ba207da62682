"""The small element-wise pieces of a layer as single Triton kernels on CUDA.

RMSNorm (with or without the residual add), rotary embedding (with Qwen3's per-head norm)
and SiLU-and-mul are each a handful of tiny torch ops: eagerly, one kernel launch and one
trip through memory per op, which dominates a small model's decode step. On CUDA each runs
as one kernel from nanovllm/kernels/ instead; on the CPU the torch functions run, and they
are the kernels' references. NANOVLLM_FUSED_KERNELS=0 keeps the torch functions on CUDA too.

(These kernels replaced torch.compile, which fused the same pieces about as well inside CUDA
graphs but cost 100-200 us of host time per call outside them, so prefill steps waited on it.)
"""
import functools
import os

import torch

from nanovllm import kernels


def use_kernels(x: torch.Tensor) -> bool:
    return x.is_cuda and os.environ.get("NANOVLLM_FUSED_KERNELS") != "0" and _triton_here()


@functools.cache
def _triton_here() -> bool:
    return kernels.triton_available()


def fused(kernel_name: str):
    """Decorator: on CUDA tensors, call kernels.<kernel_name> (same arguments) instead of fn."""
    def decorate(fn):
        @functools.wraps(fn)
        def dispatch(x, *args, **kwargs):
            if use_kernels(x):
                return getattr(kernels, kernel_name)(x, *args, **kwargs)
            return fn(x, *args, **kwargs)
        return dispatch
    return decorate
