"""Triton kernel: write the new tokens' K and V into their paged-cache slots.

One program per token copies that token's [num_kv_heads, head_dim] key and value rows to
`slot = block_id * block_size + offset` (see reference.py for the layout). A negative slot
(padding in a CUDA-graph batch) is skipped. key/value may be strided views of a fused qkv
tensor: every stride is passed to the kernel, nothing is copied.

Into a float8 cache (kv_cache_dtype="fp8") each value is divided by its per-tensor scale,
saturated at +-448 and rounded to the nearest float8 e4m3 value (ties to even) in float32
arithmetic before the conversion, so the kernel stores exactly what torch's `.to(float8_e4m3fn)`
gives, on a GPU and in Triton's CPU interpreter alike (whose own conversion rounds without
carrying into the exponent).
"""
import torch
import triton
import triton.language as tl

from nanovllm.kernels.pdl import pdl_options, wait_for_previous


@triton.jit
def round_to_e4m3(x):
    """x (float32, within +-448) rounded to the nearest float8 e4m3 value, ties to even."""
    a = tl.abs(x)
    # Below 2**-6 e4m3 is subnormal, spaced 2**-9: shifted up by 2**-6 the same spacing is that
    # of 3 mantissa bits, so one rounding rule serves both ranges.
    small = a < 0.015625
    bits = tl.where(small, a + 0.015625, a).to(tl.int32, bitcast=True)
    bits = (bits + 0x7FFFF + ((bits >> 20) & 1)) & -0x100000      # keep 3 of float32's 23 mantissa bits
    r = bits.to(tl.float32, bitcast=True)
    r = tl.where(small, r - 0.015625, r)
    # x's sign bit onto r (not `-r`, which Triton computes as 0 - r: +0 where torch keeps -0)
    sign = x.to(tl.int32, bitcast=True) & -0x80000000
    return (r.to(tl.int32, bitcast=True) | sign).to(tl.float32, bitcast=True)


@triton.jit
def _to_fp8(x, scale):
    return round_to_e4m3(tl.minimum(tl.maximum(x.to(tl.float32) / scale, -448.0), 448.0))


@triton.jit
def _store_kv_kernel(
    key_ptr, value_ptr, k_cache_ptr, v_cache_ptr, slot_ptr, k_scale_ptr, v_scale_ptr,
    stride_kt, stride_kh, stride_kd,
    stride_vt, stride_vh, stride_vd,
    stride_kc_blk, stride_kc_slot, stride_kc_h, stride_kc_d,
    stride_vc_blk, stride_vc_slot, stride_vc_h, stride_vc_d,
    NUM_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr,
    BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr, FP8: tl.constexpr, PDL: tl.constexpr,
):
    wait_for_previous(PDL)      # launched early: wait for the kernel ahead (pdl.py)
    token = tl.program_id(0).to(tl.int64)
    slot = tl.load(slot_ptr + token).to(tl.int64)
    if slot < 0:
        return
    block = slot // BLOCK_SIZE
    offset = slot % BLOCK_SIZE

    heads = tl.arange(0, BLOCK_H)[:, None]
    dims = tl.arange(0, BLOCK_D)[None, :]
    mask = (heads < NUM_HEADS) & (dims < HEAD_DIM)

    k = tl.load(key_ptr + token * stride_kt + heads * stride_kh + dims * stride_kd, mask=mask)
    v = tl.load(value_ptr + token * stride_vt + heads * stride_vh + dims * stride_vd, mask=mask)
    k_dst = k_cache_ptr + block * stride_kc_blk + offset * stride_kc_slot + heads * stride_kc_h + dims * stride_kc_d
    v_dst = v_cache_ptr + block * stride_vc_blk + offset * stride_vc_slot + heads * stride_vc_h + dims * stride_vc_d
    if FP8:
        k = _to_fp8(k, tl.load(k_scale_ptr))
        v = _to_fp8(v, tl.load(v_scale_ptr))
    tl.store(k_dst, k.to(k_cache_ptr.dtype.element_ty), mask=mask)
    tl.store(v_dst, v.to(v_cache_ptr.dtype.element_ty), mask=mask)


def store_kv_cache(key: torch.Tensor, value: torch.Tensor, k_cache: torch.Tensor,
                   v_cache: torch.Tensor, slot_mapping: torch.Tensor,
                   k_scale: torch.Tensor | None = None, v_scale: torch.Tensor | None = None) -> None:
    """Write key/value [num_tokens, num_kv_heads, head_dim] into k_cache/v_cache
    [num_blocks, block_size, num_kv_heads, head_dim] at `slot_mapping` (negative = skip).
    A float8 cache stores key / k_scale and value / v_scale (1-element float32 tensors; None: 1)."""
    num_tokens, num_heads, head_dim = key.shape
    if value.shape != key.shape:
        raise ValueError(f"key {tuple(key.shape)} and value {tuple(value.shape)} differ in shape")
    if k_cache.shape[2:] != (num_heads, head_dim) or v_cache.shape != k_cache.shape:
        raise ValueError(f"caches {tuple(k_cache.shape)}/{tuple(v_cache.shape)} do not fit "
                         f"key {tuple(key.shape)}")
    if slot_mapping.shape[0] < num_tokens:
        raise ValueError(f"slot_mapping has {slot_mapping.shape[0]} entries for {num_tokens} tokens")
    if num_tokens == 0:
        return
    fp8 = k_cache.dtype == torch.float8_e4m3fn
    if fp8 and (k_scale is None or v_scale is None):
        k_scale = v_scale = torch.ones(1, dtype=torch.float32, device=key.device)
    _store_kv_kernel[(num_tokens,)](
        key, value, k_cache, v_cache, slot_mapping, k_scale if fp8 else slot_mapping, v_scale if fp8 else slot_mapping,
        *key.stride(), *value.stride(), *k_cache.stride(), *v_cache.stride(),
        NUM_HEADS=num_heads, HEAD_DIM=head_dim, BLOCK_SIZE=k_cache.shape[1],
        BLOCK_H=triton.next_power_of_2(num_heads), BLOCK_D=triton.next_power_of_2(head_dim), FP8=fp8,
        num_warps=4, **pdl_options(key.device),
    )
