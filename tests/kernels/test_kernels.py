"""Triton kernels vs their pure-torch references (reference.py).

On a machine without CUDA these run in Triton's CPU interpreter (conftest.py sets
TRITON_INTERPRET=1), in float32 and float16 (the interpreter mishandles bfloat16), at small
sizes: every loop iteration of a kernel costs milliseconds there. With CUDA they run on the GPU.
Every check draws fresh random inputs and poisons the output with NaN first.
"""
import pytest
import torch

from nanovllm.kernels import (paged_attention_reference, store_kv_cache_reference,
                              triton_available)

pytestmark = pytest.mark.skipif(not triton_available(), reason="triton is not installed")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    assert torch.isfinite(out).all(), "output has NaN/inf (an element left unwritten?)"
    return ((out.double() - ref.double()).norm() / ref.double().norm()).item()


def tolerance(dtype: torch.dtype) -> float:
    # float32 on the GPU goes through "ieee" dots; float16 rounds P and the output
    return 1e-4 if dtype == torch.float32 else 5e-3


def make_paged_batch(seq_lens, q_lens, num_heads, num_kv_heads, head_dim, block_size,
                     dtype=torch.float32, cache_dtype=None, gen=None):
    """Random paged cache holding `seq_lens[b]` tokens of each sequence in scattered blocks,
    and random queries for the last `q_lens[b]` positions of each sequence."""
    cache_dtype = cache_dtype or dtype
    blocks_per_seq = [(n + block_size - 1) // block_size for n in seq_lens]
    num_blocks = sum(blocks_per_seq) + 3                      # a few blocks nobody owns
    perm = torch.randperm(num_blocks, generator=gen)
    max_blocks = max(blocks_per_seq) + 1
    # unused table entries point at random (valid) blocks: a kernel must not read them
    block_tables = torch.randint(0, num_blocks, (len(seq_lens), max_blocks), generator=gen)
    used = 0
    for b, nb in enumerate(blocks_per_seq):
        block_tables[b, :nb] = perm[used:used + nb]
        used += nb
    shape = (num_blocks, block_size, num_kv_heads, head_dim)
    k_cache = torch.randn(shape, generator=gen).to(cache_dtype)
    v_cache = torch.randn(shape, generator=gen).to(cache_dtype)
    cu = [0]
    for n in q_lens:
        cu.append(cu[-1] + n)
    q = torch.randn(cu[-1], num_heads, head_dim, generator=gen).to(dtype)
    to = lambda t: t.to(DEVICE)  # noqa: E731
    return dict(q=to(q), k_cache=to(k_cache), v_cache=to(v_cache),
                cu_seqlens_q=to(torch.tensor(cu, dtype=torch.int32)),
                seq_lens=to(torch.tensor(seq_lens, dtype=torch.int32)),
                block_tables=to(block_tables.to(torch.int32)))


def reference(batch, scale):
    # in float32, from the same (possibly rounded) inputs
    return paged_attention_reference(batch["q"].float(), batch["k_cache"].float(), batch["v_cache"].float(),
                                     batch["cu_seqlens_q"], batch["seq_lens"], batch["block_tables"], scale)


# ---------------------------------------------------------------- store_kv_cache

@pytest.mark.parametrize("block_size", [16, 64])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_store_kv_cache(block_size, dtype):
    from nanovllm.kernels import store_kv_cache
    num_tokens, num_heads, num_kv_heads, head_dim, num_blocks = 37, 4, 2, 32, 5
    # key and value as strided views into one fused qkv projection output
    qkv = torch.randn(num_tokens, (num_heads + 2 * num_kv_heads) * head_dim).to(dtype).to(DEVICE)
    _, k, v = qkv.split([num_heads * head_dim, num_kv_heads * head_dim, num_kv_heads * head_dim], dim=-1)
    k = k.view(num_tokens, num_kv_heads, head_dim)
    v = v.view(num_tokens, num_kv_heads, head_dim)
    assert not k.is_contiguous()
    slots = torch.randperm(num_blocks * block_size)[:num_tokens]
    slots[torch.randperm(num_tokens)[:5]] = -1                 # padding: not stored
    slots = slots.to(DEVICE)
    shape = (num_blocks, block_size, num_kv_heads, head_dim)
    k_cache = torch.randn(shape).to(dtype).to(DEVICE)
    v_cache = torch.randn(shape).to(dtype).to(DEVICE)
    k_ref, v_ref = k_cache.clone(), v_cache.clone()
    store_kv_cache(k, v, k_cache, v_cache, slots)
    store_kv_cache_reference(k, v, k_ref, v_ref, slots)
    assert torch.equal(k_cache, k_ref)
    assert torch.equal(v_cache, v_ref)


def test_store_kv_cache_int32_slots_and_empty():
    from nanovllm.kernels import store_kv_cache
    k = torch.randn(3, 1, 16, device=DEVICE)
    v = torch.randn(3, 1, 16, device=DEVICE)
    k_cache = torch.randn(2, 16, 1, 16, device=DEVICE)
    v_cache = torch.randn(2, 16, 1, 16, device=DEVICE)
    k_ref, v_ref = k_cache.clone(), v_cache.clone()
    slots = torch.tensor([31, -1, 0], dtype=torch.int32, device=DEVICE)
    store_kv_cache(k, v, k_cache, v_cache, slots)
    store_kv_cache_reference(k, v, k_ref, v_ref, slots)
    assert torch.equal(k_cache, k_ref) and torch.equal(v_cache, v_ref)
    store_kv_cache(k[:0], v[:0], k_cache, v_cache, slots[:0])   # no tokens: no launch, no error


# ---------------------------------------------------------------- prefill

PREFILL_CASES = {
    # name: (seq_lens, q_lens, num_heads, num_kv_heads, head_dim, block_size)
    "prefill_gqa2": ([37, 70, 5], [37, 70, 5], 4, 2, 32, 16),
    "prefill_mha": ([50, 17], [50, 17], 2, 2, 16, 16),
    "cached_prefix_gqa4": ([100, 45], [30, 45], 8, 2, 32, 16),
    "chunked_block64": ([128, 90], [64, 26], 4, 2, 32, 64),
    "mixed_decode": ([77, 20, 5, 1], [1, 20, 1, 1], 4, 2, 16, 16),
}


@pytest.mark.parametrize("case", list(PREFILL_CASES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_paged_prefill_attention(case, dtype):
    from nanovllm.kernels import paged_prefill_attention
    seq_lens, q_lens, num_heads, num_kv_heads, head_dim, block_size = PREFILL_CASES[case]
    batch = make_paged_batch(seq_lens, q_lens, num_heads, num_kv_heads, head_dim, block_size, dtype)
    scale = head_dim ** -0.5
    out = torch.full_like(batch["q"], float("nan"))
    result = paged_prefill_attention(**batch, max_seqlen_q=max(q_lens), scale=scale, out=out)
    assert result is out and out.dtype == dtype
    assert rel_err(out, reference(batch, scale)) < tolerance(dtype)


def test_mixed_batch_as_a_cuda_graph_pads_it():
    """A mixed step as StepGraphs replays it: decodes and prompt chunks over cached prefixes,
    two sequences sharing their first blocks (a prefix-cache hit), then padding sequences with
    no query tokens and padding tokens past the last sequence, with the query tile sized for
    the padded token count. The real rows equal the reference."""
    from nanovllm.kernels import paged_prefill_attention
    seq_lens, q_lens = [40, 40, 33, 9, 1], [1, 20, 1, 9, 1]
    batch = make_paged_batch(seq_lens, q_lens, 4, 2, 16, 8, torch.float16)
    batch["block_tables"][1, :4] = batch["block_tables"][0, :4]     # 32 shared prefix tokens
    real_tokens, pad_tokens, pad_seqs = sum(q_lens), 13, 3
    q = torch.cat([batch["q"], torch.randn(pad_tokens, 4, 16, device=DEVICE).half()])
    cu = torch.cat([batch["cu_seqlens_q"], torch.full((pad_seqs,), real_tokens, dtype=torch.int32, device=DEVICE)])
    lens = torch.cat([batch["seq_lens"], torch.zeros(pad_seqs, dtype=torch.int32, device=DEVICE)])
    tables = torch.cat([batch["block_tables"], batch["block_tables"][:pad_seqs]])
    out = torch.full_like(q, float("nan"))
    paged_prefill_attention(q, batch["k_cache"], batch["v_cache"], cu, lens, tables, max_seqlen_q=q.shape[0],
                            scale=0.25, out=out)
    assert rel_err(out[:real_tokens], reference(batch, 0.25)) < tolerance(torch.float16)


def test_paged_prefill_small_tiles_and_bf16_cache():
    """Tiles smaller than a cache block and larger than one, and an fp32 query over a bf16
    cache (the kernel converts each K/V tile to the query's dtype right after loading)."""
    from nanovllm.kernels import paged_prefill_attention
    batch = make_paged_batch([90, 33], [40, 33], 4, 1, 32, 64, torch.float32, cache_dtype=torch.bfloat16)
    scale = 0.3
    ref = reference(batch, scale)
    for config in ({"BLOCK_M": 64, "BLOCK_N": 16}, {"BLOCK_M": 16, "BLOCK_N": 128}):
        out = paged_prefill_attention(**batch, max_seqlen_q=40, scale=scale, config=config)
        assert rel_err(out, ref) < 1e-4, config


# ---------------------------------------------------------------- decode

DECODE_CASES = {
    # name: (seq_lens, num_heads, num_kv_heads, head_dim, block_size)
    "few_long_gqa2": ([128, 97], 4, 2, 32, 16),
    "many_short_gqa4": ([1, 3, 17, 16, 33, 2, 9, 64], 8, 2, 16, 16),
    "mixed_mha_block64": ([120, 1, 65, 7], 2, 2, 32, 64),
}


@pytest.mark.parametrize("case", list(DECODE_CASES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("num_splits", [1, 4])
def test_paged_decode_attention(case, dtype, num_splits):
    from nanovllm.kernels import paged_decode_attention
    seq_lens, num_heads, num_kv_heads, head_dim, block_size = DECODE_CASES[case]
    batch = make_paged_batch(seq_lens, [1] * len(seq_lens), num_heads, num_kv_heads, head_dim,
                             block_size, dtype)
    scale = head_dim ** -0.5
    out = torch.full_like(batch["q"], float("nan"))
    result = paged_decode_attention(batch["q"], batch["k_cache"], batch["v_cache"], batch["seq_lens"],
                                    batch["block_tables"], scale, num_splits=num_splits, out=out)
    assert result is out and out.dtype == dtype
    assert rel_err(out, reference(batch, scale)) < tolerance(dtype)


def test_paged_decode_default_splits_and_tiles():
    """Default num_splits, tiles larger and smaller than a block, and a batch slot with
    seq_len 0 (CUDA-graph padding) that must come out as zeros, not NaN."""
    from nanovllm.kernels import paged_decode_attention
    batch = make_paged_batch([100, 31, 64], [1, 1, 1], 4, 2, 32, 32)
    scale = 0.2
    ref = reference(batch, scale)
    for config in ({}, {"BLOCK_N": 16}, {"BLOCK_N": 128}):
        out = paged_decode_attention(batch["q"], batch["k_cache"], batch["v_cache"], batch["seq_lens"],
                                     batch["block_tables"], scale, config=config)
        assert rel_err(out, ref) < 1e-4, config
    lens = batch["seq_lens"].clone()
    lens[1] = 0
    for num_splits in (1, 2):
        out = paged_decode_attention(batch["q"], batch["k_cache"], batch["v_cache"], lens,
                                     batch["block_tables"], scale, num_splits=num_splits)
        assert torch.equal(out[1], torch.zeros_like(out[1]))
        assert rel_err(out[[0, 2]], ref[[0, 2]]) < 1e-4


def test_decode_matches_prefill_kernel():
    """A pure-decode batch through the prefill kernel gives the decode kernel's answer."""
    from nanovllm.kernels import paged_decode_attention, paged_prefill_attention
    seq_lens = [45, 3, 80]
    batch = make_paged_batch(seq_lens, [1, 1, 1], 4, 2, 32, 16)
    dec = paged_decode_attention(batch["q"], batch["k_cache"], batch["v_cache"], batch["seq_lens"],
                                 batch["block_tables"], 0.25, num_splits=2)
    pre = paged_prefill_attention(**batch, max_seqlen_q=1, scale=0.25)
    assert rel_err(dec, pre) < 1e-5


def test_rejects_bad_shapes():
    from nanovllm.kernels import paged_decode_attention
    batch = make_paged_batch([10], [1], 3, 2, 16, 16)
    with pytest.raises(ValueError, match="multiple"):
        paged_decode_attention(batch["q"], batch["k_cache"], batch["v_cache"], batch["seq_lens"],
                               batch["block_tables"], 1.0)


# ---------------------------------------------------------------- sliding window

def windowed_reference(batch, scale, window):
    return paged_attention_reference(batch["q"].float(), batch["k_cache"].float(), batch["v_cache"].float(),
                                     batch["cu_seqlens_q"], batch["seq_lens"], batch["block_tables"], scale,
                                     window=window)


SLIDING_PREFILL_CASES = {
    # name: (seq_lens, q_lens, num_heads, num_kv_heads, head_dim, block_size, window, config)
    # windows shorter than a tile, across tile edges, and longer than some sequences; rows of one
    # query tile whose windows start in different KV tiles (a row sees no key of the first tile)
    "prefill_window5": ([70, 9], [70, 9], 4, 2, 16, 16, 5, {"BLOCK_M": 32, "BLOCK_N": 16}),
    "prefill_window40": ([100, 20], [100, 20], 4, 2, 32, 16, 40, {}),
    "cached_prefix_chunk": ([120, 60], [25, 1], 4, 1, 32, 16, 33, {"BLOCK_N": 16}),
    "mixed_block64": ([128, 7, 70], [64, 1, 3], 2, 2, 16, 64, 17, {}),
}


@pytest.mark.parametrize("case", list(SLIDING_PREFILL_CASES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_paged_prefill_sliding_window(case, dtype):
    from nanovllm.kernels import paged_prefill_attention
    seq_lens, q_lens, heads, kv_heads, head_dim, block_size, window, config = SLIDING_PREFILL_CASES[case]
    batch = make_paged_batch(seq_lens, q_lens, heads, kv_heads, head_dim, block_size, dtype)
    scale = head_dim ** -0.5
    out = torch.full_like(batch["q"], float("nan"))
    paged_prefill_attention(**batch, max_seqlen_q=max(q_lens), scale=scale, out=out, window=window, config=config)
    ref = windowed_reference(batch, scale, window)
    assert rel_err(out, ref) < tolerance(dtype)
    # the window matters here: full attention differs
    assert rel_err(reference(batch, scale), ref) > 0.05


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("num_splits", [1, 4])
def test_paged_decode_sliding_window(dtype, num_splits):
    """Windows ending mid-tile, longer than the sequence, of one key; a padding slot (seq_len 0)."""
    from nanovllm.kernels import paged_decode_attention
    from nanovllm.layers.cpu_attention import paged_decode_attention_reference
    seq_lens = [128, 97, 6, 40]
    batch = make_paged_batch(seq_lens, [1] * len(seq_lens), 4, 2, 32, 16, dtype)
    scale = 32 ** -0.5
    for window, config in ((23, {}), (1, {"BLOCK_N": 16}), (100, {"BLOCK_N": 32})):
        out = torch.full_like(batch["q"], float("nan"))
        paged_decode_attention(batch["q"], batch["k_cache"], batch["v_cache"], batch["seq_lens"],
                               batch["block_tables"], scale, num_splits=num_splits, out=out, window=window,
                               config=config)
        ref = windowed_reference(batch, scale, window)
        assert rel_err(out, ref) < tolerance(dtype), window
        padded = paged_decode_attention_reference(batch["q"].float(), batch["k_cache"].float(),
                                                  batch["v_cache"].float(), batch["seq_lens"],
                                                  batch["block_tables"], scale, window=window)
        assert rel_err(padded, ref) < 1e-5, window
    lens = batch["seq_lens"].clone()
    lens[2] = 0
    out = paged_decode_attention(batch["q"], batch["k_cache"], batch["v_cache"], lens, batch["block_tables"],
                                 scale, num_splits=num_splits, window=23)
    assert torch.equal(out[2], torch.zeros_like(out[2]))


def test_sliding_window_rejects_a_window_of_zero():
    from nanovllm.kernels import paged_decode_attention, paged_prefill_attention
    batch = make_paged_batch([10], [1], 2, 2, 16, 16)
    with pytest.raises(ValueError, match="window"):
        paged_decode_attention(batch["q"], batch["k_cache"], batch["v_cache"], batch["seq_lens"],
                               batch["block_tables"], 1.0, window=0)
    with pytest.raises(ValueError, match="window"):
        paged_prefill_attention(**batch, max_seqlen_q=1, scale=1.0, window=0)
