"""Triton kernel: each row's top-k / top-p / min-p cut-off, found without sorting.

The filters all keep the tokens whose logit is at least some threshold (ties with it kept):
  top-k  the k-th largest logit;
  top-p  (after top-k) the smallest logit v such that the tokens strictly more likely than v
         hold less than top_p of the (top-k) probability mass, i.e. the nucleus;
  min-p  max_logit + T * log(min_p) (p_i >= min_p * p_max, in logit space).
The torch reference sorts (layers/sampler.py: `apply_top_k_top_p`, `apply_min_p`). Here each
threshold is found by bisection on the logits' float32 bit patterns, mapped to integers in
the same order: 32 halvings pin it exactly, each one a pass over the row counting (top-k) or
summing probability (top-p) above the midpoint. The row, read again and again by one program,
stays in L2. The result is each row's threshold as such an integer key; gumbel_sample then
draws among the tokens at or above it.
"""
import torch
import triton
import triton.language as tl

_KEY_MIN = tl.constexpr(-2**31)       # below every key
_KEY_MAX = tl.constexpr(2**31 - 1)


@triton.jit
def order_key(x):
    """float32 -> int32 with the same order (for finite values and +-inf)."""
    bits = x.to(tl.int32, bitcast=True)
    return tl.where(bits >= 0, bits, bits ^ 0x7FFFFFFF)


@triton.jit
def _mass_above(row_ptr, vocab_size, key_floor, key_gt, top, inv_t, BLOCK: tl.constexpr):
    """Sum of exp((x - top) / T) over tokens with key >= key_floor and key > key_gt."""
    total = tl.zeros([BLOCK], tl.float32)
    for start in tl.range(0, vocab_size, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        x = tl.load(row_ptr + cols, mask=cols < vocab_size, other=float("-inf")).to(tl.float32)
        key = order_key(x)
        keep = (key >= key_floor) & (key > key_gt) & (cols < vocab_size)
        total += tl.where(keep, tl.exp((x - top) * inv_t), 0.0)
    return tl.sum(total, axis=0)


@triton.jit
def _thresholds_kernel(logits_ptr, stride_row, vocab_size, temperature_ptr, top_k_ptr, top_p_ptr, min_p_ptr,
                       out_ptr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    row_ptr = logits_ptr + row * stride_row
    inv_t = 1.0 / tl.load(temperature_ptr + row)
    k = tl.load(top_k_ptr + row)
    p = tl.load(top_p_ptr + row)
    min_p = tl.load(min_p_ptr + row)

    best = tl.full([BLOCK], float("-inf"), tl.float32)
    for start in tl.range(0, vocab_size, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        best = tl.maximum(best, tl.load(row_ptr + cols, mask=cols < vocab_size, other=float("-inf")).to(tl.float32))
    top = tl.max(best, axis=0)

    # top-k: the largest key with at least k tokens at or above it
    key_k = tl.full([], _KEY_MIN, tl.int64)
    if (k > 0) & (k < vocab_size):
        lo, hi = tl.full([], _KEY_MIN, tl.int64), tl.full([], _KEY_MAX, tl.int64)
        for _ in range(32):
            mid = lo + (hi - lo + 1) // 2
            count = tl.zeros([BLOCK], tl.int32)
            for start in tl.range(0, vocab_size, BLOCK):
                cols = start + tl.arange(0, BLOCK)
                x = tl.load(row_ptr + cols, mask=cols < vocab_size, other=float("-inf")).to(tl.float32)
                count += ((order_key(x) >= mid) & (cols < vocab_size)).to(tl.int32)
            enough = tl.sum(count, axis=0) >= k
            lo = tl.where(enough, mid, lo)
            hi = tl.where(enough, hi, mid - 1)
        key_k = lo

    # top-p within the top-k: the smallest key whose strictly-higher tokens hold < p of the mass
    key_p = tl.full([], _KEY_MIN, tl.int64)
    if p < 1.0:
        target = p * _mass_above(row_ptr, vocab_size, key_k, key_k - 1, top, inv_t, BLOCK)
        lo, hi = tl.full([], _KEY_MIN, tl.int64), tl.full([], _KEY_MAX, tl.int64)
        for _ in range(32):
            mid = lo + (hi - lo) // 2
            below_target = _mass_above(row_ptr, vocab_size, key_k, mid, top, inv_t, BLOCK) < target
            hi = tl.where(below_target, mid, hi)
            lo = tl.where(below_target, lo, mid + 1)
        key_p = lo

    key_min_p = tl.full([], _KEY_MIN, tl.int64)
    if min_p > 0.0:
        key_min_p = order_key(top + tl.log(min_p) / inv_t).to(tl.int64)
    tl.store(out_ptr + row, tl.maximum(tl.maximum(key_k, key_p), key_min_p).to(tl.int32))


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
                                    BLOCK=min(2048, triton.next_power_of_2(vocab_size)))
    return out
