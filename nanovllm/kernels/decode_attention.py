"""Triton kernels: paged decode attention with split-KV (flash-decoding).

Decode reads every cached K/V byte of every running sequence once per step and does about
two FLOPs per byte, so it is bound by memory bandwidth. The design follows from that:

* One program per (sequence, KV head, split). The query heads that share the KV head
  (grouped-query attention) are packed into the rows of one tile, so each K/V tile is read
  once for all of them.
* Each sequence's context is cut into `num_splits` segments, a whole number of BLOCK_N-token
  tiles each, so that a few long sequences still give enough programs to fill the GPU.
  The segment bounds are computed on the device from `seq_lens`: the grid depends on the
  batch size (and model shape) only, so one captured CUDA graph serves every context length.
* Each split writes an fp32 partial output, already normalised, and its log-sum-exp; a small
  merge kernel combines the splits. With one split the first kernel writes the output itself.
* The KV walk is independent of the cache block size: each tile of BLOCK_N tokens looks up
  the physical block of every token in the block table.
* Sliding window (`window=W`): only the last W keys are split and read, from the tile that
  holds the oldest of them; keys before it in that tile are masked.
"""

import torch
import triton
import triton.language as tl
from triton.runtime.interpreter import InterpretedFunction

from nanovllm.kernels.online_softmax import (fp8_value_pairs, fp16_mma, fp16_query, online_softmax_update,
                                             softmax_weights, tile_scores)
from nanovllm.kernels.pdl import pdl_options, prefetch_l2, wait_for_previous
from nanovllm.kernels.split_k import sm_count

LOG2E = 1.4426950408889634

# Tuning knobs (chosen on an H100, see docs/kernels.md); benchmarks may override them.
DEFAULT_CONFIG = {"BLOCK_N": 64, "num_warps": 4, "num_stages": 2}
# A float8 cache: half the bytes per tile, and its own code path (V_PAIRS: values read as int16
# pairs, see online_softmax.py). benchmarks/bench_kernels.py --sweep times the alternatives.
FP8_CONFIG = {"BLOCK_N": 128, "num_warps": 4, "num_stages": 2, "V_PAIRS": True}
MAX_SPLITS = 64


@triton.jit
def _prefetch_first_tile(k_cache_ptr, v_cache_ptr, bt_row, stride_bt_i, start, end, kv_head,
                         stride_kb, stride_ks, stride_kh, stride_kd, stride_vb, stride_vs, stride_vh, stride_vd,
                         BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr,
                         BLOCK_D: tl.constexpr):
    """Start pulling the 128-byte lines of the split's first tile of keys and values into L2. (The
    newest key may still be being stored by the kernel ahead: a prefetch only warms L2, where
    that store lands too; the loads come after the wait.)"""
    LINE: tl.constexpr = 1024 // k_cache_ptr.dtype.element_ty.primitive_bitwidth     # elements a line
    n = start + tl.arange(0, BLOCK_N)
    block = tl.load(bt_row + (n // BLOCK_SIZE) * stride_bt_i, mask=n < end, other=0).to(tl.int64)[:, None]
    slot = (n % BLOCK_SIZE)[:, None]
    LINES: tl.constexpr = BLOCK_D // LINE if BLOCK_D > LINE else 1
    line = tl.minimum(tl.arange(0, LINES) * LINE, HEAD_DIM - 1)[None, :]     # each line's first element
    prefetch_l2(k_cache_ptr + block * stride_kb + slot * stride_ks + kv_head * stride_kh + line * stride_kd)
    prefetch_l2(v_cache_ptr + block * stride_vb + slot * stride_vs + kv_head * stride_vh + line * stride_vd)


# The block table's width changes from step to step outside CUDA graphs: do not compile a
# variant per width class (Triton specialises ints equal to 1 or divisible by 16).
@triton.jit(do_not_specialize=["stride_bt_b", "window"])
def _decode_split_kernel(
    q_ptr, k_cache_ptr, v_cache_ptr, seq_lens_ptr, block_tables_ptr,
    part_out_ptr, part_lse_ptr, out_ptr, k_scale_ptr, v_scale_ptr,
    scale_log2, window,
    stride_qb, stride_qh, stride_qd,
    stride_kb, stride_ks, stride_kh, stride_kd,
    stride_vb, stride_vs, stride_vh, stride_vd,
    stride_bt_b, stride_bt_i,
    stride_pb, stride_ph, stride_ps,   # partial out [B, Hq, S, BLOCK_D], last stride 1
    stride_lb, stride_lh,              # partial lse [B, Hq, S], last stride 1
    stride_ob, stride_oh, stride_od,
    GROUP: tl.constexpr, BLOCK_G: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr, NUM_SPLITS: tl.constexpr,
    DIRECT: tl.constexpr, SLIDING: tl.constexpr, IEEE: tl.constexpr, KV_SCALED: tl.constexpr,
    FP16_MMA: tl.constexpr, V_PAIRS: tl.constexpr, INLINE_ASM: tl.constexpr, PDL: tl.constexpr,
):
    seq = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)

    # The step's inputs (lengths, block tables) and the cache's older keys and values were written
    # before the kernels ahead ran: read and prefetch them before waiting (pdl.py).
    seq_len = tl.load(seq_lens_ptr + seq)
    first_key = seq_len * 0                # the oldest key the query sees
    if SLIDING:
        first_key = tl.maximum(seq_len - window, 0)
    walk_start = first_key // BLOCK_N * BLOCK_N
    # Segment of this split: a whole number of tiles, computed on the device.
    num_tiles = tl.cdiv(seq_len - walk_start, BLOCK_N)
    tiles_per_split = tl.cdiv(num_tiles, NUM_SPLITS)
    start = walk_start + split * tiles_per_split * BLOCK_N
    end = tl.minimum(start + tiles_per_split * BLOCK_N, seq_len)
    bt_row = block_tables_ptr + seq.to(tl.int64) * stride_bt_b
    if PDL and start < end:         # (a split past the end of a short sequence has nothing to read)
        _prefetch_first_tile(k_cache_ptr, v_cache_ptr, bt_row, stride_bt_i, start, end, kv_head,
                             stride_kb, stride_ks, stride_kh, stride_kd, stride_vb, stride_vs, stride_vh, stride_vd,
                             BLOCK_SIZE, BLOCK_N, HEAD_DIM, BLOCK_D)
    wait_for_previous(PDL)          # launched early: wait for the kernel ahead (pdl.py)
    if KV_SCALED:   # a float8 cache: the keys' scale joins the softmax's, the values' the output's
        scale_log2 = scale_log2 * tl.load(k_scale_ptr)

    g = tl.arange(0, BLOCK_G)
    d = tl.arange(0, BLOCK_D)
    heads = kv_head * GROUP + g
    g_mask = g < GROUP
    d_mask = d < HEAD_DIM
    q = tl.load(q_ptr + seq.to(tl.int64) * stride_qb + heads[:, None] * stride_qh + d[None, :] * stride_qd,
                mask=g_mask[:, None] & d_mask[None, :], other=0.0)
    if FP16_MMA:    # a bfloat16 query over a float8 cache: multiply in float16 (online_softmax.py)
        q, q_unscale = fp16_query(q)
        scale_log2 = scale_log2 * q_unscale

    m_i = tl.full([BLOCK_G], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_G], tl.float32)
    if V_PAIRS:     # the even and the odd dimensions of the output (online_softmax.py)
        acc_even = tl.zeros([BLOCK_G, BLOCK_D // 2], tl.float32)
        acc_odd = tl.zeros([BLOCK_G, BLOCK_D // 2], tl.float32)
        pair = tl.arange(0, BLOCK_D // 2)
        v_pairs = v_cache_ptr.to(tl.pointer_type(tl.int16)) + kv_head * (stride_vh // 2) + pair[None, :]
    else:
        acc = tl.zeros([BLOCK_G, BLOCK_D], tl.float32)

    k_head = k_cache_ptr + kv_head * stride_kh + d[None, :] * stride_kd
    v_head = v_cache_ptr + kv_head * stride_vh + d[None, :] * stride_vd
    for tile_start in range(start, end, BLOCK_N):
        n = tile_start + tl.arange(0, BLOCK_N)
        n_mask = (n < end) & (n >= first_key)
        if BLOCK_SIZE >= BLOCK_N:
            # the tile lies inside one cache block (tile_start is a multiple of BLOCK_N)
            block = tl.load(bt_row + (tile_start // BLOCK_SIZE) * stride_bt_i).to(tl.int64)
        else:
            block = tl.load(bt_row + (n // BLOCK_SIZE) * stride_bt_i, mask=n_mask, other=0).to(tl.int64)
        slot = n % BLOCK_SIZE
        kv_mask = n_mask[:, None] & d_mask[None, :]
        k = tl.load(k_head + (block * stride_kb + slot * stride_ks)[:, None], mask=kv_mask, other=0.0)
        s = tl.where(n_mask[None, :], tile_scores(q, k, IEEE), float("-inf"))
        if V_PAIRS:
            x = tl.load(v_pairs + ((block * stride_vb + slot * stride_vs) // 2)[:, None], mask=n_mask[:, None],
                        other=0)
            v_even, v_odd = fp8_value_pairs(x, INLINE_ASM)
            p, alpha, l_i, m_i = softmax_weights(l_i, m_i, s, scale_log2)
            p = p.to(tl.float16)
            acc_even = tl.dot(p, v_even, acc_even * alpha[:, None])
            acc_odd = tl.dot(p, v_odd, acc_odd * alpha[:, None])
        else:
            v = tl.load(v_head + (block * stride_vb + slot * stride_vs)[:, None], mask=kv_mask, other=0.0)
            acc, l_i, m_i = online_softmax_update(acc, l_i, m_i, s, scale_log2, v, q, IEEE)
    if V_PAIRS:     # dimension 2j is acc_even[:, j], 2j + 1 acc_odd[:, j]
        acc = tl.reshape(tl.join(acc_even, acc_odd), [BLOCK_G, BLOCK_D])

    empty = start >= end   # a split past the end of a short sequence (or seq_len 0)
    l_safe = tl.where(l_i > 0, l_i, 1.0)
    o = tl.where(empty, 0.0, acc / l_safe[:, None])
    if KV_SCALED:
        o = o * tl.load(v_scale_ptr)
    row_mask = g_mask[:, None] & d_mask[None, :]
    if DIRECT:
        o_ptrs = out_ptr + seq.to(tl.int64) * stride_ob + heads[:, None] * stride_oh + d[None, :] * stride_od
        tl.store(o_ptrs, o.to(out_ptr.dtype.element_ty), mask=row_mask)
    else:
        # log-sum-exp in base 2 of the scaled scores: m + log2(l)
        lse = tl.where(empty, float("-inf"), m_i + tl.log2(l_safe))
        p_ptrs = part_out_ptr + seq.to(tl.int64) * stride_pb + heads[:, None] * stride_ph + split * stride_ps
        tl.store(p_ptrs + d[None, :], o, mask=row_mask)
        l_ptrs = part_lse_ptr + seq.to(tl.int64) * stride_lb + heads * stride_lh + split
        tl.store(l_ptrs, lse, mask=g_mask)


@triton.jit
def _decode_merge_kernel(
    part_out_ptr, part_lse_ptr, out_ptr,
    stride_pb, stride_ph, stride_ps,
    stride_lb, stride_lh,
    stride_ob, stride_oh, stride_od,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, NUM_SPLITS: tl.constexpr, PDL: tl.constexpr,
):
    wait_for_previous(PDL)
    seq = tl.program_id(0)
    head = tl.program_id(1)
    s = tl.arange(0, NUM_SPLITS)
    d = tl.arange(0, BLOCK_D)
    lse = tl.load(part_lse_ptr + seq.to(tl.int64) * stride_lb + head * stride_lh + s)
    m = tl.max(lse, 0)
    m = tl.where(m == float("-inf"), 0.0, m)    # every split empty: output zeros
    w = tl.exp2(lse - m)
    total = tl.sum(w, 0)
    total = tl.where(total > 0, total, 1.0)
    p_ptrs = part_out_ptr + seq.to(tl.int64) * stride_pb + head * stride_ph + s[:, None] * stride_ps
    parts = tl.load(p_ptrs + d[None, :])
    o = tl.sum(parts * (w / total)[:, None], 0)
    tl.store(out_ptr + seq.to(tl.int64) * stride_ob + head * stride_oh + d * stride_od,
             o.to(out_ptr.dtype.element_ty), mask=d < HEAD_DIM)


def default_num_splits(batch_size: int, num_kv_heads: int, device: torch.device) -> int:
    """Splits per sequence so that batch x kv_heads x splits programs fill the GPU: the
    largest power of two that keeps that count near 4 programs per SM (at most MAX_SPLITS).

    Depends on the batch shape only (never on the sequence lengths), so it is fixed for a
    captured CUDA graph. On an H100, 256 x 1024 tokens runs best unsplit and 8 x 8192 with
    8 splits (docs/kernels.md).
    """
    if device.type == "cuda":
        target = 4 * sm_count(device)
    else:
        target = 16   # the interpreter runs programs one by one: keep the grid small
    splits = 1
    while splits * 2 <= MAX_SPLITS and batch_size * num_kv_heads * splits * 2 <= target:
        splits *= 2
    return splits


def _pairs_fit(q: torch.Tensor, v_cache: torch.Tensor) -> bool:
    """Can the kernel read this float8 value cache as int16 pairs (and multiply in float16)?"""
    head_dim = v_cache.shape[3]
    return (v_cache.dtype == torch.float8_e4m3fn and q.dtype != torch.float32 and head_dim >= 32
            and head_dim == triton.next_power_of_2(head_dim) and v_cache.stride(3) == 1
            and all(stride % 2 == 0 for stride in v_cache.stride()[:3]) and v_cache.data_ptr() % 2 == 0)


def paged_decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                           seq_lens: torch.Tensor, block_tables: torch.Tensor, scale: float,
                           num_splits: int | None = None, out: torch.Tensor | None = None,
                           *, window: int | None = None, config: dict | None = None,
                           k_scale: torch.Tensor | None = None, v_scale: torch.Tensor | None = None) -> torch.Tensor:
    """Attention of one new query token per sequence over its paged KV cache.

    q [B, Hq, D]; k_cache/v_cache [num_blocks, block_size, Hkv, D]; seq_lens [B] (cached
    tokens, the new one included; 0 gives a zero output); block_tables [B, max_blocks].
    Returns out [B, Hq, D] in q's dtype. `window`: attend to the last `window` keys only
    (None: all). `config` overrides DEFAULT_CONFIG, or FP8_CONFIG for a float8 cache (for
    tuning). k_scale / v_scale: a float8 cache's scales (1-element float32 tensors, see
    nanovllm/quantization/kv_cache.py).
    """
    batch, num_heads, head_dim = q.shape
    num_kv_heads, block_size = k_cache.shape[2], k_cache.shape[1]
    if num_heads % num_kv_heads:
        raise ValueError(f"{num_heads} query heads is not a multiple of {num_kv_heads} KV heads")
    if k_cache.shape[3] != head_dim or v_cache.shape != k_cache.shape:
        raise ValueError(f"caches {tuple(k_cache.shape)}/{tuple(v_cache.shape)} do not fit q {tuple(q.shape)}")
    if window is not None and window < 1:
        raise ValueError(f"window must be a positive number of keys or None, got {window}")
    fp8 = k_cache.dtype == torch.float8_e4m3fn
    cfg = {**(FP8_CONFIG if fp8 else DEFAULT_CONFIG), **(config or {})}
    if out is None:
        out = torch.empty_like(q, memory_format=torch.contiguous_format)
    if batch == 0:
        return out
    if num_splits is None:
        num_splits = default_num_splits(batch, num_kv_heads, q.device)
    if num_splits < 1 or num_splits & (num_splits - 1):
        raise ValueError(f"num_splits must be a power of two >= 1, got {num_splits}")

    group = num_heads // num_kv_heads
    pdl = pdl_options(q.device)
    block_d = triton.next_power_of_2(head_dim)
    direct = num_splits == 1
    if direct:
        part_out = part_lse = out     # unused
        p_strides, l_strides = (0, 0, 0), (0, 0)
    else:
        part_out = torch.empty(batch, num_heads, num_splits, block_d, dtype=torch.float32, device=q.device)
        part_lse = torch.empty(batch, num_heads, num_splits, dtype=torch.float32, device=q.device)
        p_strides, l_strides = part_out.stride()[:3], part_lse.stride()[:2]

    _decode_split_kernel[(batch, num_kv_heads, num_splits)](
        q, k_cache, v_cache, seq_lens, block_tables, part_out, part_lse, out,
        q if k_scale is None else k_scale, q if v_scale is None else v_scale, scale * LOG2E, window or 0,
        *q.stride(), *k_cache.stride()[:4], *v_cache.stride()[:4], *block_tables.stride(),
        *p_strides, *l_strides, *out.stride(),
        GROUP=group, BLOCK_G=max(16, triton.next_power_of_2(group)), HEAD_DIM=head_dim, BLOCK_D=block_d,
        BLOCK_SIZE=block_size, BLOCK_N=cfg["BLOCK_N"], NUM_SPLITS=num_splits,
        DIRECT=direct, SLIDING=window is not None, IEEE=q.dtype == torch.float32, KV_SCALED=k_scale is not None,
        FP16_MMA=fp16_mma(q, k_cache), V_PAIRS=cfg.get("V_PAIRS", False) and _pairs_fit(q, v_cache),
        INLINE_ASM=not isinstance(_decode_split_kernel, InterpretedFunction),
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"], **pdl,
    )
    if not direct:
        _decode_merge_kernel[(batch, num_heads)](
            part_out, part_lse, out, *p_strides, *l_strides, *out.stride(),
            HEAD_DIM=head_dim, BLOCK_D=block_d, NUM_SPLITS=num_splits, num_warps=4, **pdl,
        )
    return out
