"""The step both attention kernels share: scores of a query tile against a K/V tile, and the
online-softmax update of the running output (flash attention), in base 2."""
import triton
import triton.language as tl


@triton.jit
def tile_scores(q, k, scale_log2, IEEE: tl.constexpr):
    """q [M, D] . k [N, D]^T, scaled for exp2. IEEE: exact fp32 dot (the fp32 tests' reference)."""
    if IEEE:
        s = tl.dot(q, tl.trans(k.to(q.dtype)), input_precision="ieee")
    else:
        s = tl.dot(q, tl.trans(k.to(q.dtype)))
    return s * scale_log2


@triton.jit
def online_softmax_update(acc, l_i, m_i, s, v, q, IEEE: tl.constexpr):
    """Fold one tile's masked scores s [M, N] and values v [N, D] into the running maximum m_i,
    denominator l_i and (unnormalised) output acc. Returns (acc, l_i, m_i)."""
    m_new = tl.maximum(m_i, tl.max(s, 1))
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(s - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    if IEEE:
        acc = acc * alpha[:, None] + tl.dot(p, v.to(tl.float32), input_precision="ieee")
    else:
        acc = acc * alpha[:, None] + tl.dot(p.to(q.dtype), v.to(q.dtype))
    return acc, l_i, m_new
