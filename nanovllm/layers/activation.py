"""The gated MLP's activations: gate and up fused in one tensor [..., 2 * I] in, act(gate) * up
[..., I] out; `gated_activation(name)` maps a checkpoint's `hidden_act` to the module (gelu: gelu.py)."""
import torch
import torch.nn.functional as F
from torch import nn

from nanovllm import kernels
from nanovllm.layers.fusion import use_kernels


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    gate, up = x.chunk(2, dim=-1)
    return F.silu(gate) * up


class SiluAndMul(nn.Module):
    """The gated MLP's activation: silu(gate) * up, with gate and up fused in one tensor."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if use_kernels(x):
            return kernels.silu_and_mul(x)
        return silu_and_mul(x)


def gated_activation(name: str) -> nn.Module:
    if name in ("silu", "swish"):
        return SiluAndMul()
    from nanovllm.layers.gelu import GeluAndMul      # Gemma's (other families: layers/gelu.py)
    return GeluAndMul(name)
