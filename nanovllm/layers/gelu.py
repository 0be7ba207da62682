"""GELU activations of the families beyond Llama and Qwen: gated, gelu(gate) * up (Gemma 3), and
plain, gelu(x) (GPT-NeoX); exact or with the tanh approximation, as the checkpoint's hidden_act says."""
import torch
import torch.nn.functional as F
from torch import nn

# hidden_act names as transformers spells them -> how gelu is computed
GELU_APPROXIMATIONS = {"gelu": "none", "gelu_pytorch_tanh": "tanh", "gelu_new": "tanh", "gelu_fast": "tanh"}


def approximation(name: str) -> str:
    if name not in GELU_APPROXIMATIONS:
        raise ValueError(f"hidden_act {name!r} is not supported (supported: silu, {', '.join(GELU_APPROXIMATIONS)}).")
    return GELU_APPROXIMATIONS[name]


class Gelu(nn.Module):
    """gelu(x): the plain (ungated) MLP's activation."""

    def __init__(self, name: str):
        super().__init__()
        self.approximate = approximation(name)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.gelu(x, approximate=self.approximate)


class GeluAndMul(Gelu):
    """gelu(gate) * up, with gate and up fused in one tensor."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = x.chunk(2, dim=-1)
        return super().forward(gate) * up
