"""The element-wise Triton kernels (RMSNorm, rotary embedding with optional q/k norm,
SiLU-and-mul) against the torch functions they replace on CUDA (layers/), which are their
references. Without CUDA they run in Triton's CPU interpreter, in float32 and float16."""
import pytest
import torch

from nanovllm.kernels import triton_available
from nanovllm.layers.activation import silu_and_mul
from nanovllm.layers.layernorm import add_rms_norm, rms_norm
from nanovllm.kernels.rotary import apply_rotary

pytestmark = pytest.mark.skipif(not triton_available(), reason="triton is not installed")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float32, torch.float16]


def randn(*shape, dtype, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(DEVICE, dtype)


def close(out, ref):
    tol = 1e-5 if ref.dtype == torch.float32 else 2e-3
    torch.testing.assert_close(out.float(), ref.float(), atol=tol, rtol=tol)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(5, 96), (3, 7, 64)])    # hidden rows; per-head rows
def test_rms_norm(dtype, shape):
    from nanovllm import kernels
    x, residual = randn(*shape, dtype=dtype), randn(*shape, dtype=dtype, seed=1)
    weight = randn(shape[-1], dtype=dtype, seed=2)
    close(kernels.rms_norm(x, weight, 1e-6), rms_norm(x, weight, 1e-6))
    out, total = kernels.add_rms_norm(x, residual, weight, 1e-6)
    ref_out, ref_total = add_rms_norm(x, residual, weight, 1e-6)
    close(out, ref_out)
    assert torch.equal(total, ref_total)
    with pytest.raises(ValueError, match="does not match"):
        kernels.rms_norm(x, weight[:-1], 1e-6)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("with_norm", [False, True])
@pytest.mark.parametrize("d", [32, 48])              # a head dimension that is no power of two
def test_rotary_in_place_on_qkv_views(dtype, with_norm, d):
    from nanovllm import kernels
    tokens, hq, hk = 6, 4, 2
    qkv = randn(tokens, (hq + 2 * hk) * d, dtype=dtype)          # as the fused projection gives it
    q, k, v = qkv.split([hq * d, hk * d, hk * d], dim=-1)
    q, k = q.view(tokens, hq, d), k.view(tokens, hk, d)
    positions = torch.tensor([0, 5, 1, 17, 3, 30], device=DEVICE)
    freqs = torch.outer(torch.arange(40.0), 1.0 / 1000.0 ** (torch.arange(0, d, 2) / d))
    cos_sin = torch.cat([freqs.cos(), freqs.sin()], dim=-1).to(DEVICE)
    q_w, k_w = randn(d, dtype=dtype, seed=3), randn(d, dtype=dtype, seed=4)
    ref_q, ref_k = (rms_norm(q, q_w, 1e-6), rms_norm(k, k_w, 1e-6)) if with_norm else (q, k)
    ref_q, ref_k = apply_rotary(ref_q, ref_k, cos_sin, positions)
    v_before = v.clone()
    weights = (q_w, k_w, 1e-6) if with_norm else ()
    out_q, out_k = kernels.rotary_(q, k, cos_sin, positions, *weights)
    assert out_q.data_ptr() == q.data_ptr() and out_k.data_ptr() == k.data_ptr()    # in place
    close(q, ref_q)
    close(k, ref_k)
    assert torch.equal(v, v_before), "v must be left alone"


@pytest.mark.parametrize("dtype", DTYPES)
def test_silu_and_mul(dtype):
    from nanovllm import kernels
    x = randn(7, 2 * 48, dtype=dtype) * 3
    close(kernels.silu_and_mul(x), silu_and_mul(x))
    with pytest.raises(ValueError, match="2 \\* intermediate"):
        kernels.silu_and_mul(x[:, :-1])


def test_layers_keep_the_torch_functions_without_triton(monkeypatch):
    """A CUDA machine without triton runs the torch functions instead of failing."""
    import types

    from nanovllm.layers import fusion
    cuda_tensor = types.SimpleNamespace(is_cuda=True)
    fusion._triton_here.cache_clear()
    monkeypatch.setattr("nanovllm.kernels.triton_available", lambda: False)
    assert not fusion.use_kernels(cuda_tensor)
    fusion._triton_here.cache_clear()
    monkeypatch.undo()
    assert fusion.use_kernels(cuda_tensor)
    monkeypatch.setenv("NANOVLLM_FUSED_KERNELS", "0")
    assert not fusion.use_kernels(cuda_tensor)
    fusion._triton_here.cache_clear()
