"""Compiling the small element-wise pieces of a layer into single kernels on CUDA.

RMSNorm, rotary embedding and SiLU-and-mul are each a handful of tiny element-wise ops;
eagerly that is one kernel launch (and one trip through memory) per op, which dominates a
small model's decode step. `torch.compile` fuses each piece into one Triton kernel. On the
CPU, or with `enforce_eager=True`, the plain functions run: they are the reference.
NANOVLLM_COMPILE=1 compiles on the CPU too; NANOVLLM_COMPILE=0 never compiles.
"""
import functools
import os

import torch

# Set by the ModelRunner from enforce_eager and NANOVLLM_COMPILE.
_enabled = False
_on_cpu = False


def enable_fusion(enabled: bool) -> None:
    global _enabled, _on_cpu
    asked = os.environ.get("NANOVLLM_COMPILE")
    _enabled = enabled and asked != "0"
    _on_cpu = asked == "1"


def fused(fn):
    """Run `fn` torch.compile'd (shapes dynamic) on CUDA tensors when fusion is enabled."""
    compiled = None

    @functools.wraps(fn)
    def dispatch(x: torch.Tensor, *args):
        nonlocal compiled
        if not (_enabled and (x.is_cuda or _on_cpu)):
            return fn(x, *args)
        if compiled is None:
            compiled = torch.compile(fn, dynamic=True, fullgraph=True)
        return compiled(x, *args)
    return dispatch
