"""Rotary position embedding (RoPE), with the scalings Llama/Qwen/Phi-3 checkpoints use.

The cos/sin of every position up to max_position are computed once; a forward pass
looks its positions up. Rotation is "rotate half" (first half of the rotated dimensions
paired with the second half), as in Hugging Face's Llama/Qwen models. With partial rotary
(GPT-NeoX's rotary_pct, Phi-3's partial_rotary_factor) only the first `rotary_dim` of each
head's dimensions turn; the rest pass through.
"""
import math

import torch
from torch import nn

from nanovllm import kernels
from nanovllm.layers.fusion import use_kernels


def rope_parameters(hf_config) -> dict:
    """{'rope_type', 'rope_theta', ...scaling entries} from either config format:
    transformers 5 writes `rope_parameters`; 4.x checkpoints have top-level `rope_theta`
    and an optional `rope_scaling` dict (GPT-NeoX: `rotary_emb_base`, `rotary_pct`)."""
    params = dict(getattr(hf_config, "rope_parameters", None) or {})
    scaling = getattr(hf_config, "rope_scaling", None) or {}
    params = {**scaling, **params}
    if params.get("rope_theta") is None:
        params["rope_theta"] = (getattr(hf_config, "rope_theta", None) or getattr(hf_config, "rotary_emb_base", None)
                                or 10000.0)
    if params.get("partial_rotary_factor") is None:
        params["partial_rotary_factor"] = (getattr(hf_config, "partial_rotary_factor", None)
                                           or getattr(hf_config, "rotary_pct", None) or 1.0)
    params["rope_type"] = params.get("rope_type") or params.get("type") or "default"
    return params


def inverse_frequencies(params: dict, head_dim: int, max_position: int,
                        original_max_position: int, long_context: bool = False) -> torch.Tensor:
    """One frequency per pair of rotated dimensions (`head_dim` here is the rotated width).
    `long_context`: LongRoPE's long factors instead of its short ones."""
    base, kind = float(params["rope_theta"]), params["rope_type"]
    exponents = torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim
    if kind == "dynamic" and max_position > original_max_position:
        # NTK-aware: stretch the base for the longest context this engine will see.
        # (transformers recomputes it per forward from the longest sequence so far; both
        # agree while sequences stay within the original context.)
        factor = params["factor"]
        base *= (factor * max_position / original_max_position - (factor - 1)) ** (head_dim / (head_dim - 2))
    if kind in ("longrope", "su"):
        # Phi-3: each frequency divided by its own factor, from the long or the short list
        factors = params["long_factor"] if long_context else params["short_factor"]
        if len(factors) != len(exponents):
            raise ValueError(f"rope_scaling's {'long' if long_context else 'short'}_factor has {len(factors)} "
                             f"entries; the rotated head dimensions need {len(exponents)}.")
        return 1.0 / (torch.tensor(factors, dtype=torch.float32) * base ** exponents)
    inv_freq = 1.0 / base ** exponents
    if kind == "linear":
        inv_freq = inv_freq / params["factor"]
    elif kind == "llama3":
        inv_freq = _llama3_scaling(inv_freq, params)
    elif kind not in ("default", "dynamic"):
        raise ValueError(f"rope_type {kind!r} is not supported "
                         f"(supported: default, linear, dynamic, llama3, longrope).")
    return inv_freq


def attention_factor(params: dict, max_position_embeddings: int, original_max_position: int) -> float:
    """LongRoPE's scale on cos and sin (so on q.k twice over): sqrt(1 + ln(s) / ln(original))
    for a context stretched s times, unless the checkpoint states it. 1 for other kinds."""
    if params["rope_type"] not in ("longrope", "su"):
        return 1.0
    if params.get("attention_factor") is not None:
        return float(params["attention_factor"])
    stretch = params.get("factor") or max_position_embeddings / original_max_position
    return 1.0 if stretch <= 1.0 else math.sqrt(1 + math.log(stretch) / math.log(original_max_position))


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
    """`params`: the rope parameters (default: the config's, see rope_parameters; Gemma 3 has
    one set per layer type). `rotary_dim`: how many of each head's dimensions turn (default:
    head_dim x the params' partial_rotary_factor). `max_model_len`: the longest context this
    engine serves; LongRoPE uses its long factors when that exceeds the original context (as
    vLLM does: one choice for the whole cache, whatever each sequence's length)."""

    def __init__(self, head_dim: int, max_position: int, hf_config, params: dict | None = None,
                 rotary_dim: int | None = None, max_model_len: int | None = None):
        super().__init__()
        params = rope_parameters(hf_config) if params is None else params
        if rotary_dim is None:
            rotary_dim = int(head_dim * params.get("partial_rotary_factor", 1.0))
        if rotary_dim % 2 or not 0 < rotary_dim <= head_dim:
            raise ValueError(f"the rotary dimension ({rotary_dim}) must be even and within head_dim ({head_dim}).")
        self.rotary_dim, self.head_dim = rotary_dim, head_dim
        max_positions = getattr(hf_config, "max_position_embeddings", max_position)
        original = params.get("original_max_position_embeddings") or \
            getattr(hf_config, "original_max_position_embeddings", None) or max_positions
        long_context = max_model_len is not None and max_model_len > original
        inv_freq = inverse_frequencies(params, rotary_dim, max_position, original, long_context)
        freqs = torch.outer(torch.arange(max_position, dtype=torch.float32), inv_freq)
        scale = attention_factor(params, max_positions, original)
        # [max_position, rotary_dim]: cos of both halves, then sin of both halves
        self.register_buffer("cos_sin", torch.cat([freqs.cos(), freqs.sin()], dim=-1) * scale, persistent=False)

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
        return apply_rotary(q, k, self.cos_sin, positions)


def apply_rotary(q: torch.Tensor, k: torch.Tensor, cos_sin: torch.Tensor, positions: torch.Tensor):
    """Rotate the first cos_sin.shape[-1] dimensions of each head of q and k; the rest pass."""
    cos, sin = cos_sin[positions].to(q.dtype).unsqueeze(1).chunk(2, dim=-1)
    rotary_dim = cos_sin.shape[-1]
    if rotary_dim == q.shape[-1]:
        return _rotate(q, cos, sin), _rotate(k, cos, sin)
    return (torch.cat([_rotate(q[..., :rotary_dim], cos, sin), q[..., rotary_dim:]], dim=-1),
            torch.cat([_rotate(k[..., :rotary_dim], cos, sin), k[..., rotary_dim:]], dim=-1))


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)
