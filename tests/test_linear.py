"""layers/cpu_linear.linear: float32 on a CPU goes through oneDNN's matmul; it must equal F.linear
(to float32 rounding) for every input layout the model passes."""
import pytest
import torch
import torch.nn.functional as F

from nanovllm.layers.cpu_linear import linear


@pytest.mark.parametrize("make_x", [
    lambda: torch.randn(7, 96),                      # rows
    lambda: torch.randn(7, 200)[:, 13:109],          # a strided slice (a fused projection's part)
    lambda: torch.randn(96, 7).t(),                  # transposed
    lambda: torch.randn(2, 3, 96),                   # leading dimensions
    lambda: torch.randn(0, 96),                      # no rows
])
@pytest.mark.parametrize("bias", [False, True])
def test_equals_f_linear(make_x, bias):
    torch.manual_seed(0)
    x, w = make_x(), torch.randn(4096, 96)           # many output rows: where the default BLAS was slow
    b = torch.randn(4096) if bias else None
    y = linear(x, w, b)
    assert y.shape == (*x.shape[:-1], 4096) and y.dtype == torch.float32
    torch.testing.assert_close(y, F.linear(x, w, b), rtol=1e-5, atol=1e-4)


def test_other_dtypes_are_f_linear():
    x, w = torch.randn(3, 64, dtype=torch.bfloat16), torch.randn(32, 64, dtype=torch.bfloat16)
    assert torch.equal(linear(x, w), F.linear(x, w))
