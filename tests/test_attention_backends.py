"""Attention backend choice, and the flash-attn backend's plumbing (against a stand-in module
that implements flash-attn's documented paged API with our reference: no GPU here)."""
import sys
import types

import pytest
import torch

from nanovllm import LLM, SamplingParams
from nanovllm.kernels.reference import paged_attention_reference
from nanovllm.layers.attention_backends import FlashAttnBackend, select_backend
from nanovllm.layers.cpu_attention import BatchedTorchBackend
from tests.conftest import KERNEL_DEVICE, hf_greedy, random_prompts


def _fake_flash_attn() -> types.ModuleType:
    fa = types.ModuleType("flash_attn")

    def flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                               softmax_scale=None, causal=False, block_table=None):
        assert causal and block_table is not None and k.shape[1] % 256 == 0
        seq_lens = cu_seqlens_k[1:] - cu_seqlens_k[:-1]
        assert max_seqlen_k == int(seq_lens.max()) and max_seqlen_q == int((cu_seqlens_q[1:] - cu_seqlens_q[:-1]).max())
        return paged_attention_reference(q, k, v, cu_seqlens_q, seq_lens, block_table, softmax_scale)

    def flash_attn_with_kvcache(q, k_cache, v_cache, cache_seqlens=None, block_table=None,
                                softmax_scale=None, causal=False):
        assert causal and q.dim() == 4 and q.shape[1] == 1
        cu = torch.arange(q.shape[0] + 1, dtype=torch.int32, device=q.device)
        out = paged_attention_reference(q[:, 0], k_cache, v_cache, cu, cache_seqlens, block_table, softmax_scale)
        return out.unsqueeze(1)

    fa.flash_attn_varlen_func, fa.flash_attn_with_kvcache = flash_attn_varlen_func, flash_attn_with_kvcache
    return fa


def test_selection(monkeypatch):
    assert isinstance(select_backend("auto", "cpu", 16), BatchedTorchBackend)
    with pytest.raises(ValueError, match="flash_attn"):
        select_backend("flash_attn", "cpu", 256)          # not installed here
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(ValueError, match="TRITON_INTERPRET"):
        select_backend("triton", "cpu", 16)               # Triton runs on a CPU only in its interpreter
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setitem(sys.modules, "flash_attn", _fake_flash_attn())
    with pytest.raises(ValueError, match="block_size.*256"):
        select_backend("flash_attn", "cpu", 16)
    assert isinstance(select_backend("flash_attn", "cpu", 256), FlashAttnBackend)


@pytest.mark.slow
def test_flash_attn_backend_gives_the_same_tokens(monkeypatch, tiny_qwen3):
    from nanovllm.kernels import triton_available
    if not triton_available():
        pytest.skip("the flash-attn backend stores K/V with the Triton kernel")
    monkeypatch.setitem(sys.modules, "flash_attn", _fake_flash_attn())
    prompts = random_prompts(3, 5, 300, seed=8)
    llm = LLM(tiny_qwen3, device=KERNEL_DEVICE, dtype="float32", attention_backend="flash_attn", block_size=256,
              enforce_eager=True)       # the stand-in reads lengths on the host: no graph capture
    outs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=4), use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outs] == hf_greedy(tiny_qwen3, prompts, 4)


def test_torch_backend_reuses_a_steps_indices_across_layers_and_windows():
    """BatchedTorchBackend computes the slots and, in decode, the blocks and mask once per step (per
    window) and reuses them in the other layers: every layer's result equals the reference's
    computed afresh, also with padded slots (-1), and a new step's metadata is not confused
    with the last one's."""
    from nanovllm.kernels.reference import store_kv_cache_reference
    from nanovllm.layers.cpu_attention import paged_decode_attention_reference
    from nanovllm.layers.attention import AttentionMetadata
    gen = torch.Generator().manual_seed(0)
    num_blocks, block_size, heads, kv_heads, dim = 12, 4, 4, 2, 8
    backend = BatchedTorchBackend()
    layers = [torch.zeros(2, num_blocks, block_size, kv_heads, dim) for _ in range(3)]
    reference = [c.clone() for c in layers]
    tables = torch.tensor([[3, 7, 1], [0, 5, 9]], dtype=torch.int32)
    for step, lens in enumerate(([9, 5], [10, 6])):
        seq_lens = torch.tensor(lens, dtype=torch.int32)
        slots = [int(tables[b, (n - 1) // block_size]) * block_size + (n - 1) % block_size for b, n in enumerate(lens)]
        slot_mapping = torch.tensor(slots + [-1])                       # one padded token, not stored
        meta = AttentionMetadata(slot_mapping, torch.arange(3, dtype=torch.int32), seq_lens, tables, 1, max(lens),
                                 is_decode=True)
        for layer, (cache, ref_cache) in enumerate(zip(layers, reference)):
            k, v = (torch.randn(3, kv_heads, dim, generator=gen) for _ in range(2))
            q = torch.randn(2, heads, dim, generator=gen)
            window = (None, 3, None)[layer]
            backend.store(k, v, cache[0], cache[1], meta)
            got = backend.attend(q, cache[0], cache[1], meta, 0.5, window)
            store_kv_cache_reference(k, v, ref_cache[0], ref_cache[1], slot_mapping)
            want = paged_decode_attention_reference(q, ref_cache[0], ref_cache[1], seq_lens, tables, 0.5, window)
            assert torch.equal(cache, ref_cache), (step, layer)
            torch.testing.assert_close(got, want, rtol=0, atol=0)


@pytest.mark.parametrize("window", [None, 5])
@pytest.mark.parametrize("decodes", [True, False])
def test_torch_backend_mixed_step_matches_the_reference(window, decodes):
    """A mixed step (decodes, prompt chunks with and without a cached prefix, in any order; or
    prompt chunks only): the one-token spans attend batched, the others one by one; every row
    equals the per-sequence reference's. Run twice with the same metadata, as two layers would
    (the second reuses what the first derived)."""
    from nanovllm.layers.attention import AttentionMetadata
    gen = torch.Generator().manual_seed(1)
    num_blocks, block_size, heads, kv_heads, dim = 24, 4, 4, 2, 8
    spans = [(1, 9), (6, 6), (1, 3), (3, 11), (1, 14), (1, 1)]        # (new tokens, tokens in the cache)
    if not decodes:
        spans = [(n + 1, total + 1) if n == 1 else (n, total) for n, total in spans]
    tables = torch.arange(num_blocks, dtype=torch.int32)[torch.randperm(num_blocks, generator=gen)].view(6, -1)[:, :4]
    cu = torch.tensor([0] + [sum(n for n, _ in spans[:i + 1]) for i in range(len(spans))], dtype=torch.int32)
    seq_lens = torch.tensor([total for _, total in spans], dtype=torch.int32)
    meta = AttentionMetadata(torch.zeros(int(cu[-1]), dtype=torch.int64), cu, seq_lens, tables, 6, 14, is_decode=False)
    k_cache, v_cache = (torch.randn(num_blocks, block_size, kv_heads, dim, generator=gen) for _ in range(2))
    backend = BatchedTorchBackend()
    for _ in range(2):
        q = torch.randn(int(cu[-1]), heads, dim, generator=gen)
        got = backend.attend(q, k_cache, v_cache, meta, 0.3, window)
        want = paged_attention_reference(q, k_cache, v_cache, cu, seq_lens, tables, 0.3, window=window)
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
