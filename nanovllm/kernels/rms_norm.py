"""Triton kernel: RMSNorm, optionally adding the residual stream first, in one pass.

    rms_norm(x, weight, eps)                  -> x / rms(x) * weight
    add_rms_norm(x, residual, weight, eps)    -> (rms_norm(x + residual), x + residual)

The references are the torch functions in layers/layernorm.py, and the kernel rounds where
they do: the sum is taken in x's dtype, the normalisation in float32, rounded to x's dtype
before the weight multiplies it. Each program normalises ROWS rows of the [rows, N] input.
"""
import torch
import triton
import triton.language as tl


@triton.jit
def _rms_norm_kernel(
    x_ptr, residual_ptr, out_ptr, sum_ptr, weight_ptr, num_rows, eps,
    stride_x, stride_r, stride_o, stride_s,
    N: tl.constexpr, BLOCK_N: tl.constexpr, ROWS: tl.constexpr, HAS_RESIDUAL: tl.constexpr,
):
    rows = (tl.program_id(0) * ROWS + tl.arange(0, ROWS)).to(tl.int64)[:, None]
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
    tl.store(out_ptr + rows * stride_o + cols, y.to(out_ptr.dtype.element_ty), mask=mask)


def _launch(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float):
    n = x.shape[-1]
    if weight.shape != (n,):
        raise ValueError(f"weight {tuple(weight.shape)} does not match the last dimension of x {tuple(x.shape)}")
    x2 = x.reshape(-1, n)                 # a view for the layouts the model passes (rows of N)
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    total = torch.empty(x.shape, dtype=x.dtype, device=x.device) if residual is not None else out
    r2 = residual.reshape(-1, n) if residual is not None else x2
    if x2.stride(-1) != 1 or r2.stride(-1) != 1:
        raise ValueError("rms_norm needs rows with contiguous elements")
    num_rows = x2.shape[0]
    block_n = triton.next_power_of_2(n)
    rows = max(1, min(16, 4096 // block_n))  # small rows (per-head norms) go several to a program
    if num_rows:
        _rms_norm_kernel[(triton.cdiv(num_rows, rows),)](
            x2, r2, out.view(-1, n), total.view(-1, n), weight, num_rows, eps,
            x2.stride(0), r2.stride(0), n, n,
            N=n, BLOCK_N=block_n, ROWS=rows, HAS_RESIDUAL=residual is not None)
    return out, total


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return _launch(x, None, weight, eps)[0]


def add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float):
    return _launch(x, residual, weight, eps)
