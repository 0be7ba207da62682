"""Paged attention: the layer, the per-step metadata it reads, and the torch backend (the
Triton and flash-attn ones are in attention_backends.py).

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

from nanovllm.kernels.reference import decode_attention, decode_reads, paged_attention_reference, stored_slots, \
    write_kv
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


class TorchBackend:
    """The pure-torch reference: clear, device-agnostic, used on the CPU. There, what every
    layer derives alike from a step's metadata (the slots written; in decode, the blocks read
    and the mask) the first layer computes and the others reuse, keyed by the metadata object
    (each eager step builds its own): a small model's CPU step is mostly such small ops. Not on
    a GPU, where a CUDA graph must capture all of it."""
    name = "torch"

    def __init__(self):
        self.meta, self.derived = None, {}

    def _derived(self, meta: AttentionMetadata, key, compute):
        if not meta.slot_mapping.is_cpu:
            return compute()
        if meta is not self.meta:
            self.meta, self.derived = meta, {}
        if key not in self.derived:
            self.derived[key] = compute()
        return self.derived[key]

    def store(self, k, v, k_cache, v_cache, meta: AttentionMetadata):
        write_kv(k, v, k_cache, v_cache, *self._derived(meta, "slots", lambda: stored_slots(meta.slot_mapping)))

    def attend(self, q, k_cache, v_cache, meta: AttentionMetadata, scale: float, window: int | None = None):
        if meta.is_decode:
            blocks, visible = self._derived(meta, ("reads", window), lambda: decode_reads(
                meta.seq_lens, meta.block_tables, k_cache.shape[1], window))
            return decode_attention(q, k_cache, v_cache, blocks, visible, scale)
        # A mixed step: its one-token spans (the decodes, most of its sequences) attend batched as
        # in decode; only the longer ones go one by one (a Python loop turn each, per layer).
        single, rows, longer = self._derived(meta, "spans", lambda: _split_spans(meta.cu_seqlens_q))
        if len(single) == 0:
            return paged_attention_reference(q, k_cache, v_cache, meta.cu_seqlens_q, meta.seq_lens,
                                             meta.block_tables, scale, window=window)
        blocks, visible = self._derived(meta, ("reads", window), lambda: decode_reads(
            meta.seq_lens[single], meta.block_tables[single], k_cache.shape[1], window))
        out = torch.empty_like(q)
        out[rows] = decode_attention(q[rows], k_cache, v_cache, blocks, visible, scale)
        for b, start, end in longer:
            out[start:end] = paged_attention_reference(
                q[start:end], k_cache, v_cache, meta.cu_seqlens_q.new_tensor([0, end - start]),
                meta.seq_lens[b:b + 1], meta.block_tables[b:b + 1], scale, window=window)
        return out


def _split_spans(cu_seqlens_q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, list[tuple[int, int, int]]]:
    """(the sequences whose span is one token, those tokens' rows, [(sequence, first, end token)
    of the longer spans])."""
    starts = cu_seqlens_q.tolist()
    spans = [(b, start, end) for b, (start, end) in enumerate(zip(starts, starts[1:]))]
    single = [b for b, start, end in spans if end - start == 1]
    single = cu_seqlens_q.new_tensor(single).long()
    return single, cu_seqlens_q[single].long(), [span for span in spans if span[2] - span[1] > 1]


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
