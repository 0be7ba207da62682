"""Triton kernels: the gated MLP's activation, silu(gate) * up, from the fused [T, 2I] tensor.

The reference is layers/activation.py's silu_and_mul; like torch, the kernel rounds silu(gate)
to the input's dtype before multiplying. Grid: (tokens, chunks of I).

`silu_and_mul_fp8` is the activation of a float8 down projection (quantization="fp8"): the
same values, quantized per row as quantize_fp8.py does, in the same pass, so the [T, I]
activations are never written in 16 bits and read back (docs/benchmarks.md).
"""
import torch
import triton
import triton.language as tl

from nanovllm.kernels.pdl import pdl_options, wait_for_previous
from nanovllm.kernels.quantize_fp8 import row_blocks, row_scale, to_e4m3


@triton.jit
def _gated_silu(row_ptr, cols, mask, inter):
    """silu(gate) * up of columns `cols` of one token's row, in the row's dtype."""
    gate = tl.load(row_ptr + cols, mask=mask, other=0.0)
    up = tl.load(row_ptr + inter + cols, mask=mask, other=0.0)
    g = gate.to(tl.float32)
    silu = (g / (1.0 + tl.exp(-g))).to(gate.dtype)
    return (silu * up).to(gate.dtype)


@triton.jit
def _silu_and_mul_kernel(x_ptr, out_ptr, stride_x, stride_o, inter, BLOCK: tl.constexpr, PDL: tl.constexpr):
    wait_for_previous(PDL)      # launched early: wait for the kernel ahead (pdl.py)
    token = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < inter
    a = _gated_silu(x_ptr + token * stride_x, cols, mask, inter)
    tl.store(out_ptr + token * stride_o + cols, a.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _silu_and_mul_fp8_kernel(x_ptr, out_ptr, scale_ptr, stride_x, stride_o, inter, BLOCK_K: tl.constexpr,
                             ONE_PASS: tl.constexpr):
    token = tl.program_id(0).to(tl.int64)
    x_row = x_ptr + token * stride_x
    out_row = out_ptr + token * stride_o
    if ONE_PASS:    # the row's activations stay in registers
        cols = tl.arange(0, BLOCK_K)
        a = _gated_silu(x_row, cols, cols < inter, inter).to(tl.float32)
        scale = row_scale(tl.max(tl.abs(a), 0))
        tl.store(scale_ptr + token, scale)
        tl.store(out_row + cols, to_e4m3(a, scale).to(out_ptr.dtype.element_ty), mask=cols < inter)
    else:           # the largest |activation|, then the activations again, quantized
        largest = tl.zeros([BLOCK_K], tl.float32)
        for c0 in range(0, inter, BLOCK_K):
            cols = c0 + tl.arange(0, BLOCK_K)
            largest = tl.maximum(largest, tl.abs(_gated_silu(x_row, cols, cols < inter, inter).to(tl.float32)))
        scale = row_scale(tl.max(largest, 0))
        tl.store(scale_ptr + token, scale)
        for c0 in range(0, inter, BLOCK_K):
            cols = c0 + tl.arange(0, BLOCK_K)
            a = _gated_silu(x_row, cols, cols < inter, inter).to(tl.float32)
            tl.store(out_row + cols, to_e4m3(a, scale).to(out_ptr.dtype.element_ty), mask=cols < inter)


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """x [T, 2I] -> [T, I]."""
    _check(x)
    t, inter = x.shape[0], x.shape[1] // 2
    out = torch.empty(t, inter, dtype=x.dtype, device=x.device)
    block = min(1024, triton.next_power_of_2(inter))
    if t:
        _silu_and_mul_kernel[(t, triton.cdiv(inter, block))](x, out, x.stride(0), out.stride(0), inter, BLOCK=block,
                                                              **pdl_options(x.device))
    return out


def _check(x: torch.Tensor) -> None:
    if x.dim() != 2 or x.shape[1] % 2 or x.stride(1) != 1:
        raise ValueError(f"silu_and_mul needs a [tokens, 2 * intermediate] tensor with contiguous rows, "
                         f"got shape {tuple(x.shape)}")


def silu_and_mul_fp8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [T, 2I] -> (float8_e4m3fn [T, I], float32 scales [T]): quantize_rows_fp8(silu_and_mul(x)),
    bit for bit."""
    _check(x)
    t, inter = x.shape[0], x.shape[1] // 2
    out = torch.empty(t, inter, dtype=torch.float8_e4m3fn, device=x.device)
    scale = torch.empty(t, dtype=torch.float32, device=x.device)
    if t:
        _silu_and_mul_fp8_kernel[(t,)](x, out, scale, x.stride(0), out.stride(0), inter, **row_blocks(inter))
    return out, scale
