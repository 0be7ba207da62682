import torch
import torch.nn.functional as F
from torch import nn

from nanovllm.layers.fusion import fused


@fused("silu_and_mul")
def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    gate, up = x.chunk(2, dim=-1)
    return F.silu(gate) * up


class SiluAndMul(nn.Module):
    """The gated MLP's activation: silu(gate) * up, with gate and up fused in one tensor."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return silu_and_mul(x)
