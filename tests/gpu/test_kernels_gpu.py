"""Triton kernels on a CUDA GPU at realistic sizes (Qwen3-0.6B's attention shape and others),
bf16/fp16, against the pure-torch reference computed in float32 from the same inputs.
Tolerance by relative norm error: bf16 operands land between 1e-3 and 1e-2."""
import pytest
import torch

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

TOL = {torch.bfloat16: 1.5e-2, torch.float16: 5e-3}


def random_4bit(n, k, group_size, gen, dtype):
    """A random 4-bit weight [n, k] on the GPU: packed words, scales and mins (dequantize's layout)."""
    from nanovllm.quantization.packing import pack_int32
    return (pack_int32(torch.randint(0, 16, (n, k), generator=gen), 4, dim=1).cuda(),
            (torch.rand(n, k // group_size, generator=gen) * 0.02 + 0.005).to("cuda", dtype),
            (torch.randn(n, k // group_size, generator=gen) * 0.05).to("cuda", dtype))


def rel_err(out, ref):
    assert torch.isfinite(out).all(), "NaN/inf in the output (an element left unwritten?)"
    return ((out.float() - ref.float()).norm() / ref.float().norm()).item()


def make_batch(seq_lens, q_lens, num_heads, num_kv_heads, head_dim, block_size, dtype, gen):
    dev = "cuda"
    blocks_per_seq = [(n + block_size - 1) // block_size for n in seq_lens]
    num_blocks = sum(blocks_per_seq) + 7
    perm = torch.randperm(num_blocks, generator=gen).to(dev)
    max_blocks = max(blocks_per_seq) + 2
    block_tables = torch.randint(0, num_blocks, (len(seq_lens), max_blocks), generator=gen).to(dev)
    used = 0
    for b, nb in enumerate(blocks_per_seq):
        block_tables[b, :nb] = perm[used:used + nb]
        used += nb
    shape = (num_blocks, block_size, num_kv_heads, head_dim)
    cu = torch.tensor([0] + q_lens).cumsum(0).to(torch.int32)
    return dict(
        q=torch.randn(int(cu[-1]), num_heads, head_dim, generator=gen).to(dev, dtype),
        k_cache=torch.randn(shape, generator=gen).to(dev, dtype),
        v_cache=torch.randn(shape, generator=gen).to(dev, dtype),
        cu_seqlens_q=cu.to(dev), seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device=dev),
        block_tables=block_tables.to(torch.int32))


def reference(batch, scale):
    from nanovllm.kernels import paged_attention_reference
    return paged_attention_reference(batch["q"].float(), batch["k_cache"].float(), batch["v_cache"].float(),
                                     batch["cu_seqlens_q"], batch["seq_lens"], batch["block_tables"], scale)


# ((Hq, Hkv, D), dtype): Qwen3-0.6B's shape in both half types, GQA 4 and 1, head_dim 64
CASES = [((16, 8, 128), torch.bfloat16), ((16, 8, 128), torch.float16), ((32, 8, 128), torch.bfloat16),
         ((16, 4, 64), torch.bfloat16), ((8, 8, 64), torch.float16)]


@pytest.mark.parametrize("block_size", [16, 256])
@pytest.mark.parametrize("shape,dtype", CASES)
def test_decode_gpu(shape, dtype, block_size):
    from nanovllm.kernels import paged_decode_attention
    gen = torch.Generator().manual_seed(hash((shape, block_size)) % 2**31)
    num_heads, num_kv_heads, head_dim = shape
    # a few long sequences and many short ones, lengths off block boundaries
    seq_lens = [4099, 2500, 1] + torch.randint(1, 700, (45,), generator=gen).tolist()
    batch = make_batch(seq_lens, [1] * len(seq_lens), num_heads, num_kv_heads, head_dim, block_size, dtype, gen)
    scale = head_dim ** -0.5
    ref = reference(batch, scale)
    for num_splits in (None, 1, 8):
        out = torch.full_like(batch["q"], float("nan"))
        paged_decode_attention(batch["q"], batch["k_cache"], batch["v_cache"], batch["seq_lens"],
                               batch["block_tables"], scale, num_splits=num_splits, out=out)
        assert rel_err(out, ref) < TOL[dtype], num_splits


@pytest.mark.parametrize("block_size", [16, 64, 256])
@pytest.mark.parametrize("shape,dtype", CASES)
def test_prefill_gpu(shape, dtype, block_size):
    from nanovllm.kernels import paged_prefill_attention
    gen = torch.Generator().manual_seed(hash((shape, block_size, 1)) % 2**31)
    num_heads, num_kv_heads, head_dim = shape
    # fresh prompts, prefix-cache hits, chunks of long prompts and decode rows, mixed
    seq_lens = [1000, 517, 2048, 300, 77, 1500, 5, 1]
    q_lens = [1000, 200, 512, 1, 77, 1, 5, 1]
    batch = make_batch(seq_lens, q_lens, num_heads, num_kv_heads, head_dim, block_size, dtype, gen)
    scale = head_dim ** -0.5
    out = torch.full_like(batch["q"], float("nan"))
    paged_prefill_attention(**batch, max_seqlen_q=max(q_lens), scale=scale, out=out)
    assert rel_err(out, reference(batch, scale)) < TOL[dtype]


@pytest.mark.parametrize("dtype", [torch.bfloat16])
def test_store_kv_gpu(dtype):
    from nanovllm.kernels import store_kv_cache, store_kv_cache_reference
    T, hq, hkv, d, nb, bs = 3000, 16, 8, 128, 300, 16
    qkv = torch.randn(T, (hq + 2 * hkv) * d, device="cuda", dtype=dtype)
    _, k, v = qkv.split([hq * d, hkv * d, hkv * d], dim=-1)
    k, v = k.view(T, hkv, d), v.view(T, hkv, d)
    slots = torch.randperm(nb * bs, device="cuda")[:T]
    slots[::7] = -1
    k_cache = torch.randn(nb, bs, hkv, d, device="cuda", dtype=dtype)
    v_cache = torch.randn_like(k_cache)
    k_ref, v_ref = k_cache.clone(), v_cache.clone()
    store_kv_cache(k, v, k_cache, v_cache, slots)
    store_kv_cache_reference(k, v, k_ref, v_ref, slots)
    assert torch.equal(k_cache, k_ref) and torch.equal(v_cache, v_ref)


def test_decode_cuda_graph_serves_every_length():
    """One graph captured at short lengths, replayed at long ones: the grid must not depend
    on the sequence lengths."""
    from nanovllm.kernels import paged_decode_attention
    gen = torch.Generator().manual_seed(7)
    B, hq, hkv, d, bs = 8, 16, 8, 128, 16
    long_lens = [3000, 2900, 17, 1, 800, 4096, 100, 33]
    batch = make_batch(long_lens, [1] * B, hq, hkv, d, bs, torch.bfloat16, gen)
    seq_lens = torch.ones_like(batch["seq_lens"])            # capture with length 1
    out = torch.empty_like(batch["q"])
    args = (batch["q"], batch["k_cache"], batch["v_cache"], seq_lens, batch["block_tables"], d ** -0.5)
    paged_decode_attention(*args, out=out)                   # compile outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        paged_decode_attention(*args, out=out)
    seq_lens.copy_(batch["seq_lens"])
    out.fill_(float("nan"))
    graph.replay()
    torch.cuda.synchronize()
    assert rel_err(out, reference(batch, d ** -0.5)) < TOL[torch.bfloat16]


def test_prefill_cuda_graph_no_host_sync():
    """The prefill kernel reads no length on the host: it can be captured in a CUDA graph
    (capture fails on a host sync) and replayed with other lengths of the same token count."""
    from nanovllm.kernels import paged_prefill_attention
    gen = torch.Generator().manual_seed(11)
    batch = make_batch([700, 300, 64], [200, 300, 1], 16, 8, 128, 16, torch.bfloat16, gen)
    out = torch.empty_like(batch["q"])
    kwargs = dict(batch, max_seqlen_q=300, scale=0.1, out=out)
    paged_prefill_attention(**kwargs)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        paged_prefill_attention(**kwargs)
    # same 501 tokens, split differently, other context lengths
    batch["cu_seqlens_q"].copy_(torch.tensor([0, 100, 400, 501], dtype=torch.int32))
    batch["seq_lens"].copy_(torch.tensor([650, 310, 101], dtype=torch.int32))
    out.fill_(float("nan"))
    graph.replay()
    torch.cuda.synchronize()
    assert rel_err(out, reference(batch, 0.1)) < TOL[torch.bfloat16]


def test_gumbel_sample_gpu_bf16():
    """The fused sampler at Qwen3's vocabulary in bf16: greedy rows are torch's argmax, sampled
    rows follow softmax(logits / T)."""
    from nanovllm.kernels import gumbel_sample
    V, gen = 151936, torch.Generator().manual_seed(0)
    logits = (torch.randn(64, V, generator=gen) * 3).to("cuda", torch.bfloat16)
    ones, greedy = torch.ones(64, device="cuda"), torch.ones(64, dtype=torch.bool, device="cuda")
    assert torch.equal(gumbel_sample(logits, ones, greedy, 1), logits.float().argmax(-1))
    draws, live = 4000, torch.randn(20, generator=gen)
    row = torch.full((V,), float("-inf"))
    row[100_000:100_020] = live
    batch = row.to("cuda", torch.bfloat16).expand(draws, V).contiguous()
    tokens = gumbel_sample(batch, torch.full((draws,), 0.7, device="cuda"), ~greedy[:1].expand(draws), 5)
    assert ((tokens >= 100_000) & (tokens < 100_020)).all()
    freq = torch.bincount(tokens.cpu() - 100_000, minlength=20).float() / draws
    expected = (live.bfloat16().float() / 0.7).softmax(-1)
    assert 0.5 * (freq - expected).abs().sum() < 0.05


def test_fused_layer_kernels_gpu_bf16():
    """RMSNorm, q/k-norm + rotary and SiLU-and-mul kernels at Qwen3-0.6B's sizes in bf16,
    against the torch functions (their references) on the same inputs."""
    from nanovllm import kernels
    from nanovllm.layers.activation import silu_and_mul
    from nanovllm.layers.layernorm import add_rms_norm, rms_norm
    from nanovllm.kernels.rotary import apply_rotary
    gen = torch.Generator().manual_seed(0)

    def randn(*shape):
        return torch.randn(*shape, generator=gen).to("cuda", torch.bfloat16)

    def close(out, ref):
        torch.testing.assert_close(out.float(), ref.float(), atol=2e-2, rtol=2e-2)

    x, residual, weight = randn(300, 1024), randn(300, 1024), randn(1024)
    for out, ref in zip(kernels.add_rms_norm(x, residual, weight, 1e-6),
                        add_rms_norm(x, residual, weight, 1e-6)):
        close(out, ref)
    qkv = randn(300, (16 + 2 * 8) * 128)
    q, k, _ = qkv.split([2048, 1024, 1024], dim=-1)
    q, k = q.view(300, 16, 128), k.view(300, 8, 128)
    positions = torch.randint(0, 4096, (300,), generator=gen).cuda()
    freqs = torch.outer(torch.arange(4096.0), 1.0 / 1e6 ** (torch.arange(0, 128, 2) / 128))
    cos_sin = torch.cat([freqs.cos(), freqs.sin()], dim=-1).cuda()
    q_w, k_w = randn(128), randn(128)
    ref_q, ref_k = apply_rotary(rms_norm(q, q_w, 1e-6), rms_norm(k, k_w, 1e-6), cos_sin, positions)
    kernels.rotary_(q, k, cos_sin, positions, q_w, k_w, 1e-6)
    close(q, ref_q)
    close(k, ref_k)
    gate_up = randn(300, 2 * 3072)
    close(kernels.silu_and_mul(gate_up), silu_and_mul(gate_up))


def test_gumbel_sample_gpu_far_tail():
    """Tokens far below the top still win at their rate: one token at 0 and 50,000 at -18
    (each e^-18 as likely) give the tail 7.6e-4 of the draws, about 15 of 20,000. Noise that
    stops near 16 (a uniform too coarse near 1) would give almost none."""
    from nanovllm.kernels import gumbel_sample
    rows, tail = 20_000, 50_000
    logits = torch.full((rows, tail + 1), -18.0, device="cuda", dtype=torch.bfloat16)
    logits[:, 0] = 0.0
    tokens = gumbel_sample(logits, torch.ones(rows, device="cuda"), torch.zeros(rows, dtype=torch.bool, device="cuda"), 9)
    drawn = int((tokens != 0).sum())
    assert 5 <= drawn <= 30, drawn


def test_sampling_thresholds_gpu_bf16():
    """Top-k / top-p / min-p cut-offs without sorting, at Qwen3's vocabulary in bf16, keep the
    tokens the sorting torch filters keep (at most one token apart, where float sums in a
    different order land on the other side of the top-p boundary)."""
    from nanovllm.kernels import sampling_thresholds
    from nanovllm.layers.sampler import apply_temperature_and_filters
    from nanovllm.layers.sampling_metadata import SamplingMetadata, SamplingRow
    from nanovllm.sampling_params import SamplingParams
    settings = [dict(top_k=50), dict(top_p=0.95), dict(top_k=50, top_p=0.9), dict(min_p=0.05),
                dict(top_k=1000, top_p=0.5, min_p=0.01), dict(top_p=0.999), dict(top_p=0.9, min_p=0.05)]
    rows = [SamplingRow(SamplingParams(temperature=0.8, **kw), [], []) for kw in settings]
    meta = SamplingMetadata.build(rows, 151936, torch.device("cuda"))
    gen = torch.Generator().manual_seed(0)
    logits = (torch.randn(len(rows), 151936, generator=gen) * 3).to("cuda", torch.bfloat16)
    kept = torch.isfinite(apply_temperature_and_filters(logits.float(), meta))
    keys = sampling_thresholds(logits, meta.temperature, meta.top_k, meta.top_p, meta.min_p)
    bits = logits.float().view(torch.int32)
    ours = torch.where(bits >= 0, bits, bits ^ 0x7FFFFFFF) >= keys[:, None]
    assert ((ours != kept).sum(-1) <= 1).all(), (ours.sum(-1).tolist(), kept.sum(-1).tolist())
    assert (kept.sum(-1) > 1).all()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("group_size", [32, 128])
@pytest.mark.parametrize("rows", [1, 3, 4])
def test_w4a16_gemv_float16_unpacking_matches_plain(dtype, group_size, rows):
    """The GEMV's float16 unpacking (PTX) gives the plain unpacking's exact values, but the two
    kernels' float32 sums may be fused into multiply-adds differently by the compiler (on an H100:
    up to 7 of 9,216 outputs one rounding step apart, at 3 and 4 rows), so they agree to a rounding
    step of the output, not bit for bit; and both are the dequantized matmul's."""
    from nanovllm.kernels.w4a16_gemm import w4a16_gemm
    from nanovllm.quantization.int_linear import dequantize
    gen = torch.Generator().manual_seed(rows)
    n, k = 3072, 2048
    qweight, scales, mins = random_4bit(n, k, group_size, gen, dtype)
    x = torch.randn(rows, k, generator=gen).to("cuda", dtype)
    expected = x.float() @ dequantize(qweight, scales, mins, 4, group_size).float().t()
    for split_k in (1, 3, None):
        plain, half = (w4a16_gemm(x, qweight, scales, mins, 4, group_size, split_k=split_k,
                                  config={"GEMV": True, "HALF_UNPACK": h}) for h in (False, True))
        torch.testing.assert_close(half, plain, rtol=torch.finfo(dtype).eps, atol=1e-3)
        assert rel_err(half, expected) < TOL[dtype]


@pytest.mark.parametrize("gluon_rows, rows", [(0, 1), (2, 1), (0, 4)])
def test_w4a16_gemv_launched_early_in_a_cuda_graph(monkeypatch, gluon_rows, rows):
    """With programmatic dependent launch (sm_90+) each GEMV starts while the kernel ahead of it
    runs (kernels/pdl.py): norm -> GEMV -> activation -> GEMV, four times, captured in a CUDA graph
    and replayed on new inputs, gives the bits of the same kernels launched one after another
    (the Triton GEMV, the Gluon one, and at 4 rows the Gluon tensor-core kernel)."""
    if torch.cuda.get_device_capability() < (9, 0):
        pytest.skip("programmatic dependent launch needs sm_90")
    from nanovllm import kernels
    from nanovllm.kernels import w4a16_gemm as module
    from nanovllm.kernels.w4a16_gemm import w4a16_gemm
    monkeypatch.setattr(module.w4a16_gemv, "GLUON_GEMV_MAX_ROWS", gluon_rows)
    from nanovllm.quantization.packing import pack_int32
    gen = torch.Generator().manual_seed(0)
    hidden, inter, group = 2048, 8192, 128

    def quantized(n, k):
        return (pack_int32(torch.randint(0, 16, (n, k), generator=gen), 4, dim=1).cuda(),
                (torch.rand(n, k // group, generator=gen) * 0.002 + 0.0005).to("cuda", torch.bfloat16),
                (torch.randn(n, k // group, generator=gen) * 0.005).to("cuda", torch.bfloat16))
    layers = [(quantized(2 * inter, hidden), quantized(hidden, inter)) for _ in range(4)]
    norm_weight = torch.ones(hidden, dtype=torch.bfloat16, device="cuda")

    def chain(x):
        for gate_up, down in layers:
            a = kernels.silu_and_mul(w4a16_gemm(kernels.rms_norm(x, norm_weight, 1e-6), *gate_up, 4, group))
            x = x + w4a16_gemm(a, *down, 4, group)
        return x

    static_x = torch.randn(rows, hidden, generator=gen).to("cuda", torch.bfloat16)
    if rows > 1 and torch.cuda.get_device_capability() == (9, 0):       # the tensor-core kernel takes it
        assert module.w4a16_mma.gluon_mma(static_x, *layers[0][0], 4, group, None, None, None) is not None
    for pdl in ("0", "1"):          # compile both variants before capturing
        monkeypatch.setenv("NANOVLLM_PDL", pdl)
        chain(static_x)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out = chain(static_x)
    monkeypatch.setenv("NANOVLLM_PDL", "0")
    for trial in range(3):
        static_x.copy_(torch.randn(rows, hidden, generator=gen).to("cuda", torch.bfloat16))
        graph.replay()
        expected = chain(static_x)
        assert torch.equal(static_out, expected), trial


@pytest.mark.parametrize("rows", [1, 2])
@pytest.mark.parametrize("n, k, group_size", [(3000, 2048, 128), (1000, 576, 32), (2048, 1536, 64),
                                              (512, 2048, 256), (768, 1024, 1024), (2048, 8192, 128)])
def test_w4a16_gluon_gemv_matches_the_reference(rows, n, k, group_size, monkeypatch):
    """The Gluon GEMV (w4a16_gemv.py; w4a16_gemm picks it for bfloat16 rows up to
    GLUON_GEMV_MAX_ROWS, at most 2, and both are tested): the dequantized matmul's result, with and
    without split-K, for group sizes 32 to per-channel, columns that do not fill the last tile, and
    K ranges that are not a power of two; and the Triton GEMV's to a rounding step of the output
    (the two sum in different orders)."""
    from nanovllm.kernels import w4a16_gemm as module
    from nanovllm.quantization.int_linear import dequantize
    if not module.w4a16_gemv.gluon_available():
        pytest.skip("this triton has no Gluon")
    gen = torch.Generator().manual_seed(rows * n)
    qweight, scales, mins = random_4bit(n, k, group_size, gen, torch.bfloat16)
    x = torch.randn(rows, k, generator=gen).to("cuda", torch.bfloat16)
    expected = x.float() @ dequantize(qweight, scales, mins, 4, group_size).float().t()
    triton_gemv = module.w4a16_gemm(x, qweight, scales, mins, 4, group_size, config={"GEMV": True})
    for split_k in (1, 3, None):
        for cfg in ({"GLUON": True, "SN": 4, "num_warps": 4}, {"GLUON": True, "SN": 2, "num_warps": 8}):
            out = module.w4a16_gemv.gluon_gemv(x, qweight, scales, mins, 4, group_size, None, split_k, cfg)
            assert out is not None
            assert rel_err(out, expected) < TOL[torch.bfloat16], (split_k, cfg)
            torch.testing.assert_close(out, triton_gemv, rtol=2 * torch.finfo(torch.bfloat16).eps, atol=1e-3)
    monkeypatch.setattr(module.w4a16_gemv, "GLUON_GEMV_MAX_ROWS", 2)
    monkeypatch.setattr(module.w4a16_mma, "GLUON_MMA_MIN_ROWS", 3)      # (on sm_90 it takes 2 rows first)
    assert torch.equal(module.w4a16_gemm(x, qweight, scales, mins, 4, group_size),
                       module.w4a16_gemv.gluon_gemv(x, qweight, scales, mins, 4, group_size, None, None, None))


@pytest.mark.parametrize("rows", [2, 5, 16, 24, 33, 64])
@pytest.mark.parametrize("n, k, group_size", [(3000, 2048, 128), (1000, 576, 32), (2048, 1536, 64),
                                              (512, 2048, 256), (768, 1024, 1024), (2048, 8192, 128)])
def test_w4a16_gluon_mma_matches_the_reference(rows, n, k, group_size):
    """The Gluon tensor-core kernel (w4a16_mma.py; w4a16_gemm picks it for bfloat16 products of
    2 to 32 rows on sm_90): the dequantized matmul's result, and the Triton tensor-core kernel's
    to a rounding step of each output, for 64 and 128 columns a program at any rows, with and
    without split-K, for group sizes 32 to per-channel, columns that do not fill the last tile, row
    counts that do not fill its MMA's width (5, 24, 33) and rows of x that are not contiguous; the
    same bits when run again (the split-K counters are reset); through w4a16_gemm up to 32 rows (64
    columns a program at 24), gated too."""
    from nanovllm import kernels
    from nanovllm.kernels import w4a16_gemm as module
    from nanovllm.quantization.int_linear import dequantize
    if not hasattr(module.w4a16_mma, "_w4a16_mma_kernel") or torch.cuda.get_device_capability() != (9, 0):
        pytest.skip("needs Gluon and an sm_90 GPU (wgmma)")
    gen = torch.Generator().manual_seed(rows * n)
    qweight, scales, mins = random_4bit(n, k, group_size, gen, torch.bfloat16)
    x = torch.randn(rows, k + 64, generator=gen).to("cuda", torch.bfloat16)[:, :k]     # rows k + 64 apart
    expected = x.float() @ dequantize(qweight, scales, mins, 4, group_size).float().t()
    triton_dot = module.w4a16_gemm(x, qweight, scales, mins, 4, group_size, config={"GEMV": False})
    for split_k in (1, 3, None):
        for t in (1, 2):
            cfg = {"GLUON_MMA": True, "T": t, "wide_max_rows": 64}
            out = module.w4a16_mma.gluon_mma(x, qweight, scales, mins, 4, group_size, None, split_k, cfg)
            assert out is not None
            assert rel_err(out, expected) < TOL[torch.bfloat16], (split_k, t)
            torch.testing.assert_close(out, triton_dot, rtol=2 * torch.finfo(torch.bfloat16).eps, atol=1e-3)
            assert torch.equal(out, module.w4a16_mma.gluon_mma(x, qweight, scales, mins, 4, group_size, None,
                                                                split_k, cfg))
    routed = module.w4a16_mma.gluon_mma(x, qweight, scales, mins, 4, group_size, None, None, None)
    assert (routed is not None) == (rows <= module.w4a16_mma.GLUON_MMA_MAX_ROWS)
    if routed is not None:
        assert torch.equal(module.w4a16_gemm(x, qweight, scales, mins, 4, group_size), routed)
        if rows > 2:        # (2 gated rows: the Gluon GEMV makes the activation)
            assert torch.equal(module.w4a16_gemm(x, qweight, scales, mins, 4, group_size, gated=True),
                               kernels.silu_and_mul(routed))


@pytest.mark.parametrize("rows", [1, 2])
@pytest.mark.parametrize("n, k, group_size", [(16384, 2048, 128), (3000, 576, 32), (1000, 1024, 64)])
def test_w4a16_gluon_gemv_gated_gives_the_activation(rows, n, k, group_size):
    """With `gated` the Gluon GEMV returns silu(gate) * up of its product's halves: the bits of its
    own product followed by the activation's kernel, with and without split-K, for halves that do
    not fill the last tile (3000 / 2 and 1000 / 2 columns)."""
    from nanovllm import kernels
    from nanovllm.kernels import w4a16_gemv
    if not w4a16_gemv.gluon_available():
        pytest.skip("this triton has no Gluon")
    gen = torch.Generator().manual_seed(rows * n)
    qweight, scales, mins = random_4bit(n, k, group_size, gen, torch.bfloat16)
    x = torch.randn(rows, k, generator=gen).to("cuda", torch.bfloat16)
    for split_k in (1, 3, None):
        for cfg in ({"GLUON": True, "SN": 4, "num_warps": 4}, {"GLUON": True, "SN": 2, "num_warps": 8}):
            product = w4a16_gemv.gluon_gemv(x, qweight, scales, mins, 4, group_size, None, split_k, cfg)
            gated = w4a16_gemv.gluon_gemv(x, qweight, scales, mins, 4, group_size, None, split_k, cfg, gated=True)
            assert gated.shape == (rows, n // 2)
            assert torch.equal(gated, kernels.silu_and_mul(product)), (split_k, cfg)
