"""The torch backend as the engine runs it (on a CPU, mostly): the reference's result with far
fewer torch ops per step.

* Decodes (spans of one token) attend all at once: each sequence's blocks are gathered into one
  padded [batch, longest, ...] tensor and masked, one SDPA call for the batch, where the
  reference loops over the sequences. A lone sequence whose blocks are consecutive (usual for
  one request) reads a view of the cache: no copy and no mask.
* A mixed step's one-token spans go that way too; only its longer spans go one by one.
* What every layer derives alike from a step's metadata (the slots written; the blocks read and
  the mask) the first layer computes and the others reuse, keyed by the metadata object (each
  eager step builds its own): a small model's CPU step is mostly such small ops. Not on a GPU,
  where a CUDA graph must capture all of it.
"""
import torch
import torch.nn.functional as F

from nanovllm.kernels.reference import from_cache, paged_attention_reference, stored_slots, write_kv
from nanovllm.layers.attention import AttentionMetadata, TorchBackend


class BatchedTorchBackend(TorchBackend):
    """TorchBackend's computation, batched: what `attention_backend="torch"` (the CPU's) runs."""

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
        single, rows, longer = self._derived(meta, "spans", lambda: _split_spans(meta.cu_seqlens_q))
        if len(single) == 0:
            return super().attend(q, k_cache, v_cache, meta, scale, window)
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


def paged_decode_attention_reference(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                                     seq_lens: torch.Tensor, block_tables: torch.Tensor,
                                     scale: float, window: int | None = None, k_scale=None, v_scale=None
                                     ) -> torch.Tensor:
    """Decode (one query token per sequence), all sequences at once. Same result as
    `paged_attention_reference` with cu_seqlens_q = arange(batch + 1); far fewer ops."""
    blocks, visible = decode_reads(seq_lens, block_tables, k_cache.shape[1], window)
    return decode_attention(q, k_cache, v_cache, blocks, visible, scale, k_scale, v_scale)


def decode_reads(seq_lens: torch.Tensor, block_tables: torch.Tensor, block_size: int, window: int | None = None):
    """What a decode step reads of a layer's cache: each sequence's blocks up to the longest
    (flat, int64) and which of those gathered keys each query sees ([batch, 1, 1, keys]).
    A lone sequence on a CPU whose blocks are consecutive reads (a slice of the cache's token
    slots, None): a view, with no copy and no mask."""
    if len(seq_lens) == 1 and seq_lens.is_cpu:
        length = int(seq_lens[0])
        ids = block_tables[0, :-(-length // block_size)].tolist()
        if ids == list(range(ids[0], ids[0] + len(ids))):
            first = ids[0] * block_size
            return slice(first + max(0, length - (window or length)), first + length), None
    num_blocks = -(-int(seq_lens.max()) // block_size)
    blocks = block_tables[:, :num_blocks].reshape(-1).long()
    key_pos = torch.arange(num_blocks * block_size, device=seq_lens.device)[None, :]
    visible = key_pos < seq_lens[:, None]
    if window is not None:
        visible &= key_pos >= seq_lens[:, None] - window
    return blocks, visible[:, None, None, :]


def decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, blocks, visible,
                     scale: float, k_scale=None, v_scale=None) -> torch.Tensor:
    """q [batch, Hq, D] over the gathered `blocks` (see decode_reads) -> [batch, Hq, D]."""
    batch = q.shape[0]
    if isinstance(blocks, slice):      # one sequence's tokens, consecutive in the cache
        k, v = (c.flatten(0, 1)[blocks].unsqueeze(0) for c in (k_cache, v_cache))
    else:   # index_select copies whole blocks several times faster than advanced indexing (on a CPU)
        k = k_cache.index_select(0, blocks).view(batch, -1, *k_cache.shape[2:])
        v = v_cache.index_select(0, blocks).view(batch, -1, *v_cache.shape[2:])
    k, v = from_cache(k, k_scale), from_cache(v, v_scale)
    out = F.scaled_dot_product_attention(
        q.unsqueeze(2).float(), k.transpose(1, 2).float(), v.transpose(1, 2).float(),
        attn_mask=visible, scale=scale, enable_gqa=True)   # [batch, Hq, 1, D]
    return out.squeeze(2).to(q.dtype)
