"""Rotary position embedding (RoPE); the scalings checkpoints ask for are in rope_scaling.py.

The cos/sin of every position up to max_position are computed once; a forward pass
looks its positions up. Rotation is "rotate half" (first half of the rotated dimensions
paired with the second half), as in Hugging Face's Llama/Qwen models. With partial rotary
(GPT-NeoX's rotary_pct, Phi-3's partial_rotary_factor) only the first `rotary_dim` of each
head's dimensions turn; the rest pass through.
"""
import torch
from torch import nn

from nanovllm import kernels
from nanovllm.layers.fusion import use_kernels
from nanovllm.layers.rope_scaling import rope_parameters, scaled_frequencies


class RotaryEmbedding(nn.Module):
    """`params`: the rope parameters (default: the config's, see rope_parameters; Gemma 3 has
    one set per layer type). `rotary_dim`: how many of each head's dimensions turn (default:
    head_dim x the params' partial_rotary_factor). `max_model_len`: the longest context this
    engine serves (LongRoPE's choice of factors: rope_scaling.scaled_frequencies)."""

    def __init__(self, head_dim: int, max_position: int, hf_config, params: dict | None = None,
                 rotary_dim: int | None = None, max_model_len: int | None = None):
        super().__init__()
        params = rope_parameters(hf_config) if params is None else params
        if rotary_dim is None:
            rotary_dim = int(head_dim * params.get("partial_rotary_factor", 1.0))
        if rotary_dim % 2 or not 0 < rotary_dim <= head_dim:
            raise ValueError(f"the rotary dimension ({rotary_dim}) must be even and within head_dim ({head_dim}).")
        self.rotary_dim, self.head_dim = rotary_dim, head_dim
        inv_freq, scale = scaled_frequencies(params, rotary_dim, max_position, hf_config, max_model_len)
        freqs = torch.outer(torch.arange(max_position, dtype=torch.float32), inv_freq)
        # [max_position, rotary_dim]: cos of both halves, then sin of both halves
        self.register_buffer("cos_sin", torch.cat([freqs.cos(), freqs.sin()], dim=-1) * scale, persistent=False)
        self.rotation_table = None      # see _rotation

    def forward(self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor,
                q_norm: nn.Module | None = None, k_norm: nn.Module | None = None):
        """Rotate q [T, Hq, D] and k [T, Hk, D] by their tokens' positions [T]; with q_norm and
        k_norm (Qwen3's RMSNorms over each head), normalise first. On CUDA one Triton kernel
        does it all, in place."""
        if use_kernels(q) and self.rotary_dim == self.head_dim:
            if q_norm is None:
                return kernels.rotary_(q, k, self.cos_sin, positions)
            return kernels.rotary_(q, k, self.cos_sin, positions, q_norm.weight, k_norm.weight, q_norm.eps)
        if q_norm is not None:
            q, k = q_norm(q), k_norm(k)
        cos, sin = self._rotation(positions, q.dtype)
        return rotate(q, cos, sin), rotate(k, cos, sin)

    def _rotation(self, positions: torch.Tensor, dtype: torch.dtype):
        """lookup(rotation_table(cos_sin)), the table built on first use (the Triton kernel reads
        only cos_sin): one lookup a layer instead of several ops."""
        if self.rotation_table is None:
            self.rotation_table = rotation_table(self.cos_sin)
        return lookup(self.rotation_table, positions, dtype)


def rotation_table(cos_sin: torch.Tensor) -> torch.Tensor:
    """[positions, 2 x rotary_dim]: (cos, cos) then (-sin, sin) per position, so that rotating x
    is x * (cos, cos) + roll(x) * (-sin, sin), where roll swaps the halves."""
    cos, sin = cos_sin.chunk(2, dim=-1)
    return torch.cat([cos, cos, -sin, sin], dim=-1)


def lookup(table: torch.Tensor, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Per token [T, 1, rotary_dim]: (cos, cos) and (-sin, sin)."""
    return table[positions].to(dtype).unsqueeze(1).chunk(2, dim=-1)


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate the first cos.shape[-1] dimensions of each head of x; the rest pass. Each pair
    (x1, x2) of the two halves turns to (x1 cos - x2 sin, x2 cos + x1 sin)."""
    rotary_dim = cos.shape[-1]
    if rotary_dim == x.shape[-1]:
        return x * cos + x.roll(rotary_dim // 2, dims=-1) * sin
    turned = x[..., :rotary_dim]
    turned = turned * cos + turned.roll(rotary_dim // 2, dims=-1) * sin
    return torch.cat([turned, x[..., rotary_dim:]], dim=-1)
