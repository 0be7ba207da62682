"""Triton kernel: each row's min-p / top-k / top-p cut-off, found without sorting.

The filters all keep the tokens whose logit is at least some threshold (ties with it kept),
in vLLM V1's order:
  min-p  max_logit + T * log(min_p) (p_i >= min_p * p_max, in logit space);
  top-k  the k-th largest logit (min-p and top-k commute: the higher threshold wins);
  top-p  (after min-p and top-k) the smallest logit v such that the tokens strictly more
         likely than v hold less than top_p of the mass of the tokens min-p and top-k keep,
         i.e. the nucleus of the distribution renormalised over them.
The torch reference sorts (layers/sampler.py: `apply_min_p`, `apply_top_k_top_p`). Here the
logits' bit patterns are mapped to integer keys in the same order (16 bits for bf16/fp16
logits, 32 for fp32), and each threshold is the largest key u such that the tokens with key
>= u still number at least k (top-k) or still hold at least top_p of the mass (top-p); min-p's
float32 threshold becomes the smallest key whose logit reaches it, and top-p's mass and search
start from the base cut, the higher of the min-p and top-k keys.

One program per row. Its first pass over the row keeps, for each of its BLOCK lanes (token
t is in lane t % BLOCK), the lane's 4 largest keys and, for top-p, the lane's softmax mass
(an online max and sum, as in logprobs.py). From those 4 x BLOCK kept keys alone, in
registers, each threshold gets a floor and a ceiling:
  floor    the largest u that the kept keys alone reach (they are a subset of the row);
  ceiling  the largest u that the kept keys plus everything they may miss reach: a lane's
           other tokens are all <= its 4th key, so they count only for u <= that key
           (the lane's count minus 4, or its mass minus its kept keys' mass).
When no lane has all 4 kept keys at or above the floor, the two meet and the threshold is
known after one pass: top-k 50 nearly always; top-p when its nucleus holds less than about
4 tokens per lane. Otherwise the passes that follow split the interval [floor, ceiling]
into 5 with 4 candidate keys per pass (one [BLOCK, 4] tile of counts or masses), so an
interval of n keys takes ceil(log5(n)) passes: 1-2 for the benchmark's top-p 0.95 (a
nucleus of ~3,000 tokens, interval 2-8 keys), at most 7 for a bf16 row (14 for fp32).
The result is each row's threshold as a float32 key (`order_key`); gumbel_sample then draws
among the tokens at or above it.
"""
import torch
import triton
import triton.language as tl

_KEY_MIN32 = tl.constexpr(-2**31)     # below every float32 key
BLOCK = 2048        # lanes per row; the bench's --sweep changes these two
NUM_WARPS = 8


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
def _key_value(key, dtype: tl.constexpr, KEY_BITS: tl.constexpr):
    """A _row_key back to its logit, as float32."""
    if KEY_BITS == 16:
        return tl.where(key >= 0, key, key ^ 0x7FFF).to(tl.int16).to(dtype, bitcast=True).to(tl.float32)
    else:
        return tl.where(key >= 0, key, key ^ 0x7FFFFFFF).to(tl.float32, bitcast=True)


@triton.jit
def _as_float32_key(key, dtype: tl.constexpr, KEY_BITS: tl.constexpr):
    """A _row_key back to the value it stands for, as order_key(float32 value)."""
    if KEY_BITS == 16:
        return order_key(_key_value(key, dtype, KEY_BITS))
    else:
        return key


@triton.jit
def _min_p_key(threshold, dtype: tl.constexpr, KEY_BITS: tl.constexpr):
    """The smallest _row_key whose logit is >= `threshold` (a float32): min-p keeps exactly
    the tokens at or above it. Rounding the threshold to the logits' dtype may land one key
    below it (then step up) or, for a threshold of 0, on +0.0 while -0.0 (the key below, the
    same value) also reaches it (then step down); any rounding within one step is fixed."""
    key = _row_key(threshold.to(dtype), KEY_BITS)
    key = tl.where(_key_value(key, dtype, KEY_BITS) < threshold, key + 1, key)
    return tl.where(_key_value(key - 1, dtype, KEY_BITS) >= threshold, key - 1, key)


@triton.jit
def _split(lo, hi):
    """4 candidate keys that split (lo, hi] into 5 nearly equal parts (repeats when it is short)."""
    i = tl.arange(0, 4).to(tl.int64) + 1
    return (lo.to(tl.int64) + ((hi.to(tl.int64) - lo.to(tl.int64)) * i + 4) // 5).to(tl.int32)


@triton.jit
def _narrow(lo, hi, candidates, reached):
    """[lo, hi] -> the part between the highest candidate that reached the goal and the next."""
    new_lo = tl.maximum(lo, tl.max(tl.where(reached, candidates, lo), axis=0))
    new_hi = tl.minimum(hi, tl.min(tl.where(reached, hi, candidates - 1), axis=0))
    return new_lo, new_hi


@triton.jit
def _kept_weight(keys, top, inv_t, dtype: tl.constexpr, KEY_BITS: tl.constexpr):
    """Each kept key's mass exp((x - top) / T); 0 where a lane kept nothing."""
    weight = tl.exp((_key_value(keys, dtype, KEY_BITS) - top) * inv_t)       # 0 for -inf
    return tl.where(keys > -(1 << (KEY_BITS - 1)), weight, 0.0)


@triton.jit
def _search_kept(k1, k2, k3, k4, w1, w2, w3, w4, goal, lo, hi):
    """The largest u in [lo, hi] (lo if none) at which the lanes' kept keys k1..k4, weighing
    w1..w4, reach `goal`. w4 includes what each lane missed: the tokens it did not keep are all
    <= its k4. In registers, no pass. The candidates are those of _split as scalars: a
    [BLOCK, 4] tile would hold each lane's keys and weights 4 times over."""
    while lo < hi:
        new_lo, new_hi = lo, hi
        for i in tl.range(1, 5):
            c = (lo.to(tl.int64) + ((hi.to(tl.int64) - lo.to(tl.int64)) * i + 4) // 5).to(tl.int32)
            # (c > lo >= "no key": the lanes' fillers never count)
            reach = tl.sum(tl.where(k1 >= c, w1, 0.0) + tl.where(k2 >= c, w2, 0.0)
                           + tl.where(k3 >= c, w3, 0.0) + tl.where(k4 >= c, w4, 0.0), axis=0)
            new_lo = tl.where(reach >= goal, tl.maximum(new_lo, c), new_lo)
            new_hi = tl.where(reach >= goal, new_hi, tl.minimum(new_hi, c - 1))
        lo, hi = new_lo, new_hi
    return lo


@triton.jit
def _search_row(row_ptr, vocab_size, lo, hi, goal, top, inv_t, WEIGHTED: tl.constexpr,
                KEY_BITS: tl.constexpr, BLOCK: tl.constexpr):
    """The largest key u in [lo, hi] such that the row's tokens with key >= u number at least
    `goal` (WEIGHTED: hold mass exp((x - top) / T) of at least `goal`), given that lo does:
    one pass over the row per 5-fold narrowing of the interval."""
    while lo < hi:
        candidates = _split(lo, hi)
        # One [BLOCK, candidates] tile per pass. The logits are loaded as a [BLOCK, 1] column
        # of that tile: loaded as a [BLOCK] vector and broadcast, they would be moved between
        # register layouts every step (2-3x slower on an H100).
        reach = tl.zeros([BLOCK, 4], tl.float32)   # counts stay exact in float32
        for start in tl.range(0, vocab_size, BLOCK):
            cols = start + tl.arange(0, BLOCK)[:, None]
            x = tl.load(row_ptr + cols, mask=cols < vocab_size, other=float("-inf"))
            at_or_above = (_row_key(x, KEY_BITS) >= candidates[None, :]) & (cols < vocab_size)
            if WEIGHTED:
                reach += tl.where(at_or_above, tl.exp((x.to(tl.float32) - top) * inv_t), 0.0)
            else:
                reach += at_or_above.to(tl.float32)
        lo, hi = _narrow(lo, hi, candidates, tl.sum(reach, axis=0) >= goal)
    return lo


@triton.jit
def _mass_at_or_above(row_ptr, vocab_size, floor, top, inv_t, KEY_BITS: tl.constexpr, BLOCK: tl.constexpr):
    """One pass: the mass exp((x - top) / T) of the tokens with key >= floor."""
    mass = tl.zeros([BLOCK], tl.float32)
    for start in tl.range(0, vocab_size, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        x = tl.load(row_ptr + cols, mask=cols < vocab_size, other=float("-inf"))
        keep = (cols < vocab_size) & (_row_key(x, KEY_BITS) >= floor)
        mass += tl.where(keep, tl.exp((x.to(tl.float32) - top) * inv_t), 0.0)
    return tl.sum(mass, axis=0)


@triton.jit
def _thresholds_kernel(logits_ptr, stride_row, vocab_size, temperature_ptr, top_k_ptr, top_p_ptr, min_p_ptr,
                       out_ptr, KEEP: tl.constexpr, MASS: tl.constexpr, KEY_BITS: tl.constexpr,
                       BLOCK: tl.constexpr):
    """One row's cut-off as a float32 key, the filters in vLLM's order: min-p's key (from
    the row's maximum), top-k's (from the kept keys, or search passes), then top-p's, whose
    goal is top_p times the mass at or above the base cut max(min-p key, top-k key) and whose
    search starts there. KEEP: some row uses top-k or top-p; MASS: some row uses top-p."""
    row = tl.program_id(0).to(tl.int64)
    row_ptr = logits_ptr + row * stride_row
    dtype: tl.constexpr = logits_ptr.dtype.element_ty
    inv_t = 1.0 / tl.load(temperature_ptr + row)
    k = tl.load(top_k_ptr + row)
    p = tl.load(top_p_ptr + row)
    min_p = tl.load(min_p_ptr + row)
    no_key = tl.full([], -(1 << (KEY_BITS - 1)), tl.int32)     # below every token's key

    # The first pass: per lane, the largest logit, (KEEP) the 4 largest keys k1 >= .. >= k4,
    # and (MASS) the sum of exp((x - lane_max) / T), rescaled when the maximum moves.
    lane_max = tl.full([BLOCK], float("-inf"), tl.float32)
    lane_sum = tl.zeros([BLOCK], tl.float32)
    k1 = tl.full([BLOCK], -(1 << (KEY_BITS - 1)), tl.int32)
    k2, k3, k4 = k1, k1, k1
    for start in tl.range(0, vocab_size, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        x = tl.load(row_ptr + cols, mask=cols < vocab_size, other=float("-inf"))
        xf = x.to(tl.float32)
        if MASS:   # one exp per token: exp(-|d|) is the new token's weight or the old sum's rescale
            ref = tl.where(lane_max == float("-inf"), 0.0, lane_max)        # (the lane's sum is 0 then)
            e = tl.where(xf == float("-inf"), 0.0, tl.exp(-tl.abs((xf - ref) * inv_t)))
            lane_sum = tl.where(xf > lane_max, lane_sum * e + 1.0, lane_sum + e)
        lane_max = tl.maximum(lane_max, xf)
        if KEEP:   # insert the key into the lane's sorted 4
            key = tl.where(cols < vocab_size, _row_key(x, KEY_BITS), no_key)
            k4 = tl.maximum(k4, tl.minimum(k3, key))
            k3 = tl.maximum(k3, tl.minimum(k2, key))
            k2 = tl.maximum(k2, tl.minimum(k1, key))
            k1 = tl.maximum(k1, key)
    top = tl.max(lane_max, axis=0)
    # Masses are weighed relative to the top logit; a row of -inf only (min_tokens may ban
    # every token) has none, weighed from 0 rather than through -inf - -inf = NaN.
    mass_ref = tl.where(top == float("-inf"), 0.0, top)

    result = tl.full([], _KEY_MIN32, tl.int32)
    min_p_key = no_key
    if min_p > 0.0:                              # min-p: keep x >= top + T * log(min_p)
        min_p_key = _min_p_key(top + tl.log(min_p) / inv_t, dtype, KEY_BITS)
        result = _as_float32_key(min_p_key, dtype, KEY_BITS)
    if KEEP:
        top_key = tl.max(k1, axis=0)
        if MASS:
            lane_mass = tl.where(lane_max == float("-inf"), 0.0, lane_sum * tl.exp((lane_max - mass_ref) * inv_t))
        key_k = no_key
        if (k > 0) & (k < vocab_size):           # top-k: the k-th largest key
            lanes = tl.arange(0, BLOCK)
            missed = tl.maximum(tl.cdiv(vocab_size - lanes, BLOCK) - 4, 0).to(tl.float32)   # tokens not kept
            goal = k.to(tl.float32)
            floor = _search_kept(k1, k2, k3, k4, 1.0, 1.0, 1.0, 1.0, goal, no_key, top_key)
            ceiling = _search_kept(k1, k2, k3, k4, 1.0, 1.0, 1.0, 1.0 + missed, goal, floor, top_key)
            key_k = _search_row(row_ptr, vocab_size, floor, ceiling, goal, mass_ref, inv_t, False, KEY_BITS, BLOCK)
            result = tl.maximum(result, _as_float32_key(key_k, dtype, KEY_BITS))
        if MASS:
            if p < 1.0:                          # top-p among what min-p and top-k keep
                w1 = _kept_weight(k1, mass_ref, inv_t, dtype, KEY_BITS)
                w2 = _kept_weight(k2, mass_ref, inv_t, dtype, KEY_BITS)
                w3 = _kept_weight(k3, mass_ref, inv_t, dtype, KEY_BITS)
                w4 = _kept_weight(k4, mass_ref, inv_t, dtype, KEY_BITS)
                total = tl.sum(lane_mass, axis=0)
                missed = tl.maximum(lane_mass - w1 - w2 - w3 - w4, 0.0)         # mass not kept
                base = tl.maximum(key_k, min_p_key)  # = key_k without min-p: the same path as before
                if base == no_key:
                    mass = total
                elif tl.max(k4, axis=0) < base:      # every token >= base was kept (k4s are below it)
                    mass = tl.sum(tl.where(k1 >= base, w1, 0.0) + tl.where(k2 >= base, w2, 0.0)
                                  + tl.where(k3 >= base, w3, 0.0), axis=0)
                else:
                    mass = _mass_at_or_above(row_ptr, vocab_size, base, mass_ref, inv_t, KEY_BITS, BLOCK)
                goal = p * mass
                # The bounds come from sums in another order than the passes': a margin far
                # above float32 rounding keeps them on the right side of the goal.
                margin = 1e-5 * total
                floor = _search_kept(k1, k2, k3, k4, w1, w2, w3, w4, goal + margin, base, top_key)
                ceiling = _search_kept(k1, k2, k3, k4, w1, w2, w3, w4 + missed, goal - margin, floor, top_key)
                key_p = _search_row(row_ptr, vocab_size, floor, ceiling, goal, mass_ref, inv_t, True, KEY_BITS, BLOCK)
                result = tl.maximum(result, _as_float32_key(key_p, dtype, KEY_BITS))
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
    keep, mass = top_k is not None or top_p is not None, top_p is not None
    top_k = torch.zeros(rows, dtype=torch.int32, device=device) if top_k is None else top_k.to(torch.int32)
    top_p = torch.ones(rows, dtype=torch.float32, device=device) if top_p is None else top_p.float()
    min_p = torch.zeros(rows, dtype=torch.float32, device=device) if min_p is None else min_p.float()
    out = torch.empty(rows, dtype=torch.int32, device=device)
    if rows:
        _thresholds_kernel[(rows,)](logits, logits.stride(0), vocab_size, temperature.float().contiguous(),
                                    top_k.contiguous(), top_p.contiguous(), min_p.contiguous(), out,
                                    KEEP=keep, MASS=mass, KEY_BITS=8 * logits.element_size(),
                                    BLOCK=min(BLOCK, triton.next_power_of_2(vocab_size)), num_warps=NUM_WARPS)
    return out
