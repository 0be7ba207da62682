"""Triton kernel: rotary position embedding of q and k, in place, optionally after a
per-head RMSNorm (Qwen3's q_norm/k_norm), in one pass over both.

    rotary_(q, k, cos_sin, positions)                          q, k rotated in place
    rotary_(q, k, cos_sin, positions, q_weight, k_weight, eps) normalised per head, then rotated

q [T, Hq, D] and k [T, Hk, D] may be strided views (slices of the fused qkv output); only
their last dimension must be contiguous. cos_sin [max_position, D] holds the cos of each
frequency, then its sin (layers/rotary.py). Rotation is "rotate half": the first half of the
head dimension pairs with the second. The references are `apply_rotary` below (layers/rotary.py's
torch path) and layers/layernorm.py's rms_norm; like them, the kernel rounds cos/sin, the normalised
values and the rotated halves to q's dtype. One program per token.
"""
import torch
import triton
import triton.language as tl

from nanovllm.kernels.pdl import pdl_options, wait_for_previous


@triton.jit
def _rotate_heads(x_ptr, stride_t, stride_h, token, cos, sin, w1, w2, eps,
                  H: tl.constexpr, BLOCK_H: tl.constexpr, HALF: tl.constexpr, BLOCK_HALF: tl.constexpr,
                  HAS_NORM: tl.constexpr):
    heads = tl.arange(0, BLOCK_H)[:, None]
    half = tl.arange(0, BLOCK_HALF)[None, :]
    mask = (heads < H) & (half < HALF)
    first = x_ptr + token * stride_t + heads * stride_h + half
    x1 = tl.load(first, mask=mask, other=0.0)
    x2 = tl.load(first + HALF, mask=mask, other=0.0)
    if HAS_NORM:
        a, b = x1.to(tl.float32), x2.to(tl.float32)
        inv_rms = tl.rsqrt((tl.sum(a * a, axis=1) + tl.sum(b * b, axis=1)) / (2 * HALF) + eps)[:, None]
        x1 = (a * inv_rms).to(x1.dtype) * w1
        x2 = (b * inv_rms).to(x2.dtype) * w2
    x1c, x2c = x1.to(tl.float32), x2.to(tl.float32)
    # each product rounded as the torch reference does: (x1 * cos) - (x2 * sin) in q's dtype
    out1 = (x1c * cos).to(x1.dtype).to(tl.float32) - (x2c * sin).to(x1.dtype).to(tl.float32)
    out2 = (x2c * cos).to(x1.dtype).to(tl.float32) + (x1c * sin).to(x1.dtype).to(tl.float32)
    tl.store(first, out1.to(x_ptr.dtype.element_ty), mask=mask)
    tl.store(first + HALF, out2.to(x_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _rotary_kernel(
    q_ptr, k_ptr, cos_sin_ptr, positions_ptr, q_weight_ptr, k_weight_ptr, eps,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_cs,
    HQ: tl.constexpr, HK: tl.constexpr, BLOCK_HQ: tl.constexpr, BLOCK_HK: tl.constexpr,
    HALF: tl.constexpr, BLOCK_HALF: tl.constexpr, HAS_NORM: tl.constexpr, PDL: tl.constexpr,
):
    # The positions (a step input) and the cos/sin table do not come from the kernel ahead: read
    # them before waiting for it (pdl.py).
    token = tl.program_id(0).to(tl.int64)
    position = tl.load(positions_ptr + token).to(tl.int64)
    half = tl.arange(0, BLOCK_HALF)[None, :]
    in_half = half < HALF
    # cos/sin in q's dtype, as the reference rounds them
    cos = tl.load(cos_sin_ptr + position * stride_cs + half, mask=in_half, other=0.0)
    sin = tl.load(cos_sin_ptr + position * stride_cs + HALF + half, mask=in_half, other=0.0)
    cos = cos.to(q_ptr.dtype.element_ty).to(tl.float32)
    sin = sin.to(q_ptr.dtype.element_ty).to(tl.float32)
    qw1, qw2, kw1, kw2 = cos, cos, cos, cos     # unused without HAS_NORM
    if HAS_NORM:
        qw1 = tl.load(q_weight_ptr + half, mask=in_half, other=0.0)
        qw2 = tl.load(q_weight_ptr + HALF + half, mask=in_half, other=0.0)
        kw1 = tl.load(k_weight_ptr + half, mask=in_half, other=0.0)
        kw2 = tl.load(k_weight_ptr + HALF + half, mask=in_half, other=0.0)
    wait_for_previous(PDL)      # launched early: now wait for the kernel ahead, whose q and k these are
    _rotate_heads(q_ptr, stride_qt, stride_qh, token, cos, sin, qw1, qw2, eps,
                  HQ, BLOCK_HQ, HALF, BLOCK_HALF, HAS_NORM)
    _rotate_heads(k_ptr, stride_kt, stride_kh, token, cos, sin, kw1, kw2, eps,
                  HK, BLOCK_HK, HALF, BLOCK_HALF, HAS_NORM)


def rotary_(q: torch.Tensor, k: torch.Tensor, cos_sin: torch.Tensor, positions: torch.Tensor,
            q_weight: torch.Tensor | None = None, k_weight: torch.Tensor | None = None,
            eps: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate q and k in place (after per-head RMSNorm when weights are given); returns them."""
    (t, hq, d), hk = q.shape, k.shape[1]
    if k.shape != (t, hk, d) or cos_sin.shape[1] != d or positions.shape != (t,) or d % 2:
        raise ValueError(f"rotary_: q {tuple(q.shape)}, k {tuple(k.shape)}, cos_sin {tuple(cos_sin.shape)} "
                         f"and positions {tuple(positions.shape)} do not fit together")
    if q.stride(-1) != 1 or k.stride(-1) != 1 or cos_sin.stride(-1) != 1:
        raise ValueError("rotary_ needs the head dimension contiguous")
    half = d // 2
    has_norm = q_weight is not None
    if t:
        _rotary_kernel[(t,)](
            q, k, cos_sin, positions, q_weight if has_norm else cos_sin, k_weight if has_norm else cos_sin, eps,
            q.stride(0), q.stride(1), k.stride(0), k.stride(1), cos_sin.stride(0),
            HQ=hq, HK=hk, BLOCK_HQ=triton.next_power_of_2(hq), BLOCK_HK=triton.next_power_of_2(hk),
            HALF=half, BLOCK_HALF=triton.next_power_of_2(half), HAS_NORM=has_norm,
            **pdl_options(q.device))
    return q, k


def apply_rotary(q: torch.Tensor, k: torch.Tensor, cos_sin: torch.Tensor, positions: torch.Tensor):
    """The torch reference: rotate the first cos_sin.shape[-1] dimensions of each head of q and k
    (the rest pass), as layers/rotary.py does without the kernel."""
    from nanovllm.layers.rotary import lookup, rotate, rotation_table
    cos, sin = lookup(rotation_table(cos_sin), positions, q.dtype)
    return rotate(q, cos, sin), rotate(k, cos, sin)
