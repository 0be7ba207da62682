"""The per-row float8 quantization kernel against fp8_linear's torch reference, bit for bit; the
gated activation quantized in the same pass against the two kernels one after the other."""
import pytest
import torch

from nanovllm.kernels.quantize_fp8 import quantize_rows_fp8
# (through the package: see its __getattr__)
from nanovllm.kernels import add_rms_norm, add_rms_norm_fp8, rms_norm, rms_norm_fp8, silu_and_mul, silu_and_mul_fp8
from nanovllm.quantization.fp8_linear import quantize_rows

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
# one block, a ragged one, a long one, one of two passes
@pytest.mark.parametrize("shape", [(5, 64), (3, 300), (2, 5000), (2, 9000)])
def test_equals_the_reference(dtype, shape):
    g = torch.Generator().manual_seed(sum(shape))
    x = (torch.randn(shape, generator=g) * torch.logspace(-4, 2, shape[0])[:, None]).to(dtype)
    x[0, :3] = 0.0
    if shape[0] > 2:
        x[2] = 0.0                                   # an all-zero row: the scale's floor
    x = x.to(DEVICE)
    q, scale = quantize_rows_fp8(x)
    q_ref, scale_ref = quantize_rows(x)
    assert torch.equal(scale, scale_ref)
    assert torch.equal(q.view(torch.uint8), q_ref.view(torch.uint8))


def test_strided_rows_and_empty():
    x = torch.randn(4, 128, device=DEVICE)[:, :96]     # rows with a stride > K
    q, scale = quantize_rows_fp8(x)
    q_ref, scale_ref = quantize_rows(x)
    assert torch.equal(scale, scale_ref) and torch.equal(q.view(torch.uint8), q_ref.view(torch.uint8))
    q, scale = quantize_rows_fp8(torch.empty(0, 32, device=DEVICE))
    assert q.shape == (0, 32) and scale.shape == (0,)
    with pytest.raises(ValueError, match="contiguous rows"):
        quantize_rows_fp8(torch.randn(8, 4, device=DEVICE).t())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("inter", [48, 300, 9000])      # one block, a ragged one, two passes
def test_silu_and_mul_fp8_equals_the_two_kernels(dtype, inter):
    g = torch.Generator().manual_seed(inter)
    x = (torch.randn(4, 2 * inter, generator=g) * torch.logspace(-3, 1, 4)[:, None]).to(dtype)
    x[1, inter:] = 0.0                               # up all zero: the scale's floor
    x = x.to(DEVICE)
    q, scale = silu_and_mul_fp8(x)
    q_ref, scale_ref = quantize_rows_fp8(silu_and_mul(x))
    assert torch.equal(scale, scale_ref) and scale[1] == 1e-12
    assert torch.equal(q.view(torch.uint8), q_ref.view(torch.uint8))
    q, scale = silu_and_mul_fp8(torch.empty(0, 64, dtype=dtype, device=DEVICE))
    assert q.shape == (0, 32) and scale.shape == (0,)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("n", [40, 100, 1000])      # several rows a program, ragged tiles, one row a program
def test_rms_norm_fp8_equals_the_two_kernels(dtype, n):
    g = torch.Generator().manual_seed(n)
    x = (torch.randn(19, n, generator=g) * torch.logspace(-3, 1, 19)[:, None]).to(dtype).to(DEVICE)
    residual = torch.randn(19, n, generator=g).to(dtype).to(DEVICE)
    weight = (torch.rand(n, generator=g) + 0.5).to(dtype).to(DEVICE)
    q, scale = rms_norm_fp8(x, weight, 1e-6)
    q_ref, scale_ref = quantize_rows_fp8(rms_norm(x, weight, 1e-6))
    assert torch.equal(scale, scale_ref) and torch.equal(q.view(torch.uint8), q_ref.view(torch.uint8))
    q, scale, total = add_rms_norm_fp8(x, residual, weight, 1e-6)
    y_ref, total_ref = add_rms_norm(x, residual, weight, 1e-6)
    q_ref, scale_ref = quantize_rows_fp8(y_ref)
    assert torch.equal(total, total_ref) and torch.equal(scale, scale_ref)
    assert torch.equal(q.view(torch.uint8), q_ref.view(torch.uint8))
