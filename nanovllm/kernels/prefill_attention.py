"""Triton kernel: varlen causal attention of new query tokens over the paged KV cache.

Serves plain prefill, prefill after a prefix-cache hit, chunked prefill and mixed batches
(some sequences with one query token). Every key and value is read through the block table:
the new tokens' K/V were stored by store_kv_cache before this runs. Semantics: reference.py.

* One program per (query tile, KV head). A tile holds BLOCK_Q query tokens of one sequence
  times the GROUP query heads that share the KV head (grouped-query attention), packed as
  the BLOCK_M = BLOCK_Q * BLOCK_G rows of one matrix, so each K/V tile is read once for all
  of them. Row r is token r // BLOCK_G, head r % BLOCK_G of the group.
* No host sync: the grid has `num_tokens // BLOCK_Q + num_seqs` tiles, an upper bound known
  without reading the lengths. Sequence b owns the tile ids from `cu_seqlens_q[b] // BLOCK_Q + b`
  on (that leaves at least cdiv(q_len_b, BLOCK_Q) ids to each); each program finds its
  sequence by binary search over those starts, and the spare programs exit at once.
* Query token j of a sequence with `ctx = seq_len - q_len` cached tokens sits at position
  ctx + j and sees keys 0..ctx + j. Keys below ctx + q_start + 1 are visible to every row of
  the tile: those KV tiles run without a mask; only the last few tiles apply the causal mask.
* The KV walk goes in tiles of BLOCK_N tokens, independent of the cache block size: each
  token's physical block comes from the block table.
* Sliding window (`window=W`): row at position p sees keys p - W + 1 .. p only. The walk
  starts at the tile holding the first row's oldest visible key; tiles that some row sees
  only in part (at the window's lower edge, as at the causal edge) run with both masks.
* Online softmax in base 2, fp32 accumulators.
"""
import torch
import triton
import triton.language as tl

from nanovllm.kernels.online_softmax import fp16_mma, fp16_query, online_softmax_update, tile_scores

LOG2E = 1.4426950408889634

# Tuning knobs (chosen on an H100, see docs/kernels.md); benchmarks may override them.
DEFAULT_CONFIG = {"BLOCK_M": 64, "BLOCK_N": 64, "num_warps": 4, "num_stages": 2}
# A float8 cache (half the bytes per K/V tile); benchmarks/bench_kernels.py --only fp8 --sweep times others.
FP8_CONFIG = dict(DEFAULT_CONFIG)


@triton.jit
def _find_sequence(cu_seqlens_ptr, num_seqs, tile_id, BLOCK_Q: tl.constexpr):
    """Largest b with cu_seqlens[b] // BLOCK_Q + b <= tile_id (binary search)."""
    lo = tile_id * 0          # int32 tensors (num_seqs == 1 would be specialised to a constant)
    hi = lo + num_seqs - 1
    while lo < hi:
        mid = (lo + hi + 1) // 2
        first_tile = tl.load(cu_seqlens_ptr + mid) // BLOCK_Q + mid
        ok = first_tile <= tile_id
        lo = tl.where(ok, mid, lo)
        hi = tl.where(ok, hi, mid - 1)
    return lo


@triton.jit
def _attend_kv_tile(acc, l_i, m_i, q, k_head, v_head, bt_row, kv_start, q_pos, scale_log2,
                    stride_bt_i, stride_kb, stride_ks, stride_vb, stride_vs, d_mask, window,
                    BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr, MASKED: tl.constexpr,
                    SLIDING: tl.constexpr, IEEE: tl.constexpr):
    """Online-softmax update of one tile of BLOCK_N keys starting at kv_start."""
    n = kv_start + tl.arange(0, BLOCK_N)
    slot = n % BLOCK_SIZE
    if BLOCK_SIZE >= BLOCK_N:
        # the tile lies inside one cache block (kv_start is a multiple of BLOCK_N): one look-up
        block = tl.load(bt_row + (kv_start // BLOCK_SIZE) * stride_bt_i).to(tl.int64)
    if MASKED:
        # the causal bound also keeps every key below seq_len (q_pos of real rows < seq_len)
        n_valid = n <= tl.max(q_pos, 0)
        kv_mask = n_valid[:, None] & d_mask[None, :]
        if BLOCK_SIZE < BLOCK_N:
            block = tl.load(bt_row + (n // BLOCK_SIZE) * stride_bt_i, mask=n_valid, other=0).to(tl.int64)
    else:
        kv_mask = d_mask[None, :]
        if BLOCK_SIZE < BLOCK_N:
            block = tl.load(bt_row + (n // BLOCK_SIZE) * stride_bt_i).to(tl.int64)
    k = tl.load(k_head + (block * stride_kb + slot * stride_ks)[:, None], mask=kv_mask, other=0.0)
    v = tl.load(v_head + (block * stride_vb + slot * stride_vs)[:, None], mask=kv_mask, other=0.0)

    s = tile_scores(q, k, IEEE)
    if MASKED:
        visible = n[None, :] <= q_pos[:, None]
        if SLIDING:
            visible &= n[None, :] > q_pos[:, None] - window
        s = tl.where(visible, s, float("-inf"))
    return online_softmax_update(acc, l_i, m_i, s, scale_log2, v, q, IEEE)


# The batch size and the block table's width change from step to step: specialising on them
# (Triton does for ints equal to 1 or divisible by 16) would compile new variants mid-run.
@triton.jit(do_not_specialize=["num_seqs", "stride_bt_b", "window"])
def _prefill_kernel(
    q_ptr, k_cache_ptr, v_cache_ptr, cu_seqlens_ptr, seq_lens_ptr, block_tables_ptr, out_ptr,
    k_scale_ptr, v_scale_ptr, num_seqs, scale_log2, window,
    stride_qt, stride_qh, stride_qd,
    stride_kb, stride_ks, stride_kh, stride_kd,
    stride_vb, stride_vs, stride_vh, stride_vd,
    stride_bt_b, stride_bt_i,
    stride_ot, stride_oh, stride_od,
    GROUP: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_M: tl.constexpr,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr, SLIDING: tl.constexpr, IEEE: tl.constexpr,
    KV_SCALED: tl.constexpr, FP16_MMA: tl.constexpr,
):
    if KV_SCALED:   # a float8 cache: the keys' scale joins the softmax's, the values' the output's
        scale_log2 = scale_log2 * tl.load(k_scale_ptr)
    # heaviest tiles (last in their sequence: the most keys) first, for a shorter tail
    tile_id = tl.num_programs(0) - 1 - tl.program_id(0)
    kv_head = tl.program_id(1)

    seq = _find_sequence(cu_seqlens_ptr, num_seqs, tile_id, BLOCK_Q)
    q_begin = tl.load(cu_seqlens_ptr + seq)
    q_len = tl.load(cu_seqlens_ptr + seq + 1) - q_begin
    q_start = (tile_id - (q_begin // BLOCK_Q + seq)) * BLOCK_Q
    if q_start >= q_len:
        return   # a spare tile id
    seq_len = tl.load(seq_lens_ptr + seq)
    ctx = seq_len - q_len

    rows = tl.arange(0, BLOCK_M)
    tok = q_start + rows // BLOCK_G          # query token index inside the sequence
    g = rows % BLOCK_G
    row_valid = (tok < q_len) & (g < GROUP)
    head = kv_head * GROUP + g
    d = tl.arange(0, BLOCK_D)
    d_mask = d < HEAD_DIM
    q_rows = (q_begin + tok).to(tl.int64) * stride_qt + head * stride_qh
    q = tl.load(q_ptr + q_rows[:, None] + d[None, :] * stride_qd,
                mask=row_valid[:, None] & d_mask[None, :], other=0.0)
    if FP16_MMA:    # a bfloat16 query over a float8 cache: multiply in float16 (online_softmax.py)
        q, q_unscale = fp16_query(q)
        scale_log2 = scale_log2 * q_unscale
    # position of each row's token; padding rows get the last real one so they stay in bounds
    q_pos = ctx + tl.minimum(tok, q_len - 1)

    if SLIDING:
        # a finite start: a row whose window begins past a whole tile sees only masked keys
        # there, and exp2(-inf - -inf) would be NaN
        m_i = tl.full([BLOCK_M], -1.0e30, tl.float32)
    else:
        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)

    bt_row = block_tables_ptr + seq.to(tl.int64) * stride_bt_b
    k_head = k_cache_ptr + kv_head * stride_kh + d[None, :] * stride_kd
    v_head = v_cache_ptr + kv_head * stride_vh + d[None, :] * stride_vd
    # Keys [0, ctx + q_start + 1) are visible to every row (causally): whole tiles of them need
    # no causal mask. With a window, keys from the last row's oldest visible key on are inside
    # every row's window: tiles before that need the window mask.
    unmasked_end = (ctx + q_start + 1) // BLOCK_N * BLOCK_N
    kv_end = ctx + tl.minimum(q_start + BLOCK_Q, q_len)
    kv_begin = unmasked_end * 0
    full_begin = kv_begin
    if SLIDING:
        kv_begin = tl.maximum(ctx + q_start - window + 1, 0) // BLOCK_N * BLOCK_N
        last_oldest = tl.maximum(kv_end - window, 0)     # the last row's oldest visible key
        full_begin = tl.minimum(tl.cdiv(last_oldest, BLOCK_N) * BLOCK_N, unmasked_end)
    for kv_start in range(kv_begin, full_begin, BLOCK_N):
        acc, l_i, m_i = _attend_kv_tile(acc, l_i, m_i, q, k_head, v_head, bt_row, kv_start, q_pos,
                                        scale_log2, stride_bt_i, stride_kb, stride_ks, stride_vb,
                                        stride_vs, d_mask, window, BLOCK_SIZE, BLOCK_N, True, SLIDING, IEEE)
    for kv_start in range(full_begin, unmasked_end, BLOCK_N):
        acc, l_i, m_i = _attend_kv_tile(acc, l_i, m_i, q, k_head, v_head, bt_row, kv_start, q_pos,
                                        scale_log2, stride_bt_i, stride_kb, stride_ks, stride_vb,
                                        stride_vs, d_mask, window, BLOCK_SIZE, BLOCK_N, False, SLIDING, IEEE)
    for kv_start in range(tl.maximum(unmasked_end, full_begin), kv_end, BLOCK_N):
        acc, l_i, m_i = _attend_kv_tile(acc, l_i, m_i, q, k_head, v_head, bt_row, kv_start, q_pos,
                                        scale_log2, stride_bt_i, stride_kb, stride_ks, stride_vb,
                                        stride_vs, d_mask, window, BLOCK_SIZE, BLOCK_N, True, SLIDING, IEEE)

    o = acc / l_i[:, None]
    if KV_SCALED:
        o = o * tl.load(v_scale_ptr)
    o_rows = (q_begin + tok).to(tl.int64) * stride_ot + head * stride_oh
    tl.store(out_ptr + o_rows[:, None] + d[None, :] * stride_od, o.to(out_ptr.dtype.element_ty),
             mask=row_valid[:, None] & d_mask[None, :])


def paged_prefill_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                            cu_seqlens_q: torch.Tensor, seq_lens: torch.Tensor,
                            block_tables: torch.Tensor, max_seqlen_q: int, scale: float,
                            out: torch.Tensor | None = None, *, window: int | None = None,
                            config: dict | None = None, k_scale: torch.Tensor | None = None,
                            v_scale: torch.Tensor | None = None) -> torch.Tensor:
    """Causal attention of q [num_tokens, Hq, D] (the new tokens of each sequence, packed as
    cu_seqlens_q [num_seqs + 1] says) over the paged cache [num_blocks, block_size, Hkv, D];
    seq_lens [num_seqs] counts each sequence's cached tokens, the new ones included.

    `max_seqlen_q` (a host int, the longest q_len) only shrinks the query tile for batches
    of short queries; it is never read from the device. Returns [num_tokens, Hq, D] in
    q's dtype. `window`: sliding-window attention over the last `window` keys (None: all).
    `config` overrides DEFAULT_CONFIG, or FP8_CONFIG for a float8 cache (for tuning). k_scale /
    v_scale: a float8 cache's scales (1-element float32 tensors, see nanovllm/quantization/kv_cache.py).
    """
    num_tokens, num_heads, head_dim = q.shape
    num_kv_heads, block_size = k_cache.shape[2], k_cache.shape[1]
    num_seqs = seq_lens.shape[0]
    if num_heads % num_kv_heads:
        raise ValueError(f"{num_heads} query heads is not a multiple of {num_kv_heads} KV heads")
    if k_cache.shape[3] != head_dim or v_cache.shape != k_cache.shape:
        raise ValueError(f"caches {tuple(k_cache.shape)}/{tuple(v_cache.shape)} do not fit q {tuple(q.shape)}")
    if cu_seqlens_q.shape[0] != num_seqs + 1:
        raise ValueError(f"cu_seqlens_q has {cu_seqlens_q.shape[0]} entries for {num_seqs} sequences")
    if window is not None and window < 1:
        raise ValueError(f"window must be a positive number of keys or None, got {window}")
    cfg = {**(FP8_CONFIG if k_cache.dtype == torch.float8_e4m3fn else DEFAULT_CONFIG), **(config or {})}
    if out is None:
        out = torch.empty_like(q, memory_format=torch.contiguous_format)
    if num_tokens == 0 or num_seqs == 0:
        return out

    group = num_heads // num_kv_heads
    block_g = triton.next_power_of_2(group)
    block_q = max(1, cfg["BLOCK_M"] // block_g)
    # short queries (decode-like or small chunks): smaller tiles, at least 16 rows for tl.dot
    block_q = max(min(block_q, triton.next_power_of_2(max(1, max_seqlen_q))), triton.cdiv(16, block_g))
    num_tiles = num_tokens // block_q + num_seqs

    _prefill_kernel[(num_tiles, num_kv_heads)](
        q, k_cache, v_cache, cu_seqlens_q, seq_lens, block_tables, out,
        q if k_scale is None else k_scale, q if v_scale is None else v_scale, num_seqs, scale * LOG2E, window or 0,
        *q.stride(), *k_cache.stride(), *v_cache.stride(), *block_tables.stride(), *out.stride(),
        GROUP=group, BLOCK_G=block_g, BLOCK_Q=block_q, BLOCK_M=block_q * block_g,
        HEAD_DIM=head_dim, BLOCK_D=triton.next_power_of_2(head_dim),
        BLOCK_SIZE=block_size, BLOCK_N=cfg["BLOCK_N"], SLIDING=window is not None,
        IEEE=q.dtype == torch.float32, KV_SCALED=k_scale is not None, FP16_MMA=fp16_mma(q, k_cache),
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
    )
    return out
