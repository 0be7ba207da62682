"""Compiling the small element-wise pieces of a layer into single kernels on CUDA.

RMSNorm, rotary embedding and SiLU-and-mul are each a handful of tiny element-wise ops;
eagerly that is one kernel launch (and one trip through memory) per op, which dominates a
small model's decode step. `torch.compile` fuses each piece into one Triton kernel. On the
CPU, or with `enforce_eager=True`, the plain functions run: they are the reference.
"""
import functools
import os

import torch

# Set by the ModelRunner: compile when running on CUDA without enforce_eager.
_enabled = False


def enable_fusion(enabled: bool) -> None:
    global _enabled
    _enabled = enabled and os.environ.get("NANOVLLM_COMPILE", "1") != "0"


def fused(fn):
    """Run `fn` torch.compile'd (shapes dynamic) on CUDA tensors when fusion is enabled."""
    compiled = None

    @functools.wraps(fn)
    def dispatch(x: torch.Tensor, *args):
        nonlocal compiled
        if not (_enabled and x.is_cuda):
            return fn(x, *args)
        if compiled is None:
            compiled = torch.compile(fn, dynamic=True, fullgraph=True)
        return compiled(x, *args)
    return dispatch
