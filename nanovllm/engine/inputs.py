"""A scheduled batch -> the tensors of one forward pass (`ModelInputs`), and which rows of
its logits are for what (`LogitsRows`).

Tokens of all the batch's sequences are laid out one after another (no padding): flat
token ids and positions, the cache slot each new token's K/V goes to, and the attention
metadata (query offsets, sequence lengths, block tables). Decodes (spans of one token),
prompt chunks and mixes of both take the same path; the per-token arithmetic is numpy's.
"""
import itertools
from dataclasses import dataclass

import numpy as np
import torch

from nanovllm.engine.logprob_rows import rows_with_prompt_logprobs, wants_prompt_logprobs
from nanovllm.engine.scheduler import ScheduledBatch
from nanovllm.layers.attention import AttentionMetadata
from nanovllm.layers.attention_backends import fresh_spans
from nanovllm.device_copy import to_device


# A step of short spans (a verifying step of speculation: k + 1 tokens a sequence) runs as one-token
# rows, each reading its sequence's cache again: cheaper than the varlen kernel only while few.
ROWS_MAX_SPAN = 8
ROWS_MAX_TOKENS = 32


@dataclass
class ModelInputs:
    """Everything one forward pass needs, as tensors (what rank 0 sends to the other ranks)."""
    input_ids: torch.Tensor       # [T]
    positions: torch.Tensor       # [T]
    meta: AttentionMetadata
    logits_indices: torch.Tensor  # [N] rows of the hidden states whose logits are needed
    staged: bool = False          # already in a CUDA graph's input buffers (StepGraphs.stage)


@dataclass
class LogitsRows:
    """The step's logits have a row per token offset in `indices`: first, for a sequence that
    asked for prompt logprobs, one per prompt token of its chunk (the logits predicting the
    next prompt token), then one for each sequence that samples."""
    indices: list[int]                          # token offsets in the flat batch
    sample_rows: list[int] | None               # the rows that sample; None: every row, in order
    prompt_rows: dict[int, tuple[int, int]]     # index in the batch -> (first row, count)


def plan_logits_rows(batch: ScheduledBatch) -> LogitsRows:
    """A row for the last token of each span that samples; a chunk that reports prompt logprobs
    adds rows before it (engine/logprob_rows.py)."""
    if batch.is_decode:
        return LogitsRows(list(range(len(batch.seqs))), None, {})
    if any(wants_prompt_logprobs(seq, start) for seq, start in zip(batch.seqs, batch.starts)):
        indices, first_rows, prompt_rows = rows_with_prompt_logprobs(batch)
        return LogitsRows(indices, None if len(first_rows) == len(indices) else list(first_rows.values()), prompt_rows)
    ends = itertools.accumulate(batch.num_new_tokens)
    return LogitsRows([end - 1 for end, samples in zip(ends, batch.samples) if samples], None, {})


@dataclass
class HostInputs:
    """A step's inputs as numpy arrays on the host: what `to(device)` turns into ModelInputs, or
    a CUDA graph's input buffers take in one copy (StepGraphs.stage)."""
    input_ids: np.ndarray        # [T] int64
    positions: np.ndarray        # [T] int64
    slot_mapping: np.ndarray     # [T] int64
    cu_seqlens_q: np.ndarray     # [S + 1] int32
    seq_lens: np.ndarray         # [S] int32
    block_tables: np.ndarray     # [S, width] int32
    max_seqlen_q: int
    is_decode: bool
    logits_indices: np.ndarray   # [N] int64

    def to(self, device: torch.device) -> ModelInputs:
        def as_tensor(values):
            return to_device(torch.from_numpy(values), device)
        meta = AttentionMetadata(
            slot_mapping=as_tensor(self.slot_mapping), cu_seqlens_q=as_tensor(self.cu_seqlens_q),
            seq_lens=as_tensor(self.seq_lens), block_tables=as_tensor(self.block_tables),
            max_seqlen_q=self.max_seqlen_q, max_seqlen_k=int(np.max(self.seq_lens, initial=0)),
            is_decode=self.is_decode, fresh_spans=fresh_spans(self))
        return ModelInputs(as_tensor(self.input_ids), as_tensor(self.positions), meta, as_tensor(self.logits_indices))


def host_inputs(input_ids, positions, slots, cu_q, seq_lens, tables, max_q: int, is_decode: bool, logits_indices
                ) -> HostInputs:
    """HostInputs from lists or arrays, each in its dtype."""
    def array(values, dtype):
        return np.ascontiguousarray(values, dtype=dtype)
    return HostInputs(array(input_ids, np.int64), array(positions, np.int64), array(slots, np.int64),
                      array(cu_q, np.int32), array(seq_lens, np.int32), array(tables, np.int32), max_q, is_decode,
                      array(logits_indices, np.int64))


def prepare_inputs(batch: ScheduledBatch, block_size: int, logits_indices: list[int]) -> HostInputs:
    """The batch's inputs. A sequence whose first input is still on the device (`from_device`)
    gets a placeholder id, which the runner overwrites on the device."""
    counts = np.array(batch.num_new_tokens, dtype=np.int64)
    starts = np.array(batch.starts, dtype=np.int64)
    cu_q = np.zeros(len(counts) + 1, dtype=np.int32)
    np.cumsum(counts, out=cu_q[1:])
    ids = []
    for i, (seq, start, n) in enumerate(zip(batch.seqs, batch.starts, batch.num_new_tokens)):
        chunk = seq.token_ids[start:start + n]
        ids += chunk
        if len(chunk) < n:       # proposed tokens to verify (speculation), else the token in flight
            ids += batch.proposed[i] if batch.proposed and batch.proposed[i] else [0] * (n - len(chunk))
    tables = block_table_array([seq.block_table_row() for seq in batch.seqs])
    seq_of_token = np.repeat(np.arange(len(counts)), counts)
    positions = np.arange(int(cu_q[-1])) + np.repeat(starts - cu_q[:-1], counts)
    slots = tables[seq_of_token, positions // block_size].astype(np.int64) * block_size + positions % block_size
    seq_lens = (starts + counts).astype(np.int32)
    if not batch.is_decode and counts.max() <= ROWS_MAX_SPAN and cu_q[-1] <= ROWS_MAX_TOKENS:
        # Every token its own one-token row, over its sequence's cache up to itself: the decode
        # kernel and graphs then run the step (speculation's verifying steps at small batches).
        rows = np.arange(len(ids) + 1, dtype=np.int32)
        return host_inputs(ids, positions, slots, rows, positions + 1, tables[seq_of_token], 1, True, logits_indices)
    return host_inputs(ids, positions, slots, cu_q, seq_lens, tables, int(counts.max()), batch.is_decode,
                       logits_indices)


def block_table_array(block_tables: list) -> np.ndarray:
    """Tables (lists or arrays) of unequal lengths as one zero-padded int32 array."""
    tables = np.zeros((len(block_tables), max(map(len, block_tables))), dtype=np.int32)
    for row, table in zip(tables, block_tables):      # far faster than np.array(nested lists)
        row[:len(table)] = table
    return tables
