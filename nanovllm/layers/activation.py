"""The gated MLP's activations: gate and up fused in one tensor [..., 2 * I] in, act(gate) * up
[..., I] out; `gated_activation(name)` maps a checkpoint's `hidden_act` to the module."""
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


class GeluAndMul(nn.Module):
    """gelu(gate) * up (Gemma): exact, or with the tanh approximation ("gelu_pytorch_tanh")."""

    def __init__(self, approximate: str = "none"):
        super().__init__()
        self.approximate = approximate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = x.chunk(2, dim=-1)
        return F.gelu(gate, approximate=self.approximate) * up


# hidden_act names as transformers spells them -> how gelu is computed
GELU_APPROXIMATIONS = {"gelu": "none", "gelu_pytorch_tanh": "tanh", "gelu_new": "tanh", "gelu_fast": "tanh"}


def gated_activation(name: str) -> nn.Module:
    if name in ("silu", "swish"):
        return SiluAndMul()
    if name in GELU_APPROXIMATIONS:
        return GeluAndMul(GELU_APPROXIMATIONS[name])
    raise ValueError(f"hidden_act {name!r} is not supported (supported: silu, {', '.join(GELU_APPROXIMATIONS)}).")
