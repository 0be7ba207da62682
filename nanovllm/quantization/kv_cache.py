"""The float8 KV cache (kv_cache_dtype="fp8" / "fp8_e4m3"): half the bytes of a 16-bit cache per token.

Keys and values are stored as float8 e4m3 (3 mantissa bits, finite range +-448) divided by a
per-tensor scale per layer: cache = fp8(k / k_scale), read back as cache * k_scale. The scales
are 1.0 (vLLM's default; fine where keys and values are within a few hundred), or, with
calculate_kv_scales=True, set from the first batch that stores tokens: the largest |k| (|v|) of
that batch then maps to FP8_MAX / HEADROOM, leaving room for larger values later.

The scales are 1-element float32 tensors on the device, read by the kernels, so a captured CUDA
graph sees them change: the first-batch update below is device ops only (no host sync), which
also run, as no-ops, in every later step while calculate_kv_scales is on.
"""
import torch

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = 448.0          # the largest finite float8 e4m3fn
HEADROOM = 2.0           # calculate_kv_scales: the first batch's largest value maps to FP8_MAX / HEADROOM


def kv_cache_torch_dtype(kv_cache_dtype: str, model_dtype: torch.dtype) -> torch.dtype:
    """The cache's element type for LLM(kv_cache_dtype=...): "auto" is the model's dtype."""
    return model_dtype if kv_cache_dtype == "auto" else FP8_DTYPE


def quantize_fp8(x: torch.Tensor, scale) -> torch.Tensor:
    """x / scale in float8 e4m3 (rounded to nearest, saturated at +-FP8_MAX)."""
    return (x.float() / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)


def attach_kv_scales(layers, cache_dtype: torch.dtype, calculate: bool, device: torch.device) -> None:
    """Give each attention layer its k/v scales (None for a 16-bit cache)."""
    for layer in layers:
        if cache_dtype != FP8_DTYPE:
            layer.k_scale = layer.v_scale = None
            layer.kv_scales_pending = None
            continue
        layer.k_scale = torch.ones(1, dtype=torch.float32, device=device)
        layer.v_scale = torch.ones(1, dtype=torch.float32, device=device)
        # a device flag: set until a batch has stored tokens and fixed the scales
        layer.kv_scales_pending = torch.tensor([calculate], device=device) if calculate else None


def update_scales_from_first_batch(k: torch.Tensor, v: torch.Tensor, slot_mapping: torch.Tensor,
                                   k_scale: torch.Tensor, v_scale: torch.Tensor, pending: torch.Tensor) -> None:
    """While `pending`, the first batch with tokens to store (slot >= 0; CUDA-graph padding and
    warm-up batches have none) sets the scales from its largest |k| and |v|, and clears `pending`."""
    if k.shape[0] == 0:
        return
    stored = (slot_mapping[:k.shape[0]] >= 0).float()
    has_tokens = stored.amax() > 0
    take = pending & has_tokens
    for x, scale in ((k, k_scale), (v, v_scale)):
        amax = (x.float().abs().amax(dim=(1, 2)) * stored).amax()
        new = (amax * HEADROOM / FP8_MAX).clamp(min=1e-8)
        scale.copy_(torch.where(take, new, scale))
    pending.copy_(pending & ~has_tokens)


def attend_fp8(layer, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, meta) -> torch.Tensor:
    """Attention.forward (`layer`) over a float8 cache. The Triton kernels divide by the scales
    when storing and multiply when reading, in registers. Any other backend stores keys and
    values already in float8 and attends with the scales around it: q * k_scale against the
    cached k / k_scale gives the same scores, and the output is linear in v."""
    if layer.kv_scales_pending is not None:     # calculate_kv_scales: from the first batch
        update_scales_from_first_batch(k, v, meta.slot_mapping, layer.k_scale, layer.v_scale,
                                       layer.kv_scales_pending)
    if layer.backend.name == "triton":
        scales = {"k_scale": layer.k_scale, "v_scale": layer.v_scale}
        layer.backend.store(k, v, layer.k_cache, layer.v_cache, meta, **scales)
        out = layer.backend.attend(q, layer.k_cache, layer.v_cache, meta, layer.scale, layer.sliding_window,
                                   **scales)
        return out.flatten(1)
    layer.backend.store(quantize_fp8(k, layer.k_scale), quantize_fp8(v, layer.v_scale), layer.k_cache,
                        layer.v_cache, meta)
    out = layer.backend.attend((q.float() * layer.k_scale).to(q.dtype), layer.k_cache, layer.v_cache, meta,
                               layer.scale, layer.sliding_window)
    return (out.float() * layer.v_scale).to(out.dtype).flatten(1)
