"""How checkpoints scale RoPE: which frequencies each rotated dimension pair turns at, for the
rope types Llama 3.1 (llama3), Phi-3 (longrope), NTK-aware (dynamic) and linear scaling use, and
reading the parameters from either config format. layers/rotary.py turns q and k by them.
"""
import math

import torch


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


def scaled_frequencies(params: dict, rotary_dim: int, max_position: int, hf_config, max_model_len: int | None
                       ) -> tuple[torch.Tensor, float]:
    """(inverse frequencies, the scale on cos and sin) for a RoPE table of `max_position` rows.
    `max_model_len`: the longest context this engine serves; LongRoPE uses its long factors when
    that exceeds the original context (as vLLM: one choice for the whole cache)."""
    max_positions = getattr(hf_config, "max_position_embeddings", max_position)
    original = params.get("original_max_position_embeddings") or \
        getattr(hf_config, "original_max_position_embeddings", None) or max_positions
    long_context = max_model_len is not None and max_model_len > original
    return (inverse_frequencies(params, rotary_dim, max_position, original, long_context),
            attention_factor(params, max_positions, original))


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
