"""Triton kernel: quantize each row of x to float8 e4m3 with its own scale (FP8 linears'
activations, nanovllm/quantization/fp8_linear.py).

    scale[m] = max(max_k |x[m, k]| * (1 / 448), 1e-12)      x8[m, k] = e4m3(x[m, k] / scale[m])

The torch reference (`quantize_rows`) takes about eight passes over a float32 copy of x; this is
one program per row that reads the row once (keeping it in registers; a row of more than
ONE_PASS_MAX values twice: its largest |x|, then the scaled values) in x's own dtype and writes
one byte per value. Divisions round to nearest (div_rn) and the e4m3 rounding is the KV store's,
so the result equals the reference's bit for bit. kernels/silu_and_mul.py's silu_and_mul_fp8
quantizes the same way.
"""
import torch
import triton
import triton.language as tl

from nanovllm.kernels.store_kv import round_to_e4m3

FP8_MAX: tl.constexpr = tl.constexpr(448.0)     # float8 e4m3's largest value
ONE_PASS_MAX = 8192                             # the longest row a program keeps in registers


@triton.jit
def row_scale(largest):
    """The scale of a row whose largest |x| is `largest`, times 1/448 as quantize_rows: torch on a
    GPU divides by a scalar that way (not exactly)."""
    return tl.maximum(largest * (1.0 / FP8_MAX), 1e-12)


@triton.jit
def to_e4m3(x, scale):
    """x (float32) / scale, rounded to float8 e4m3 (as float32 values)."""
    return round_to_e4m3(tl.minimum(tl.maximum(tl.math.div_rn(x, scale), -FP8_MAX), FP8_MAX))


@triton.jit
def _quantize_rows_kernel(x_ptr, out_ptr, scale_ptr, K, stride_xm, stride_om, BLOCK_K: tl.constexpr,
                          ONE_PASS: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    x_row = x_ptr + row * stride_xm
    out_row = out_ptr + row * stride_om
    if ONE_PASS:    # the row fits one block: read it once
        k = tl.arange(0, BLOCK_K)
        x = tl.load(x_row + k, mask=k < K, other=0.0).to(tl.float32)
        scale = row_scale(tl.max(tl.abs(x), 0))
        tl.store(scale_ptr + row, scale)
        tl.store(out_row + k, to_e4m3(x, scale).to(out_ptr.dtype.element_ty), mask=k < K)
    else:           # its largest |x|, then the scaled values
        largest = tl.zeros([BLOCK_K], tl.float32)
        for k0 in range(0, K, BLOCK_K):
            k = k0 + tl.arange(0, BLOCK_K)
            x = tl.load(x_row + k, mask=k < K, other=0.0).to(tl.float32)
            largest = tl.maximum(largest, tl.abs(x))
        scale = row_scale(tl.max(largest, 0))
        tl.store(scale_ptr + row, scale)
        for k0 in range(0, K, BLOCK_K):
            k = k0 + tl.arange(0, BLOCK_K)
            x = tl.load(x_row + k, mask=k < K, other=0.0).to(tl.float32)
            tl.store(out_row + k, to_e4m3(x, scale).to(out_ptr.dtype.element_ty), mask=k < K)


def row_blocks(K: int) -> dict:
    """Launch settings for one program a row of K values: the whole row in one block up to
    ONE_PASS_MAX values, else blocks of 4,096 in two passes."""
    one_pass = K <= ONE_PASS_MAX
    block = triton.next_power_of_2(K) if one_pass else 4096
    return dict(BLOCK_K=block, ONE_PASS=one_pass, num_warps=min(16, max(4, block // 512)))


def quantize_rows_fp8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, K] (last dimension contiguous) -> (float8_e4m3fn [M, K], float32 scales [M])."""
    if x.dim() != 2 or x.stride(1) != 1:
        raise ValueError(f"x must be a 2-D tensor with contiguous rows, got shape {tuple(x.shape)}, "
                         f"strides {x.stride()}")
    M, K = x.shape
    out = torch.empty(M, K, dtype=torch.float8_e4m3fn, device=x.device)
    scale = torch.empty(M, dtype=torch.float32, device=x.device)
    if M:
        _quantize_rows_kernel[(M,)](x, out, scale, K, x.stride(0), out.stride(0), **row_blocks(K))
    return out, scale
