"""Paged attention: the layer, the per-step metadata it reads, and the backends.

Every step, each layer first writes the new tokens' keys and values into the paged KV
cache, then attends from the new queries over the cache. Prefill, prefill with a cached
prefix, chunked prefill and decode are one computation, described by `AttentionMetadata`
(see `nanovllm/kernels/reference.py` for the exact semantics). A layer with a sliding window
(`Attention(..., sliding_window=W)`) lets each query see only the last W keys; it is a property
of the layer, not of the step, so every backend gets it with the layer's call.
"""
import logging
from dataclasses import dataclass

import torch
from torch import nn

from nanovllm.kernels.reference import paged_attention_reference, paged_decode_attention_reference, \
    store_kv_cache_reference
from nanovllm.quantization.kv_cache import quantize_fp8, update_scales_from_first_batch

logger = logging.getLogger(__name__)


@dataclass
class AttentionMetadata:
    slot_mapping: torch.Tensor    # [num_tokens] cache slot of each new token (-1: padding, not stored)
    cu_seqlens_q: torch.Tensor    # [num_seqs + 1] int32, where each sequence's new tokens start
    seq_lens: torch.Tensor        # [num_seqs] int32, tokens in the cache per sequence, new ones included
    block_tables: torch.Tensor    # [num_seqs, max_blocks] int32
    max_seqlen_q: int             # longest run of new tokens (1 for decode)
    max_seqlen_k: int             # longest sequence (host int, for flash-attn's varlen call)
    is_decode: bool               # every sequence has exactly one new token


class TorchBackend:
    """The pure-torch reference: clear, device-agnostic, used on the CPU."""
    name = "torch"

    def store(self, k, v, k_cache, v_cache, meta: AttentionMetadata):
        store_kv_cache_reference(k, v, k_cache, v_cache, meta.slot_mapping)

    def attend(self, q, k_cache, v_cache, meta: AttentionMetadata, scale: float, window: int | None = None):
        if meta.is_decode:
            return paged_decode_attention_reference(q, k_cache, v_cache, meta.seq_lens, meta.block_tables, scale,
                                                    window=window)
        return paged_attention_reference(q, k_cache, v_cache, meta.cu_seqlens_q, meta.seq_lens,
                                         meta.block_tables, scale, window=window)


class TritonBackend:
    """The project's own Triton kernels: varlen paged prefill and split-KV paged decode."""
    name = "triton"

    def __init__(self):
        from nanovllm import kernels
        self.k = kernels

    def store(self, k, v, k_cache, v_cache, meta: AttentionMetadata, **kv_scales):
        self.k.store_kv_cache(k, v, k_cache, v_cache, meta.slot_mapping, **kv_scales)

    def attend(self, q, k_cache, v_cache, meta: AttentionMetadata, scale: float, window: int | None = None,
               **kv_scales):
        if meta.is_decode:
            return self.k.paged_decode_attention(q, k_cache, v_cache, meta.seq_lens, meta.block_tables, scale,
                                                 window=window, **kv_scales)
        return self.k.paged_prefill_attention(q, k_cache, v_cache, meta.cu_seqlens_q, meta.seq_lens,
                                              meta.block_tables, meta.max_seqlen_q, scale, window=window,
                                              **kv_scales)


class FlashAttnBackend:
    """flash-attn's paged kernels, when the package is installed. Its paged KV cache needs
    blocks of a multiple of 256 tokens; stores go through our Triton kernel."""
    name = "flash_attn"

    def __init__(self):
        import flash_attn
        from nanovllm import kernels
        self.fa, self.store_kv_cache = flash_attn, kernels.store_kv_cache

    def store(self, k, v, k_cache, v_cache, meta: AttentionMetadata):
        self.store_kv_cache(k, v, k_cache, v_cache, meta.slot_mapping)

    def attend(self, q, k_cache, v_cache, meta: AttentionMetadata, scale: float, window: int | None = None):
        # flash-attn's window counts the keys left of the query's own: W - 1 of them
        sliding = {} if window is None else {"window_size": (window - 1, 0)}
        if meta.is_decode:
            return self.fa.flash_attn_with_kvcache(
                q.unsqueeze(1), k_cache, v_cache, cache_seqlens=meta.seq_lens, block_table=meta.block_tables,
                softmax_scale=scale, causal=True, **sliding).squeeze(1)
        cu_seqlens_k = torch.nn.functional.pad(meta.seq_lens.cumsum(0, dtype=torch.int32), (1, 0))
        # causal=True aligns the mask to the bottom right: query j of a sequence with a cached
        # prefix sees the prefix and the new tokens up to itself, as in our reference.
        return self.fa.flash_attn_varlen_func(
            q, k_cache, v_cache, cu_seqlens_q=meta.cu_seqlens_q, cu_seqlens_k=cu_seqlens_k,
            max_seqlen_q=meta.max_seqlen_q, max_seqlen_k=meta.max_seqlen_k, softmax_scale=scale,
            causal=True, block_table=meta.block_tables, **sliding)


def flash_attn_available() -> bool:
    try:
        import flash_attn  # noqa: F401
        return True
    except Exception:     # not installed, or built for another torch/CUDA
        return False


def select_backend(name: str, device: str, block_size: int):
    """"auto": flash-attn on CUDA when it is installed and the block size suits it, else the
    Triton kernels; the torch reference on the CPU."""
    if name == "auto":
        name = "torch"
        if device == "cuda":
            from nanovllm.kernels import triton_available
            if flash_attn_available() and block_size % 256 == 0:
                name = "flash_attn"
            elif triton_available():
                name = "triton"
    if name == "flash_attn":
        if not flash_attn_available():
            raise ValueError("attention_backend='flash_attn' but the flash_attn package cannot be imported.")
        if block_size % 256:
            raise ValueError(f"attention_backend='flash_attn' needs block_size to be a multiple of 256 "
                             f"(flash-attn's paged KV cache), got {block_size}.")
        backend = FlashAttnBackend()
    elif name == "triton":
        backend = TritonBackend()
    else:
        backend = TorchBackend()
    logger.info("attention backend: %s", backend.name)
    return backend


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
        if self.k_scale is not None:
            return self._forward_fp8(q, k, v, meta)
        self.backend.store(k, v, self.k_cache, self.v_cache, meta)
        out = self.backend.attend(q, self.k_cache, self.v_cache, meta, self.scale, self.sliding_window)
        return out.flatten(1)

    def _forward_fp8(self, q, k, v, meta: AttentionMetadata):
        """A float8 cache: the Triton kernels divide by the scales when storing and multiply when
        reading, in registers. Any other backend stores keys and values already in float8 and
        attends with the scales around it: q * k_scale against the cached k / k_scale gives the
        same scores, and the output is linear in v."""
        if self.kv_scales_pending is not None:     # calculate_kv_scales: from the first batch
            update_scales_from_first_batch(k, v, meta.slot_mapping, self.k_scale, self.v_scale,
                                           self.kv_scales_pending)
        if self.backend.name == "triton":
            scales = {"k_scale": self.k_scale, "v_scale": self.v_scale}
            self.backend.store(k, v, self.k_cache, self.v_cache, meta, **scales)
            out = self.backend.attend(q, self.k_cache, self.v_cache, meta, self.scale, self.sliding_window, **scales)
            return out.flatten(1)
        self.backend.store(quantize_fp8(k, self.k_scale), quantize_fp8(v, self.v_scale), self.k_cache, self.v_cache,
                           meta)
        out = self.backend.attend((q.float() * self.k_scale).to(q.dtype), self.k_cache, self.v_cache, meta,
                                  self.scale, self.sliding_window)
        return (out.float() * self.v_scale).to(out.dtype).flatten(1)
