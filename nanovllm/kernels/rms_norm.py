"""Triton kernel: RMSNorm, optionally adding the residual stream first, in one pass.

    rms_norm(x, weight, eps)                  -> x / rms(x) * weight
    add_rms_norm(x, residual, weight, eps)    -> (rms_norm(x + residual), x + residual)
    rms_norm_fp8 / add_rms_norm_fp8           the same, the normalised rows quantized to float8
                                              with a scale each (as quantize_fp8.py, same bits)

The references are the torch functions in layers/layernorm.py, and the kernel rounds where
they do: the sum is taken in x's dtype, the normalisation in float32, rounded to x's dtype
before the weight multiplies it. Each program normalises ROWS rows of the [rows, N] input.
"""
import torch
import triton
import triton.language as tl

from nanovllm.kernels.pdl import pdl_options, wait_for_previous
from nanovllm.kernels.quantize_fp8 import row_scale, to_e4m3


@triton.jit
def _rms_norm_kernel(
    x_ptr, residual_ptr, out_ptr, sum_ptr, weight_ptr, scale_ptr, num_rows, eps,
    stride_x, stride_r, stride_o, stride_s,
    N: tl.constexpr, BLOCK_N: tl.constexpr, ROWS: tl.constexpr, HAS_RESIDUAL: tl.constexpr,
    FP8_OUT: tl.constexpr, PDL: tl.constexpr,
):
    wait_for_previous(PDL)      # launched early: wait for the kernel ahead (pdl.py)
    row_ids = (tl.program_id(0) * ROWS + tl.arange(0, ROWS)).to(tl.int64)
    rows = row_ids[:, None]
    cols = tl.arange(0, BLOCK_N)[None, :]
    mask = (rows < num_rows) & (cols < N)
    x = tl.load(x_ptr + rows * stride_x + cols, mask=mask, other=0.0)
    if HAS_RESIDUAL:
        x = x + tl.load(residual_ptr + rows * stride_r + cols, mask=mask, other=0.0)
        tl.store(sum_ptr + rows * stride_s + cols, x, mask=mask)
    x32 = x.to(tl.float32)
    inv_rms = tl.rsqrt(tl.sum(x32 * x32, axis=1) / N + eps)
    weight = tl.load(weight_ptr + cols, mask=cols < N)
    y = (x32 * inv_rms[:, None]).to(x.dtype) * weight
    if FP8_OUT:     # each row quantized with its own scale (kernels/quantize_fp8.py)
        y32 = tl.where(mask, y.to(x.dtype).to(tl.float32), 0.0)     # (the weight's masked lanes are undefined)
        scale = row_scale(tl.max(tl.abs(y32), axis=1))
        tl.store(scale_ptr + row_ids, scale, mask=row_ids < num_rows)
        y = to_e4m3(y32, scale[:, None])
    tl.store(out_ptr + rows * stride_o + cols, y.to(out_ptr.dtype.element_ty), mask=mask)


def _launch(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float, fp8: bool = False):
    n = x.shape[-1]
    if weight.shape != (n,):
        raise ValueError(f"weight {tuple(weight.shape)} does not match the last dimension of x {tuple(x.shape)}")
    x2 = x.reshape(-1, n)                 # a view for the layouts the model passes (rows of N)
    out = torch.empty(x.shape, dtype=torch.float8_e4m3fn if fp8 else x.dtype, device=x.device)
    scale = torch.empty(x2.shape[0], dtype=torch.float32, device=x.device) if fp8 else None
    total = torch.empty(x.shape, dtype=x.dtype, device=x.device) if residual is not None else x
    r2 = residual.reshape(-1, n) if residual is not None else x2
    if x2.stride(-1) != 1 or r2.stride(-1) != 1:
        raise ValueError("rms_norm needs rows with contiguous elements")
    num_rows = x2.shape[0]
    block_n = triton.next_power_of_2(n)
    rows = max(1, min(16, 4096 // block_n))  # small rows (per-head norms) go several to a program
    if num_rows:
        _rms_norm_kernel[(triton.cdiv(num_rows, rows),)](
            x2, r2, out.view(-1, n), total.reshape(-1, n), weight, scale if fp8 else weight, num_rows, eps,
            x2.stride(0), r2.stride(0), n, n,
            N=n, BLOCK_N=block_n, ROWS=rows, HAS_RESIDUAL=residual is not None, FP8_OUT=fp8,
            **pdl_options(x.device))
    return out, total, scale


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return _launch(x, None, weight, eps)[0]


def add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float):
    return _launch(x, residual, weight, eps)[:2]


def rms_norm_fp8(x: torch.Tensor, weight: torch.Tensor, eps: float):
    """x [M, N] -> (float8 [M, N], float32 scales [M]): quantize_rows_fp8(rms_norm(x)), bit for bit."""
    out, _, scale = _launch(x, None, weight, eps, fp8=True)
    return out, scale


def add_rms_norm_fp8(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float):
    """-> (float8 [M, N], float32 scales [M], x + residual)."""
    out, total, scale = _launch(x, residual, weight, eps, fp8=True)
    return out, scale, total
