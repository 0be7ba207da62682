"""The step both attention kernels share: scores of a query tile against a K/V tile, and the
online-softmax update of the running output (flash attention), in base 2.

A float8 cache adds two things here (both exact):
* `fp16_query`: with a bfloat16 query the products run in float16. On sm_90 float8 e4m3
  becomes float16 in one instruction per pair of values; becoming bfloat16 takes a second,
  scalar, conversion per value, and those conversions, not the memory, bounded the decode kernel.
* `fp8_value_pairs`: the decode kernel reads a float8 value tile as int16 pairs of neighbouring
  dimensions. A float8 tile that feeds a dot as the right-hand operand [tokens, dims] must be
  transposed in shared memory, which Triton does one byte per load; 16-bit elements transpose
  with one instruction (ldmatrix.trans) for a whole 8x8 block. The even and odd dimensions
  then go through two dots of half the width.
"""
import torch
import triton
import triton.language as tl


@triton.jit
def tile_scores(q, k, IEEE: tl.constexpr):
    """q [M, D] . k [N, D]^T, unscaled (softmax_weights scales them). IEEE: exact fp32 dot (the fp32
    tests' reference)."""
    if IEEE:
        return tl.dot(q, tl.trans(k.to(q.dtype)), input_precision="ieee")
    return tl.dot(q, tl.trans(k.to(q.dtype)))


@triton.jit
def softmax_weights(l_i, m_i, s, scale_log2):
    """One tile's masked scores s [M, N] (unscaled) -> (p [M, N], alpha [M], l_i, m_i): the weights
    of its values, the factor that rescales the running output, and the new running sum and
    maximum. The scale (positive) goes into the row maximum and, with it, into one multiply-add
    per score: a pass over the tile fewer than scaling the scores first."""
    m_new = tl.maximum(m_i, tl.max(s, 1) * scale_log2)
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(s * scale_log2 - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    return p, alpha, l_i, m_new


@triton.jit
def online_softmax_update(acc, l_i, m_i, s, scale_log2, v, q, IEEE: tl.constexpr):
    """Fold one tile's masked, unscaled scores s [M, N] and values v [N, D] into the running maximum
    m_i, denominator l_i and (unnormalised) output acc. Returns (acc, l_i, m_i). The rescaled
    output is the dot's accumulator: the tensor cores add the tile's products to it in place."""
    p, alpha, l_i, m_new = softmax_weights(l_i, m_i, s, scale_log2)
    acc = acc * alpha[:, None]
    if IEEE:
        acc = tl.dot(p, v.to(tl.float32), acc, input_precision="ieee")
    else:
        acc = tl.dot(p.to(q.dtype), v.to(q.dtype), acc)
    return acc, l_i, m_new


@triton.jit
def fp16_query(q):
    """A bfloat16 query tile for a float8 cache -> (q * 2**e in float16, 2**-e), e chosen so that
    the largest |q| lands in [2**15, 2**16): no overflow, and exact (float16 has 3 more mantissa
    bits than bfloat16; only values 2**32 times smaller than the largest could round). Scores
    multiplied by 2**-e are those of the bfloat16 query (float32 products and sums scale exactly)."""
    q32 = q.to(tl.float32)
    q_max = tl.max(tl.max(tl.abs(q32), 1), 0)
    # float32 exponent field of q_max; at least 30 keeps 2**-e a normal float32 (a q below 2**-97
    # then lands below 2**15, still exact enough: such scores are all ~0)
    exp_field = tl.maximum((q_max.to(tl.int32, bitcast=True) >> 23) & 0xFF, 30)
    up = ((142 + 127 - exp_field) << 23).to(tl.float32, bitcast=True)        # 2**(15 - (exp_field - 127))
    down = ((exp_field - 15) << 23).to(tl.float32, bitcast=True)             # its inverse
    return (q32 * up).to(tl.float16), down


@triton.jit
def fp8_value_pairs(x, INLINE_ASM: tl.constexpr):
    """x: int16 [N, D/2], each the two float8 e4m3 bytes of dimensions 2j (low byte) and 2j + 1
    -> (values of the even dimensions, of the odd ones), float16 [N, D/2] each, exact.
    INLINE_ASM (on a GPU): byte permutes and the pairwise sm_90 conversion, 4 instructions per
    two int16; Triton's own lowering of the same (the interpreter's path) takes about twice that."""
    if INLINE_ASM:
        # $2 holds two int16 of neighbouring tokens: bytes 0, 2 are their even dims, 1, 3 the odd
        even, odd = tl.inline_asm_elementwise(
            "{ .reg .b32 e, o; .reg .b16 e0, e1, o0, o1;"
            " prmt.b32 e, $2, 0, 0x4420; prmt.b32 o, $2, 0, 0x4431;"
            " mov.b32 {e0, e1}, e; mov.b32 {o0, o1}, o;"
            " cvt.rn.f16x2.e4m3x2 $0, e0; cvt.rn.f16x2.e4m3x2 $1, o0; }",
            "=r,=r,r", [x], dtype=(tl.float16, tl.float16), is_pure=True, pack=2)
    else:
        even = (x & 0xFF).to(tl.uint8).to(tl.float8e4nv, bitcast=True).to(tl.float16)
        odd = ((x >> 8) & 0xFF).to(tl.uint8).to(tl.float8e4nv, bitcast=True).to(tl.float16)
    return even, odd


def fp16_mma(q: torch.Tensor, k_cache: torch.Tensor) -> bool:
    """Do a kernel's products run in float16 through fp16_query? For a bfloat16 query over a float8 cache."""
    return q.dtype == torch.bfloat16 and k_cache.dtype == torch.float8_e4m3fn
