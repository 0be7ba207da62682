"""A scheduled batch -> the tensors of one forward pass (`ModelInputs`).

Tokens of all the batch's sequences are laid out one after another (no padding): flat
token ids and positions, the cache slot each new token's K/V goes to, and the attention
metadata (query offsets, sequence lengths, block tables). A decode step, one token per
sequence, is the common case and runs every step at the full batch, so it has its own lean
path; prefill steps (chunks, cached prefixes, prompt logprobs) take the general one.
"""
from dataclasses import dataclass

import numpy as np
import torch

from nanovllm.engine.scheduler import ScheduledBatch
from nanovllm.layers.attention import AttentionMetadata
from nanovllm.layers.sampling_metadata import to_device


@dataclass
class ModelInputs:
    """Everything one forward pass needs, as tensors (what rank 0 sends to the other ranks)."""
    input_ids: torch.Tensor       # [T]
    positions: torch.Tensor       # [T]
    meta: AttentionMetadata
    logits_indices: torch.Tensor  # [N] rows of the hidden states whose logits are needed


def wants_prompt_logprobs(seq, chunk_start: int) -> bool:
    """Does this chunk of seq need logits for its prompt tokens? (Only the first of n
    completions reports them: the prompt is the same.)"""
    return seq.params.prompt_logprobs is not None and seq.index == 0 and chunk_start < seq.num_prompt_tokens


def prepare_inputs(batch: ScheduledBatch, block_size: int, device: torch.device,
                   input_ids: torch.Tensor | None = None) -> ModelInputs:
    """With `input_ids` given (a decode step launched ahead, its tokens still being sampled
    on the device), each sequence computes the position after its newest known token."""
    if not batch.is_prefill:
        return _prepare_decode(batch, block_size, device, input_ids)
    ids, positions, slots, cu_q, seq_lens, logits_indices = [], [], [], [0], [], []
    for i, (seq, n) in enumerate(zip(batch.seqs, batch.num_new_tokens)):
        start = seq.num_computed_tokens
        end = start + n
        ids += seq.token_ids[start:end]
        positions += range(start, end)
        table = seq.block_table
        slots += [table[p // block_size] * block_size + p % block_size for p in range(start, end)]
        if wants_prompt_logprobs(seq, start):
            logits_indices += range(cu_q[-1], cu_q[-1] + n - batch.samples[i])
        if batch.samples[i]:
            logits_indices.append(cu_q[-1] + n - 1)
        cu_q.append(cu_q[-1] + n)
        seq_lens.append(end)
    return to_tensors(ids, positions, slots, cu_q, seq_lens, [seq.block_table for seq in batch.seqs],
                      max(batch.num_new_tokens), False, logits_indices, device)


def _prepare_decode(batch: ScheduledBatch, block_size: int, device: torch.device,
                    input_ids: torch.Tensor | None) -> ModelInputs:
    seqs, ahead = batch.seqs, int(input_ids is not None)
    positions = [seq.num_computed_tokens + ahead for seq in seqs]
    slots = [seq.block_table[p // block_size] * block_size + p % block_size for seq, p in zip(seqs, positions)]
    if input_ids is None:
        input_ids = [seq.token_ids[p] for seq, p in zip(seqs, positions)]
    n = len(seqs)
    return to_tensors(input_ids, positions, slots, range(n + 1), [p + 1 for p in positions],
                      [seq.block_table for seq in seqs], 1, True, range(n), device)


def to_tensors(input_ids, positions, slots, cu_q, seq_lens, block_tables, max_q: int, is_decode: bool,
               logits_indices, device: torch.device) -> ModelInputs:
    """Lists (or a tensor already on the device, for input_ids) -> ModelInputs on `device`."""
    tables = np.zeros((len(block_tables), max(map(len, block_tables))), dtype=np.int32)
    for row, table in zip(tables, block_tables):      # far faster than torch.tensor(nested lists)
        row[:len(table)] = table

    def as_tensor(values, dtype):
        if isinstance(values, torch.Tensor):      # already on the device (a pipelined step's inputs)
            return values
        host = torch.from_numpy(values) if isinstance(values, np.ndarray) else torch.tensor(values, dtype=dtype)
        return to_device(host, device)

    meta = AttentionMetadata(
        slot_mapping=as_tensor(slots, torch.int64), cu_seqlens_q=as_tensor(cu_q, torch.int32),
        seq_lens=as_tensor(seq_lens, torch.int32), block_tables=as_tensor(tables, torch.int32),
        max_seqlen_q=max_q, max_seqlen_k=max(seq_lens), is_decode=is_decode)
    return ModelInputs(as_tensor(input_ids, torch.int64), as_tensor(positions, torch.int64), meta,
                       as_tensor(logits_indices, torch.int64))
