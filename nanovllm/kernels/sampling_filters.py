"""Triton kernel: each row's top-k / top-p / min-p cut-off, found without sorting.

The filters all keep the tokens whose logit is at least some threshold (ties with it kept):
  top-k  the k-th largest logit;
  top-p  (after top-k) the smallest logit v such that the tokens strictly more likely than v
         hold less than top_p of the (top-k) probability mass, i.e. the nucleus;
  min-p  max_logit + T * log(min_p) (p_i >= min_p * p_max, in logit space).
The torch reference sorts (layers/sampler.py: `apply_top_k_top_p`, `apply_min_p`). Here the
logits' bit patterns are mapped to integer keys in the same order (16 bits for bf16/fp16
logits, 32 for fp32), and each threshold is the largest key u such that the tokens with key
>= u still number at least k (top-k) or still hold at least top_p of the mass (top-p). That
u is found 2 bits at a time, most significant first: one pass over the row counts (or sums)
the tokens at or above 4 candidate values at once and keeps the highest candidate that
still qualifies; the high bits that the search's lower and upper bounds share are known
without a pass. A bf16 row takes at most 8 passes per filter instead of a sort (2 bits a
pass with 2048-token tiles was the fastest of 1, 2 and 4 bits and 256-2048 tokens on an H100). The result is each
row's threshold as a float32 key (`order_key`); gumbel_sample then draws among the tokens
at or above it.
"""
import torch
import triton
import triton.language as tl

_KEY_MIN32 = tl.constexpr(-2**31)     # below every float32 key


@triton.jit
def order_key(x):
    """float32 -> int32 with the same order (for finite values and +-inf)."""
    bits = x.to(tl.int32, bitcast=True)
    return tl.where(bits >= 0, bits, bits ^ 0x7FFFFFFF)


@triton.jit
def _row_key(x, KEY_BITS: tl.constexpr):
    """Logits in their own dtype -> int32 keys in the same order, KEY_BITS wide (signed)."""
    if KEY_BITS == 16:
        bits = x.to(tl.int16, bitcast=True).to(tl.int32)
        return tl.where(bits >= 0, bits, bits ^ 0x7FFF)
    else:
        return order_key(x.to(tl.float32))


@triton.jit
def _as_float32_key(key, dtype: tl.constexpr, KEY_BITS: tl.constexpr):
    """A _row_key back to the value it stands for, as order_key(float32 value)."""
    if KEY_BITS == 16:
        bits = tl.where(key >= 0, key, key ^ 0x7FFF).to(tl.int16)
        return order_key(bits.to(dtype, bitcast=True).to(tl.float32))
    else:
        return key


@triton.jit
def _largest_key_reaching(row_ptr, vocab_size, floor, ceiling, goal, top, inv_t, WEIGHTED: tl.constexpr,
                          KEY_BITS: tl.constexpr, DIGIT_BITS: tl.constexpr, BLOCK: tl.constexpr):
    """The largest key u such that the tokens with key >= max(u, floor) number at least
    `goal` (or, WEIGHTED, hold weight exp((x - top) / T) of at least `goal`), given that u
    lies in [floor, ceiling]: the high bits those two share are u's too, and need no pass."""
    HALF: tl.constexpr = 1 << (KEY_BITS - 1)        # keys + HALF are >= 0, in the same order
    low, high = floor.to(tl.int64) + HALF, ceiling.to(tl.int64) + HALF
    known = 0                                       # passes whose bits low and high share
    for i in tl.static_range(KEY_BITS // DIGIT_BITS):
        known += ((low >> (KEY_BITS - DIGIT_BITS * (i + 1))) == (high >> (KEY_BITS - DIGIT_BITS * (i + 1)))).to(tl.int32)
    found = (low >> (KEY_BITS - DIGIT_BITS * known)) << (KEY_BITS - DIGIT_BITS * known)   # u's bits so far
    digits = tl.arange(0, 1 << DIGIT_BITS)
    for i in tl.range(known, KEY_BITS // DIGIT_BITS):
        shift = KEY_BITS - DIGIT_BITS * (i + 1)
        candidates = (found + (digits.to(tl.int64) << shift) - HALF).to(tl.int32)
        # One [BLOCK, candidates] tile per step. The logits are loaded as a [BLOCK, 1] column
        # of that tile: loaded as a [BLOCK] vector and broadcast, they would be moved between
        # register layouts every step (2-3x slower on an H100).
        reach = tl.zeros([BLOCK, 1 << DIGIT_BITS], tl.float32)   # counts stay exact in float32
        for start in tl.range(0, vocab_size, BLOCK):
            cols = start + tl.arange(0, BLOCK)[:, None]
            x = tl.load(row_ptr + cols, mask=cols < vocab_size, other=float("-inf"))
            key = _row_key(x, KEY_BITS)
            at_or_above = (key >= candidates[None, :]) & (cols < vocab_size) & (key >= floor)
            if WEIGHTED:
                reach += tl.where(at_or_above, tl.exp((x.to(tl.float32) - top) * inv_t), 0.0)
            else:
                reach += at_or_above.to(tl.float32)
        totals = tl.sum(reach, axis=0)
        # Candidate 0 qualifies whenever the bits found so far do; keep the highest that does.
        best = tl.max(tl.where(totals >= goal, digits, 0), axis=0)
        found += best.to(tl.int64) << shift
    return (found - HALF).to(tl.int32)


@triton.jit
def _kth_largest(keys, k, KEY_BITS: tl.constexpr, DIGIT_BITS: tl.constexpr):
    """The k-th largest of a vector of keys (1 <= k <= its length), the same search in registers."""
    HALF: tl.constexpr = 1 << (KEY_BITS - 1)
    digits = tl.arange(0, 1 << DIGIT_BITS)
    found = tl.full([], 0, tl.int64)
    for i in tl.static_range(KEY_BITS // DIGIT_BITS):
        shift = KEY_BITS - DIGIT_BITS * (i + 1)
        candidates = (found + (digits.to(tl.int64) << shift) - HALF).to(tl.int32)
        counts = tl.sum((keys[:, None] >= candidates[None, :]).to(tl.int32), axis=0)
        found += tl.max(tl.where(counts >= k, digits, 0), axis=0).to(tl.int64) << shift
    return (found - HALF).to(tl.int32)


@triton.jit
def _thresholds_kernel(logits_ptr, stride_row, vocab_size, temperature_ptr, top_k_ptr, top_p_ptr, min_p_ptr,
                       out_ptr, KEY_BITS: tl.constexpr, DIGIT_BITS: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    row_ptr = logits_ptr + row * stride_row
    dtype: tl.constexpr = logits_ptr.dtype.element_ty
    inv_t = 1.0 / tl.load(temperature_ptr + row)
    k = tl.load(top_k_ptr + row)
    p = tl.load(top_p_ptr + row)
    min_p = tl.load(min_p_ptr + row)
    no_key = tl.full([], -(1 << (KEY_BITS - 1)), tl.int32)

    # One pass for each lane's largest logit: the row's top, and a floor for its k-th largest
    # (the k-th largest lane maximum: at least k tokens reach it).
    best = tl.full([BLOCK], float("-inf"), tl.float32)
    best_key = tl.full([BLOCK], -(1 << (KEY_BITS - 1)), tl.int32)
    for start in tl.range(0, vocab_size, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        x = tl.load(row_ptr + cols, mask=cols < vocab_size, other=float("-inf"))
        best = tl.maximum(best, x.to(tl.float32))
        best_key = tl.maximum(best_key, tl.where(cols < vocab_size, _row_key(x, KEY_BITS), no_key))
    top = tl.max(best, axis=0)
    top_key = tl.max(best_key, axis=0)

    result = tl.full([], _KEY_MIN32, tl.int32)
    key_k = no_key
    if (k > 0) & (k < vocab_size):               # top-k: the k-th largest key
        floor = no_key
        if k <= tl.minimum(vocab_size, BLOCK):   # every lane holds a token
            floor = _kth_largest(best_key, k, KEY_BITS, DIGIT_BITS)
        key_k = _largest_key_reaching(row_ptr, vocab_size, floor, top_key, k.to(tl.float32), top, inv_t,
                                      False, KEY_BITS, DIGIT_BITS, BLOCK)
        result = tl.maximum(result, _as_float32_key(key_k, dtype, KEY_BITS))
    if p < 1.0:                                  # top-p among the top-k
        mass = tl.zeros([BLOCK], tl.float32)
        for start in tl.range(0, vocab_size, BLOCK):
            cols = start + tl.arange(0, BLOCK)
            x = tl.load(row_ptr + cols, mask=cols < vocab_size, other=float("-inf"))
            keep = (cols < vocab_size) & (_row_key(x, KEY_BITS) >= key_k)
            mass += tl.where(keep, tl.exp((x.to(tl.float32) - top) * inv_t), 0.0)
        key_p = _largest_key_reaching(row_ptr, vocab_size, key_k, top_key, p * tl.sum(mass, axis=0), top, inv_t,
                                      True, KEY_BITS, DIGIT_BITS, BLOCK)
        result = tl.maximum(result, _as_float32_key(key_p, dtype, KEY_BITS))
    if min_p > 0.0:
        result = tl.maximum(result, order_key(top + tl.log(min_p) / inv_t))
    tl.store(out_ptr + row, result)


def sampling_thresholds(logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor | None,
                        top_p: torch.Tensor | None, min_p: torch.Tensor | None) -> torch.Tensor:
    """logits [B, V]; per row temperature (> 0; 1.0 on greedy rows), top_k (0 = off), top_p
    (1.0 = off), min_p (0.0 = off), each [B] or None for "off everywhere" -> [B] int32 keys:
    row b keeps the tokens whose order_key(logit) is at least key[b]."""
    if logits.dim() != 2 or logits.stride(1) != 1:
        raise ValueError(f"logits must be [rows, vocab] with contiguous rows, got {tuple(logits.shape)}")
    rows, vocab_size = logits.shape
    device = logits.device
    top_k = torch.zeros(rows, dtype=torch.int32, device=device) if top_k is None else top_k.to(torch.int32)
    top_p = torch.ones(rows, dtype=torch.float32, device=device) if top_p is None else top_p.float()
    min_p = torch.zeros(rows, dtype=torch.float32, device=device) if min_p is None else min_p.float()
    out = torch.empty(rows, dtype=torch.int32, device=device)
    if rows:
        _thresholds_kernel[(rows,)](logits, logits.stride(0), vocab_size, temperature.float().contiguous(),
                                    top_k.contiguous(), top_p.contiguous(), min_p.contiguous(), out,
                                    KEY_BITS=8 * logits.element_size(), DIGIT_BITS=2,
                                    BLOCK=min(2048, triton.next_power_of_2(vocab_size)), num_warps=8)
    return out
