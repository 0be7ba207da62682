"""Triton helpers: integer weights packed in int32 words, unpacked in registers (for the W4A16
kernels, w4a16_gemm.py). Value j of a word sits at bits [j * bits, (j + 1) * bits)."""
import triton
import triton.language as tl


@triton.jit
def unpack_value(words, J: tl.constexpr, BITS: tl.constexpr):
    """Value J of each int32 word as an exact float32, with two integer-free float ops.

    The value's bits are masked in place into the mantissa of 1.0 (0x3F800000), giving
    1 + q * 2^(pos - 23); times 2^(23 - pos) minus 2^(23 - pos) is then q exactly (one fused
    multiply-add). The upper half of the word is shifted down first so that every value sits
    below bit 16, inside the 23-bit mantissa.
    """
    HALF: tl.constexpr = 16 // BITS
    POS: tl.constexpr = (J % HALF) * BITS
    UNIT: tl.constexpr = float(1 << (23 - POS))
    if J < HALF:
        src = words
    else:
        src = words >> 16
    mantissa = (src & (((1 << BITS) - 1) << POS)) | 0x3F800000
    return mantissa.to(tl.float32, bitcast=True) * UNIT - UNIT


@triton.jit
def nibbles_f32(words):
    """The 8 4-bit values q of each int32 word as exact float32s, in the order 0, 4, 1, 5, 2, 6, 3, 7,
    the odd ones times 16. One LOP3 masks two values (one per 16-bit half) into the mantissas of two
    float16 1024s (0x6400), one HSUB2 takes the 1024s off, and each is widened to float32 (HADD2.F32).
    PTX, so a GPU only: 4 instructions for 2 values, against 3 a value for unpack_value."""
    return tl.inline_asm_elementwise(
        asm="""
        {
        .reg .b32 lo, hi, s, c;
        .reg .b16 a, b;
        mov.b32 c, 0x64006400;
        lop3.b32 lo, $8, 0x000F000F, 0x64006400, 0xEA;
        sub.f16x2 lo, lo, c;
        mov.b32 {a, b}, lo;
        cvt.f32.f16 $0, a;
        cvt.f32.f16 $1, b;
        lop3.b32 hi, $8, 0x00F000F0, 0x64006400, 0xEA;
        sub.f16x2 hi, hi, c;
        mov.b32 {a, b}, hi;
        cvt.f32.f16 $2, a;
        cvt.f32.f16 $3, b;
        shr.u32 s, $8, 8;
        lop3.b32 lo, s, 0x000F000F, 0x64006400, 0xEA;
        sub.f16x2 lo, lo, c;
        mov.b32 {a, b}, lo;
        cvt.f32.f16 $4, a;
        cvt.f32.f16 $5, b;
        lop3.b32 hi, s, 0x00F000F0, 0x64006400, 0xEA;
        sub.f16x2 hi, hi, c;
        mov.b32 {a, b}, hi;
        cvt.f32.f16 $6, a;
        cvt.f32.f16 $7, b;
        }
        """,
        constraints="=r,=r,=r,=r,=r,=r,=r,=r,r", args=[words], dtype=(tl.float32,) * 8, is_pure=True, pack=1)


@triton.jit
def word_dots(words, x_ptrs, BITS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
               WORDS: tl.constexpr):
    """sum_j x[k_j] * q_j for each row and word ([BLOCK_M, BLOCK_N, WORDS]) and sum_j x[k_j] (the
    mins' factor, [BLOCK_M, WORDS]); each value unpacked once for all the rows (unpack_value)."""
    dots = tl.zeros([BLOCK_M, BLOCK_N, WORDS], dtype=tl.float32)
    x_sum = tl.zeros([BLOCK_M, WORDS], dtype=tl.float32)
    for j in tl.static_range(32 // BITS):
        xj = tl.load(x_ptrs + j).to(tl.float32)               # x[k] for value j of each word
        dots += unpack_value(words, j, BITS)[None, :, :] * xj[:, None, :]
        x_sum += xj
    return dots, x_sum


@triton.jit
def word_dots_f16(words, x_ptrs, BLOCK_M: tl.constexpr, WORDS: tl.constexpr):
    """word_dots for 4-bit values on a GPU, in fewer instructions: nibbles_f32 unpacks them, the
    odd ones times 16 (so x of those is taken / 16: exact), and x arrives in one load per row."""
    xt = tl.load(x_ptrs[:, :, None] + tl.arange(0, 8)[None, None, :]).to(tl.float32)
    # split the 8 features of each word: evens and odds, then by 4 apart (free: held in one thread)
    xe, xo = tl.split(tl.reshape(xt, [BLOCK_M, WORDS, 4, 2]))
    x04, x26 = tl.split(tl.reshape(xe, [BLOCK_M, WORDS, 2, 2]))
    x15, x37 = tl.split(tl.reshape(xo, [BLOCK_M, WORDS, 2, 2]))
    x0, x4 = tl.split(x04)
    x2, x6 = tl.split(x26)
    x1, x5 = tl.split(x15)
    x3, x7 = tl.split(x37)
    x_sum = x0 + x1 + x2 + x3 + x4 + x5 + x6 + x7
    x1, x3, x5, x7 = x1 * 0.0625, x3 * 0.0625, x5 * 0.0625, x7 * 0.0625
    v0, v4, v1, v5, v2, v6, v3, v7 = nibbles_f32(words)
    dots = v0[None, :, :] * x0[:, None, :]
    dots += v1[None, :, :] * x1[:, None, :]
    dots += v2[None, :, :] * x2[:, None, :]
    dots += v3[None, :, :] * x3[:, None, :]
    dots += v4[None, :, :] * x4[:, None, :]
    dots += v5[None, :, :] * x5[:, None, :]
    dots += v6[None, :, :] * x6[:, None, :]
    dots += v7[None, :, :] * x7[:, None, :]
    return dots, x_sum
