"""Whether a layer's small element-wise pieces run as single Triton kernels (nanovllm/kernels/).

RMSNorm (with or without the residual add), rotary embedding (with Qwen3's per-head norm) and
SiLU-and-mul each call their kernel on CUDA, explicitly, where this says so; elsewhere their torch
functions run, which are the kernels' references. NANOVLLM_FUSED_KERNELS=0 keeps the torch
functions on CUDA too. docs/kernels.md says why these are kernels.
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
