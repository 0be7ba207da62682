"""Rotary position embedding (RoPE), with the scalings Llama/Qwen checkpoints use.

The cos/sin of every position up to max_position are computed once; a forward pass
looks its positions up. Rotation is "rotate half" (first half of the head dimension
paired with the second half), as in Hugging Face's Llama/Qwen models.
"""
import math

import torch
from torch import nn

from nanovllm import kernels
from nanovllm.layers.fusion import use_kernels


def rope_parameters(hf_config) -> dict:
    """{'rope_type', 'rope_theta', ...scaling entries} from either config format:
    transformers 5 writes `rope_parameters`; 4.x checkpoints have top-level `rope_theta`
    and an optional `rope_scaling` dict."""
    params = dict(getattr(hf_config, "rope_parameters", None) or {})
    scaling = getattr(hf_config, "rope_scaling", None) or {}
    params = {**scaling, **params}
    if params.get("rope_theta") is None:
        params["rope_theta"] = getattr(hf_config, "rope_theta", None) or 10000.0
    params["rope_type"] = params.get("rope_type") or params.get("type") or "default"
    return params


def inverse_frequencies(params: dict, head_dim: int, max_position: int,
                        original_max_position: int) -> torch.Tensor:
    base, kind = float(params["rope_theta"]), params["rope_type"]
    exponents = torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim
    if kind == "dynamic" and max_position > original_max_position:
        # NTK-aware: stretch the base for the longest context this engine will see.
        # (transformers recomputes it per forward from the longest sequence so far; both
        # agree while sequences stay within the original context.)
        factor = params["factor"]
        base *= (factor * max_position / original_max_position - (factor - 1)) ** (head_dim / (head_dim - 2))
    inv_freq = 1.0 / base ** exponents
    if kind == "linear":
        inv_freq = inv_freq / params["factor"]
    elif kind == "llama3":
        inv_freq = _llama3_scaling(inv_freq, params)
    elif kind not in ("default", "dynamic"):
        raise ValueError(f"rope_type {kind!r} is not supported (supported: default, linear, dynamic, llama3).")
    return inv_freq


def _llama3_scaling(inv_freq: torch.Tensor, params: dict) -> torch.Tensor:
    """Llama 3.1: long wavelengths divided by `factor`, short ones kept, a smooth blend between."""
    factor, low, high = params["factor"], params["low_freq_factor"], params["high_freq_factor"]
    old_context = params["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv_freq
    smooth = (old_context / wavelen - low) / (high - low)
    blended = (1 - smooth) * inv_freq / factor + smooth * inv_freq
    scaled = torch.where(wavelen > old_context / low, inv_freq / factor, inv_freq)
    is_medium = (wavelen >= old_context / high) & (wavelen <= old_context / low)
    return torch.where(is_medium, blended, scaled)


class RotaryEmbedding(nn.Module):
    def __init__(self, head_dim: int, max_position: int, hf_config):
        super().__init__()
        params = rope_parameters(hf_config)
        original = params.get("original_max_position_embeddings") or \
            getattr(hf_config, "max_position_embeddings", max_position)
        inv_freq = inverse_frequencies(params, head_dim, max_position, original)
        freqs = torch.outer(torch.arange(max_position, dtype=torch.float32), inv_freq)
        # [max_position, head_dim]: cos of both halves, then sin of both halves
        self.register_buffer("cos_sin", torch.cat([freqs.cos(), freqs.sin()], dim=-1), persistent=False)

    def forward(self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor,
                q_norm: nn.Module | None = None, k_norm: nn.Module | None = None):
        """Rotate q [T, Hq, D] and k [T, Hk, D] by their tokens' positions [T]; with q_norm and
        k_norm (Qwen3's RMSNorms over each head), normalise first. On CUDA one Triton kernel
        does it all, in place."""
        if use_kernels(q):
            if q_norm is None:
                return kernels.rotary_(q, k, self.cos_sin, positions)
            return kernels.rotary_(q, k, self.cos_sin, positions, q_norm.weight, k_norm.weight, q_norm.eps)
        if q_norm is not None:
            q, k = q_norm(q), k_norm(k)
        return apply_rotary(q, k, self.cos_sin, positions)


def apply_rotary(q: torch.Tensor, k: torch.Tensor, cos_sin: torch.Tensor, positions: torch.Tensor):
    cos, sin = cos_sin[positions].to(q.dtype).unsqueeze(1).chunk(2, dim=-1)
    return _rotate(q, cos, sin), _rotate(k, cos, sin)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)
