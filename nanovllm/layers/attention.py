"""Paged attention: the layer, the per-step metadata it reads, and the torch backend (its
batched form is in cpu_attention.py, the Triton and flash-attn ones in attention_backends.py).

Every step, each layer first writes the new tokens' keys and values into the paged KV
cache, then attends from the new queries over the cache. Prefill, prefill with a cached
prefix, chunked prefill and decode are one computation, described by `AttentionMetadata`
(see `nanovllm/kernels/reference.py` for the exact semantics). A layer with a sliding window
(`Attention(..., sliding_window=W)`) lets each query see only the last W keys; it is a property
of the layer, not of the step, so every backend gets it with the layer's call.
"""
from dataclasses import dataclass

import torch
from torch import nn

from nanovllm.kernels.reference import paged_attention_reference, store_kv_cache_reference
from nanovllm.quantization.kv_cache import attend_fp8


@dataclass
class AttentionMetadata:
    slot_mapping: torch.Tensor    # [num_tokens] cache slot of each new token (-1: padding, not stored)
    cu_seqlens_q: torch.Tensor    # [num_seqs + 1] int32, where each sequence's new tokens start
    seq_lens: torch.Tensor        # [num_seqs] int32, tokens in the cache per sequence, new ones included
    block_tables: torch.Tensor    # [num_seqs, max_blocks] int32
    max_seqlen_q: int             # longest run of new tokens (1 for decode)
    max_seqlen_k: int             # longest sequence (host int, for flash-attn's varlen call)
    is_decode: bool               # every row (a sequence, or a token of a short span) has one new token
    # (sequence, first token, end token) of each long prompt with no cached context: all its keys are
    # new in this step, so a backend may attend it from them alone (TritonBackend: cuDNN's kernel)
    fresh_spans: tuple = ()


class TorchBackend:
    """The pure-torch reference: clear, device-agnostic, one sequence at a time. The engine runs
    its batched form, layers/cpu_attention.py's BatchedTorchBackend: the same result in far
    fewer torch ops."""
    name = "torch"

    def store(self, k, v, k_cache, v_cache, meta: AttentionMetadata):
        store_kv_cache_reference(k, v, k_cache, v_cache, meta.slot_mapping)

    def attend(self, q, k_cache, v_cache, meta: AttentionMetadata, scale: float, window: int | None = None):
        return paged_attention_reference(q, k_cache, v_cache, meta.cu_seqlens_q, meta.seq_lens,
                                         meta.block_tables, scale, window=window)


class Attention(nn.Module):
    """Stores the new K/V in this layer's cache slice and attends over the cache.

    `k_cache`/`v_cache` ([num_blocks, block_size, num_kv_heads, head_dim]) and `backend`
    are attached by the ModelRunner once it has sized the cache, with, for a float8 cache, the
    per-tensor `k_scale`/`v_scale` (nanovllm/quantization/kv_cache.py). `sliding_window`: this
    layer's queries see only the last `sliding_window` keys (None: all of them).
    """

    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int, scale: float,
                 sliding_window: int | None = None):
        super().__init__()
        if sliding_window is not None and (not isinstance(sliding_window, int) or sliding_window < 1):
            raise ValueError(f"sliding_window must be a positive integer or None, got {sliding_window!r}.")
        self.num_heads, self.num_kv_heads, self.head_dim, self.scale = num_heads, num_kv_heads, head_dim, scale
        self.sliding_window = sliding_window
        self.k_cache = self.v_cache = torch.empty(0)
        self.backend = None
        self.k_scale = self.v_scale = self.kv_scales_pending = None

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, meta: AttentionMetadata):
        """q [T, num_heads, head_dim], k/v [T, num_kv_heads, head_dim] -> [T, num_heads * head_dim]."""
        if self.k_scale is not None:                # a float8 cache
            return attend_fp8(self, q, k, v, meta)
        self.backend.store(k, v, self.k_cache, self.v_cache, meta)
        out = self.backend.attend(q, self.k_cache, self.v_cache, meta, self.scale, self.sliding_window)
        return out.flatten(1)
