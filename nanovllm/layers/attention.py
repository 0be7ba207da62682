"""Paged attention: the layer, the per-step metadata it reads, and the backends.

Every step, each layer first writes the new tokens' keys and values into the paged KV
cache, then attends from the new queries over the cache. Prefill, prefill with a cached
prefix, chunked prefill and decode are one computation, described by `AttentionMetadata`
(see `nanovllm/kernels/reference.py` for the exact semantics).
"""
import logging
from dataclasses import dataclass

import torch
from torch import nn

from nanovllm.kernels.reference import paged_attention_reference, paged_decode_attention_reference, \
    store_kv_cache_reference

logger = logging.getLogger(__name__)


@dataclass
class AttentionMetadata:
    slot_mapping: torch.Tensor    # [num_tokens] cache slot of each new token (-1: padding, not stored)
    cu_seqlens_q: torch.Tensor    # [num_seqs + 1] int32, where each sequence's new tokens start
    seq_lens: torch.Tensor        # [num_seqs] int32, tokens in the cache per sequence, new ones included
    block_tables: torch.Tensor    # [num_seqs, max_blocks] int32
    max_seqlen_q: int             # longest run of new tokens (1 for decode)
    is_decode: bool               # every sequence has exactly one new token


class TorchBackend:
    """The pure-torch reference: clear, device-agnostic, used on the CPU."""
    name = "torch"

    def store(self, k, v, k_cache, v_cache, meta: AttentionMetadata):
        store_kv_cache_reference(k, v, k_cache, v_cache, meta.slot_mapping)

    def attend(self, q, k_cache, v_cache, meta: AttentionMetadata, scale: float):
        if meta.is_decode:
            return paged_decode_attention_reference(q, k_cache, v_cache, meta.seq_lens, meta.block_tables, scale)
        return paged_attention_reference(q, k_cache, v_cache, meta.cu_seqlens_q, meta.seq_lens,
                                         meta.block_tables, scale)


class TritonBackend:
    """The project's own Triton kernels: varlen paged prefill and split-KV paged decode."""
    name = "triton"

    def __init__(self):
        from nanovllm import kernels
        self.k = kernels

    def store(self, k, v, k_cache, v_cache, meta: AttentionMetadata):
        self.k.store_kv_cache(k, v, k_cache, v_cache, meta.slot_mapping)

    def attend(self, q, k_cache, v_cache, meta: AttentionMetadata, scale: float):
        if meta.is_decode:
            return self.k.paged_decode_attention(q, k_cache, v_cache, meta.seq_lens, meta.block_tables, scale)
        return self.k.paged_prefill_attention(q, k_cache, v_cache, meta.cu_seqlens_q, meta.seq_lens,
                                              meta.block_tables, meta.max_seqlen_q, scale)


def select_backend(name: str, device: str):
    """"auto": Triton on CUDA when it imports, else the torch reference."""
    if name == "auto":
        name = "torch"
        if device == "cuda":
            from nanovllm.kernels import triton_available
            name = "triton" if triton_available() else "torch"
    if name == "triton":
        backend = TritonBackend()
    elif name == "torch":
        backend = TorchBackend()
    else:
        raise ValueError(f"attention backend {name!r} is not available here")
    logger.info("attention backend: %s", backend.name)
    return backend


class Attention(nn.Module):
    """Stores the new K/V in this layer's cache slice and attends over the cache.

    `k_cache`/`v_cache` ([num_blocks, block_size, num_kv_heads, head_dim]) and `backend`
    are attached by the ModelRunner once it has sized the cache.
    """

    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int, scale: float):
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim, self.scale = num_heads, num_kv_heads, head_dim, scale
        self.k_cache = self.v_cache = torch.empty(0)
        self.backend = None

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, meta: AttentionMetadata):
        """q [T, num_heads, head_dim], k/v [T, num_kv_heads, head_dim] -> [T, num_heads * head_dim]."""
        self.backend.store(k, v, self.k_cache, self.v_cache, meta)
        out = self.backend.attend(q, self.k_cache, self.v_cache, meta, self.scale)
        return out.flatten(1)
