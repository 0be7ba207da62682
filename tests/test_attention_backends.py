"""Attention backend choice, and the flash-attn backend's plumbing (against a stand-in module
that implements flash-attn's documented paged API with our reference: no GPU here)."""
import sys
import types

import pytest
import torch

from nanovllm import LLM, SamplingParams
from nanovllm.kernels.reference import paged_attention_reference
from nanovllm.layers.attention import TorchBackend
from nanovllm.layers.attention_backends import FlashAttnBackend, select_backend
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
    assert isinstance(select_backend("auto", "cpu", 16), TorchBackend)
    with pytest.raises(ValueError, match="flash_attn"):
        select_backend("flash_attn", "cpu", 256)          # not installed here
    monkeypatch.setitem(sys.modules, "flash_attn", _fake_flash_attn())
    with pytest.raises(ValueError, match="block_size.*256"):
        select_backend("flash_attn", "cpu", 16)
    assert isinstance(select_backend("flash_attn", "cpu", 256), FlashAttnBackend)


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
