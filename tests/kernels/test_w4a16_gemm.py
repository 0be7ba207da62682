"""The W4A16 GEMM (Triton, in the CPU interpreter) against the torch reference: dequantize, then matmul.

Both kernels are checked: the CUDA-core one (config GEMV=True, up to 8 rows a program: 11 rows
make a second, partly empty, row tile) and the tensor-core one, with a last column tile that
overhangs N and split-K ranges of unequal length."""
import pytest
import torch

from nanovllm.kernels import triton_available
from nanovllm.quantization.int_linear import dequantize
from nanovllm.quantization.packing import pack_int32

pytestmark = pytest.mark.skipif(not triton_available(), reason="needs triton (GPU or TRITON_INTERPRET=1)")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"     # the interpreter takes CPU tensors


def random_quantized(n: int, k: int, bits: int, group_size: int, act_order: bool, dtype, seed: int = 0):
    """Random quantized tensors in nanovllm's layout; with act_order, g_idx assigns groups in a shuffled
    order of the input features (as GPTQ's desc_act)."""
    gen = torch.Generator().manual_seed(seed)
    groups = k // group_size
    q = torch.randint(0, 2 ** bits, (n, k), generator=gen)
    scales = (torch.rand(n, groups, generator=gen) * 0.02 + 0.005).to(dtype)
    mins = (torch.randn(n, groups, generator=gen) * 0.05).to(dtype)
    g_idx = None
    if act_order:
        g_idx = torch.empty(k, dtype=torch.int32)
        g_idx[torch.randperm(k, generator=gen)] = (torch.arange(k) // group_size).to(torch.int32)
    to = lambda t: None if t is None else t.to(DEVICE)  # noqa: E731
    return to(pack_int32(q, bits, dim=1)), to(scales), to(mins), to(g_idx)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("group_size,act_order", [(32, False), (32, True), (128, False), (128, True)])
@pytest.mark.parametrize("rows,gemv", [(1, True), (3, True), (11, True), (1, False), (40, False)])
def test_w4a16_gemm_matches_dequantize_then_matmul(dtype, group_size, act_order, rows, gemv):
    from nanovllm.kernels.w4a16_gemm import w4a16_gemm
    n, k = 80, 256                  # BLOCK_N 64: the second column tile overhangs N
    qweight, scales, mins, g_idx = random_quantized(n, k, 4, group_size, act_order, dtype, seed=rows)
    x = torch.randn(rows, k, generator=torch.Generator().manual_seed(1)).to(DEVICE, dtype)
    w = dequantize(qweight, scales, mins, 4, group_size, g_idx)
    expected = (x.float() @ w.float().t())
    config = {"GEMV": gemv, "BLOCK_N": 64}
    for split_k in (1, 3, None):    # 3: K ranges of unequal length
        out = w4a16_gemm(x, qweight, scales, mins, 4, group_size, g_idx, split_k=split_k, config=config)
        assert out.dtype == dtype and out.shape == (rows, n)
        if dtype == torch.float32:
            torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
        else:   # float16 products, float32 sums: within a few float16 roundings of the exact value
            torch.testing.assert_close(out.float(), expected, rtol=2e-3, atol=2e-3)


@pytest.mark.parametrize("group_size", [32, 64, 8])
@pytest.mark.parametrize("gemv", [True, False])
def test_w8a16_and_odd_groups(group_size, gemv):
    """8-bit weights; and groups smaller than a K step, which go through the g_idx look-up (the
    tensor-core kernel, also when the GEMV one is asked for)."""
    from nanovllm.kernels.w4a16_gemm import w4a16_gemm
    n, k = 48, 128
    for bits in (8, 4):
        qweight, scales, mins, g_idx = random_quantized(n, k, bits, group_size, False, torch.float32)
        x = torch.randn(3, k, generator=torch.Generator().manual_seed(2)).to(DEVICE)
        w = dequantize(qweight, scales, mins, bits, group_size)
        out = w4a16_gemm(x, qweight, scales, mins, bits, group_size, config={"GEMV": gemv})
        # float32 sums in another order: off by a few roundings of the terms' magnitudes, which for
        # an output near zero (a term of 8-bit weights is ~1) is more than a rounding of the output
        bound = 2e-6 * (x.abs() @ w.abs().t())
        assert ((out - x @ w.t()).abs() <= bound).all(), (out - x @ w.t()).abs().max()


@pytest.mark.parametrize("gemv", [True, False])
def test_split_k_counters_reset_and_sum_is_repeatable(gemv):
    """Split-K sums inside the launch: each tile's last program adds the partials. Afterwards every
    counter is back at zero (a CUDA graph replays the same counters), and a second launch gives the
    same bits (the partials are added in K order, not in the order the programs finished)."""
    from nanovllm.kernels import w4a16_gemm as module
    n, k, group_size = 80, 512, 32
    qweight, scales, mins, _ = random_quantized(n, k, 4, group_size, False, torch.float32)
    x = torch.randn(2, k, generator=torch.Generator().manual_seed(3)).to(DEVICE)
    expected = x @ dequantize(qweight, scales, mins, 4, group_size).t()
    config = {"GEMV": gemv, "BLOCK_N": 64, "BLOCK_K": 32}
    first = module.w4a16_gemm(x, qweight, scales, mins, 4, group_size, split_k=4, config=config)
    from nanovllm.kernels import split_k
    counters = split_k._COUNTERS[x.device]
    assert counters.count_nonzero() == 0
    torch.testing.assert_close(first, expected, rtol=1e-5, atol=1e-5)
    second = module.w4a16_gemm(x, qweight, scales, mins, 4, group_size, split_k=4, config=config)
    assert torch.equal(first, second) and counters.count_nonzero() == 0


def test_w4a16_gemm_ragged_k_steps():
    """Scattered groups over a K that no step size divides (200 = 6 steps of 32 and 8 left over)."""
    from nanovllm.kernels.w4a16_gemm import w4a16_gemm
    n, k, group_size = 24, 200, 40
    qweight, scales, mins, g_idx = random_quantized(n, k, 4, group_size, True, torch.float32)
    x = torch.randn(2, k, device=DEVICE)
    expected = x @ dequantize(qweight, scales, mins, 4, group_size, g_idx).t()
    for split_k in (1, 2):
        torch.testing.assert_close(w4a16_gemm(x, qweight, scales, mins, 4, group_size, g_idx, split_k=split_k),
                                   expected, rtol=1e-5, atol=1e-5)


def test_w4a16_gemm_defaults_cover_every_row_count():
    """Every row count maps to one kernel's settings, the GEMV kernel's up to GEMV_MAX_ROWS."""
    from nanovllm.kernels import w4a16_gemm as module
    for rows in (1, 2, 4, 8, 16, 17, 32, 33, 64, 65, 4096):
        cfg = module._config(rows)
        assert cfg["GEMV"] == (rows <= module.GEMV_MAX_ROWS)
        assert {"BLOCK_M", "BLOCK_N", "BLOCK_K", "num_warps", "num_stages", "split_per_sm"} <= cfg.keys()
    assert 1 < module.GEMV_MAX_ROWS < 16


def test_tensor_core_kernel_takes_64_columns_where_128_would_split_k_too_finely(monkeypatch):
    """The tensor-core kernel's column width on an H100 (132 SMs), as measured at 16 rows on
    2026-12-08 (docs/benchmarks.md): 64 columns for Llama-3.2-1B's qkv, o and down projections and
    Llama-3.1-8B's o, where 128 split K into one or two steps a program or partials above a quarter
    of the weight; 128 for the rest, and for every layer at 2 rows but Llama-3.2-1B's o (16 tiles,
    one step each)."""
    from nanovllm.kernels import split_k, w4a16_mma
    monkeypatch.setattr(split_k, "sm_count", lambda device: 132)
    cuda = torch.device("cuda")
    llama_1b = {"qkv": (3072, 2048), "o": (2048, 2048), "gate_up": (16384, 2048), "down": (2048, 8192)}
    llama_8b = {"qkv": (6144, 4096), "o": (4096, 4096), "gate_up": (28672, 4096), "down": (4096, 14336)}

    def split(rows, n, k):
        widest = w4a16_mma.launch_constexprs(rows, k, 128)["T"]
        return w4a16_mma.columns_and_split(widest, rows, n, k, 128, cuda, w4a16_mma.GLUON_MMA_CONFIG)

    def widths(layers, rows):
        return {name: 64 * split(rows, n, k)[0] for name, (n, k) in layers.items()}
    assert widths(llama_1b, 16) == {"qkv": 64, "o": 64, "gate_up": 128, "down": 64}
    assert widths(llama_8b, 16) == {"qkv": 128, "o": 64, "gate_up": 128, "down": 128}
    assert widths(llama_1b, 2) == {"qkv": 128, "o": 64, "gate_up": 128, "down": 128}
    assert set(widths(llama_8b, 2).values()) == {128}
    assert set(widths(llama_8b, 32).values()) == {64}              # wide_max_rows: 16
    assert split(16, 2048, 2048) == (1, 8)                                     # 32 tiles of 64 columns, 2 steps each


def test_w4a16_gemm_rejects_mismatched_shapes():
    from nanovllm.kernels.w4a16_gemm import w4a16_gemm
    qweight, scales, mins, _ = random_quantized(32, 64, 4, 32, False, torch.float32)
    with pytest.raises(ValueError, match="features"):
        w4a16_gemm(torch.randn(2, 96, device=DEVICE), qweight, scales, mins, 4, 32)
    with pytest.raises(ValueError, match="bits"):
        w4a16_gemm(torch.randn(2, 64, device=DEVICE), qweight, scales, mins, 3, 32)


def _launch_w4a16_variants():
    from nanovllm.kernels.w4a16_gemm import w4a16_gemm
    for bits, group_size, act_order, rows, gemv in ((4, 128, False, 1, True), (8, 64, False, 2, True),
                                                    (4, 128, False, 16, False), (4, 32, True, 40, False),
                                                    (8, 64, False, 80, False)):
        qweight, scales, mins, g_idx = random_quantized(64, 256, bits, group_size, act_order, torch.float16)
        w4a16_gemm(torch.randn(rows, 256, dtype=torch.float16), qweight, scales, mins, bits, group_size, g_idx,
                   config={"GEMV": gemv})


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the compiler from the CPU interpreter's recordings")
def test_w4a16_gemm_compiles_for_sm90(monkeypatch):
    """Both kernels' launches (float16 and bfloat16, 4 and 8 bits, split-K, g_idx, the GEMV's float16
    unpacking) compile for Hopper."""
    import json
    import os
    import subprocess
    import sys

    from tests.kernels import test_compile_for_gpu as compile_check
    monkeypatch.setattr(compile_check, "_launch_all_kernels", _launch_w4a16_variants)
    launches = compile_check._record_launches(monkeypatch)
    # the float16 unpacking runs on a GPU only (PTX): compile the 4-bit GEMV launches with it too
    launches += [dict(launch, constexprs={**launch["constexprs"], "HALF_UNPACK": True}) for launch in launches
                 if launch["name"] == "_w4a16_gemv_kernel" and launch["constexprs"]["BITS"] == 4]
    names = [launch["name"] for launch in launches]
    assert names.count("_w4a16_gemv_kernel") >= 4 and names.count("_w4a16_dot_kernel") >= 6, names
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    done = subprocess.run([sys.executable, "-c", compile_check._COMPILE], input=json.dumps(launches), env=env,
                          capture_output=True, text=True, timeout=240)
    assert done.returncode == 0 and "compiled" in done.stdout, done.stderr[-3000:]
    assert "FAILED" not in done.stdout, done.stdout


@pytest.mark.parametrize("failure", ["the front end", "the GPU's resources"])
def test_a_gluon_gemv_that_does_not_compile_hands_over_to_triton(failure, monkeypatch, caplog):
    """Gluon is an experimental API: where this triton cannot compile the Gluon GEMV (its front end
    refuses the kernel, or the compiled kernel needs more than the GPU has), its launcher says so
    once (a warning naming the triton version), turns it off (its gated variant failing turns off
    only that one), and returns False, so that w4a16_gemm goes on with the Triton kernels instead of
    failing every 4-bit decode step."""
    import ast

    from triton.compiler.errors import CompilationError
    from triton.runtime.errors import OutOfResources

    from nanovllm.kernels import w4a16_gemv
    if not w4a16_gemv.gluon_available():
        pytest.skip("this triton has no Gluon")

    class Uncompilable:
        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                if failure == "the front end":
                    raise CompilationError("x = 1", ast.parse("x = 1").body[0], "spelled otherwise in this triton")
                raise OutOfResources(300000, 232448, "shared memory")
            return launch

    monkeypatch.setattr(w4a16_gemv, "_w4a16_gemv_gluon_kernel", Uncompilable())
    monkeypatch.setattr(w4a16_gemv, "_COMPILES", True)
    monkeypatch.setattr(w4a16_gemv, "_GATED_COMPILES", True)
    # the gated variant alone: only it is turned off
    assert not w4a16_gemv._launch((1, 1), "the kernel's arguments", GATED=True)
    assert w4a16_gemv.gluon_available() and not w4a16_gemv._GATED_COMPILES
    with caplog.at_level("WARNING"):
        assert not w4a16_gemv._launch((1, 1), "the kernel's arguments", GATED=False)
    assert not w4a16_gemv.gluon_available()
    assert "does not compile" in caplog.text
    assert ("spelled otherwise" if failure == "the front end" else "shared memory") in caplog.text


@pytest.mark.parametrize("rows", [1, 5])
def test_gated_product_is_the_activation_of_the_product(rows):
    """w4a16_gemm(gated=True): silu(gate) * up of the product's two halves [M, N/2] (on a GPU the
    Gluon GEMV makes it in one launch: tests/gpu)."""
    from nanovllm.kernels.w4a16_gemm import w4a16_gemm
    from nanovllm.layers.activation import silu_and_mul
    qweight, scales, mins, _ = random_quantized(96, 256, 4, 32, False, torch.float32)
    x = torch.randn(rows, 256, device=DEVICE)
    gated = w4a16_gemm(x, qweight, scales, mins, 4, 32, gated=True)
    assert gated.shape == (rows, 48)
    torch.testing.assert_close(gated, silu_and_mul(w4a16_gemm(x, qweight, scales, mins, 4, 32)), rtol=1e-5, atol=1e-6)
