"""Pure-torch paged attention: the ground truth the Triton kernels are tested against, and
what the engine's torch backend computes (on the CPU, in the batched form of layers/cpu_attention.py).

Layout (one layer):
    k_cache, v_cache:  [num_blocks, block_size, num_kv_heads, head_dim]
    block_tables:      [num_seqs, max_blocks_per_seq] int32, block ids of each sequence in order
    slot_mapping:      [num_tokens] int, flat slot (block_id * block_size + offset) of each new token;
                       a negative slot means "do not store" (padding in CUDA-graph batches)

A batch holds `num_seqs` sequences. Sequence b contributes `q_len_b` new query tokens
(`cu_seqlens_q[b+1] - cu_seqlens_q[b]`) and has `seq_lens[b]` tokens in the cache in total,
the new ones included, so its first `seq_lens[b] - q_len_b` tokens were cached earlier
(a prefix-cache hit, an earlier prefill chunk, or the decoded tokens so far). Query token j
of sequence b sits at position `seq_lens[b] - q_len_b + j` and attends to keys 0..that position.
Decode is the special case q_len_b == 1.

Sliding-window attention (`window=W`, Mistral, Gemma 3's local layers): the query at position p
sees only the last W keys, positions p - W + 1 .. p (transformers' and vLLM's convention).

A float8 cache (kv_cache_dtype="fp8") holds k / k_scale and v / v_scale (per-tensor scales, see
nanovllm/quantization/kv_cache.py): stores divide and saturate at +-448, reads multiply back.
"""
import torch
import torch.nn.functional as F


def store_kv_cache_reference(key: torch.Tensor, value: torch.Tensor, k_cache: torch.Tensor,
                             v_cache: torch.Tensor, slot_mapping: torch.Tensor, k_scale=None, v_scale=None) -> None:
    """Write key/value [num_tokens, num_kv_heads, head_dim] into their cache slots (divided by
    k_scale / v_scale into a float8 cache)."""
    write_kv(key, value, k_cache, v_cache, *stored_slots(slot_mapping), k_scale, v_scale)


def stored_slots(slot_mapping: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor]:
    """(which new tokens are stored, None when all are; their slots as int64)."""
    keep = slot_mapping >= 0
    if bool(keep.all()):
        return None, slot_mapping.long()
    return keep, slot_mapping[keep].long()


def write_kv(key: torch.Tensor, value: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
             keep: torch.Tensor | None, slots: torch.Tensor, k_scale=None, v_scale=None) -> None:
    if keep is not None:
        key, value = key[keep], value[keep]
    k_cache.view(-1, *k_cache.shape[2:])[slots] = _to_cache(key, k_cache, k_scale)
    v_cache.view(-1, *v_cache.shape[2:])[slots] = _to_cache(value, v_cache, v_scale)


def _to_cache(x: torch.Tensor, cache: torch.Tensor, scale) -> torch.Tensor:
    if cache.dtype != torch.float8_e4m3fn:
        return x.to(cache.dtype)
    return (x.float() / (1.0 if scale is None else scale)).clamp(-448.0, 448.0).to(cache.dtype)


def from_cache(x: torch.Tensor, scale) -> torch.Tensor:
    """Cached keys or values in float32 (a float8 cache's scaled back)."""
    return x.float() if scale is None else x.float() * scale


def gather_kv(cache: torch.Tensor, block_table: torch.Tensor, length: int) -> torch.Tensor:
    """The first `length` cached tokens of one sequence: [length, num_kv_heads, head_dim]."""
    block_size = cache.shape[1]
    num_blocks = (length + block_size - 1) // block_size
    blocks = cache.index_select(0, block_table[:num_blocks].long())          # [n, block_size, H, D]
    return blocks.flatten(0, 1)[:length]


def paged_attention_reference(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                              cu_seqlens_q: torch.Tensor, seq_lens: torch.Tensor,
                              block_tables: torch.Tensor, scale: float, window: int | None = None,
                              k_scale=None, v_scale=None) -> torch.Tensor:
    """Causal attention of q [num_tokens, num_heads, head_dim] over the paged cache.

    Handles prefill, prefill with a cached prefix, chunked prefill and decode alike,
    one sequence at a time. Grouped-query attention: query head h reads KV head
    h // (num_heads // num_kv_heads). `window`: see the module docstring (None: every key).
    Returns [num_tokens, num_heads, head_dim].
    """
    num_heads, num_kv_heads = q.shape[1], k_cache.shape[2]
    out = torch.empty_like(q)
    starts, lens = cu_seqlens_q.tolist(), seq_lens.tolist()
    for b, total in enumerate(lens):
        q_start, q_end = starts[b], starts[b + 1]
        if q_end == q_start:
            continue
        k = from_cache(gather_kv(k_cache, block_tables[b], total), k_scale)
        v = from_cache(gather_kv(v_cache, block_tables[b], total), v_scale)
        k = k.repeat_interleave(num_heads // num_kv_heads, dim=1)   # GQA: share each KV head
        v = v.repeat_interleave(num_heads // num_kv_heads, dim=1)
        q_len = q_end - q_start
        # Key i is visible to query j when i <= (total - q_len) + j.
        q_pos = torch.arange(total - q_len, total, device=q.device)[:, None]
        key_pos = torch.arange(total, device=q.device)[None, :]
        mask = key_pos <= q_pos                                          # [q_len, total]
        if window is not None:
            mask &= key_pos > q_pos - window
        o = F.scaled_dot_product_attention(
            q[q_start:q_end].transpose(0, 1).float(), k.transpose(0, 1).float(),
            v.transpose(0, 1).float(), attn_mask=mask, scale=scale)
        out[q_start:q_end] = o.transpose(0, 1).to(q.dtype)
    return out
