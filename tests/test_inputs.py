"""engine/inputs.py: a mixed batch (decodes, prompt chunks, tokens still on the device) is laid
out exactly as a plain per-token loop says, and its logits rows are planned once."""
import dataclasses
import random

import torch

from nanovllm.engine.inputs import ROWS_MAX_SPAN, ROWS_MAX_TOKENS, block_table_array, plan_logits_rows, \
    prepare_inputs
from nanovllm.engine.scheduler import ScheduledBatch
from nanovllm.engine.sequence import Sequence
from nanovllm.layers.attention import TorchBackend
from nanovllm.sampling_params import SamplingParams

CPU = torch.device("cpu")


def random_batch(rng, count, block_size):
    """Sequences with random prompts and outputs, each computing a random span: a decode, the
    next chunk of its prompt, or (from_device) the token the step before is still sampling."""
    batch = ScheduledBatch([], [], [], [], [])
    for i in range(count):
        params = SamplingParams(prompt_logprobs=1 if rng.random() < 0.3 else None)
        seq = Sequence(str(i), 0, [rng.randrange(100) for _ in range(rng.randint(1, 60))], params)
        kind = rng.choice(["decode", "chunk", "from_device"])
        if kind != "chunk":
            for _ in range(rng.randint(0, 20)):
                seq.append_token(rng.randrange(100))
        if kind == "decode":
            start, n = seq.num_tokens - 1, 1
        elif kind == "chunk":
            start = rng.randrange(seq.num_tokens)
            n = rng.randint(1, seq.num_tokens - start)
        else:
            start, n = seq.num_tokens, 1
        seq.block_table = rng.sample(range(1000), -(-(start + n) // block_size))
        batch.seqs.append(seq)
        batch.starts.append(start)
        batch.num_new_tokens.append(n)
        batch.samples.append(start + n >= seq.num_tokens)
        batch.from_device.append(kind == "from_device")
    return batch


def test_layout_matches_a_per_token_loop():
    rng = random.Random(0)
    for block_size in (1, 16):
        for _ in range(5):
            batch = random_batch(rng, 9, block_size)
            rows = plan_logits_rows(batch)
            inputs = prepare_inputs(batch, block_size, rows.indices).to(CPU)
            ids, positions, slots, cu, logits_rows, sample_rows = [], [], [0], [0], [], []
            slots = []
            for i, (seq, start, n) in enumerate(zip(batch.seqs, batch.starts, batch.num_new_tokens)):
                for p in range(start, start + n):
                    ids.append(seq.token_ids[p] if p < seq.num_tokens else 0)
                    positions.append(p)
                    slots.append(seq.block_table[p // block_size] * block_size + p % block_size)
                offset = cu[-1]
                if seq.params.prompt_logprobs is not None and start < seq.num_prompt_tokens:
                    assert rows.prompt_rows[i] == (len(logits_rows), n - batch.samples[i])
                    logits_rows += range(offset, offset + n - batch.samples[i])
                if batch.samples[i]:
                    sample_rows.append(len(logits_rows))
                    logits_rows.append(offset + n - 1)
                cu.append(offset + n)
            assert inputs.input_ids.tolist() == ids
            assert inputs.positions.tolist() == positions
            assert inputs.meta.slot_mapping.tolist() == slots
            assert inputs.logits_indices.tolist() == logits_rows == rows.indices
            assert (rows.sample_rows or list(range(len(logits_rows)))) == sample_rows
            assert inputs.meta.max_seqlen_k == max(s + n for s, n in zip(batch.starts, batch.num_new_tokens))
            assert_attention_layout(batch, inputs, positions, cu)
            tensors = [inputs.input_ids, inputs.positions, inputs.meta.slot_mapping, inputs.logits_indices,
                       inputs.meta.cu_seqlens_q, inputs.meta.seq_lens, inputs.meta.block_tables]
            assert [t.dtype for t in tensors] == [torch.int64] * 4 + [torch.int32] * 3


def assert_attention_layout(batch, inputs, positions, cu):
    """Attention's view: a row per sequence (its span), or, for a step of short spans only, a
    one-token row per token over its own sequence's cache up to itself."""
    meta, counts = inputs.meta, batch.num_new_tokens
    owner = [i for i, n in enumerate(counts) for _ in range(n)]
    if not batch.is_decode and max(counts) <= ROWS_MAX_SPAN and sum(counts) <= ROWS_MAX_TOKENS:
        assert meta.is_decode and meta.max_seqlen_q == 1
        assert meta.cu_seqlens_q.tolist() == list(range(len(owner) + 1))
        assert meta.seq_lens.tolist() == [p + 1 for p in positions]
    else:
        owner = list(range(len(batch.seqs)))
        assert meta.is_decode == batch.is_decode and meta.max_seqlen_q == max(counts)
        assert meta.cu_seqlens_q.tolist() == cu
        assert meta.seq_lens.tolist() == [s + n for s, n in zip(batch.starts, counts)]
    assert len(meta.block_tables) == len(owner)
    for table, i in zip(meta.block_tables.tolist(), owner):
        assert table[:len(batch.seqs[i].block_table)] == batch.seqs[i].block_table


def short_spans_batch(rng, count, block_size):
    """A verifying step's shape: each sequence its newest token and up to 4 more."""
    batch = ScheduledBatch([], [], [], [], [])
    for i in range(count):
        seq = Sequence(str(i), 0, [rng.randrange(100) for _ in range(rng.randint(1, 40))], SamplingParams())
        n = rng.randint(1, 5)
        start = seq.num_tokens - 1
        seq.block_table = rng.sample(range(64), -(-(start + n) // block_size))
        for field, value in zip(("seqs", "starts", "num_new_tokens", "samples", "from_device"),
                                (seq, start, n, True, False)):
            getattr(batch, field).append(value)
    return batch


def test_short_spans_run_as_rows_with_the_same_attention():
    """A step of short spans, laid out as one-token rows, attends exactly as the varlen layout."""
    rng = random.Random(2)
    for block_size in (1, 4):
        for count in (1, 3, 6):
            batch = short_spans_batch(rng, count, block_size)
            if batch.is_decode:
                continue
            inputs = prepare_inputs(batch, block_size, plan_logits_rows(batch).indices).to(CPU)
            assert inputs.meta.is_decode and len(inputs.meta.seq_lens) == batch.num_tokens
            counts = torch.tensor(batch.num_new_tokens, dtype=torch.int32)
            varlen = dataclasses.replace(
                inputs.meta, is_decode=False, max_seqlen_q=max(batch.num_new_tokens),
                cu_seqlens_q=torch.nn.functional.pad(counts.cumsum(0, dtype=torch.int32), (1, 0)),
                seq_lens=torch.tensor(batch.starts, dtype=torch.int32) + counts,
                block_tables=torch.from_numpy(block_table_array([seq.block_table for seq in batch.seqs])))
            k_cache, v_cache = torch.randn(2, 64, block_size, 2, 8).unbind(0)
            q = torch.randn(batch.num_tokens, 4, 8)
            rows_out = TorchBackend().attend(q, k_cache, v_cache, inputs.meta, 0.3)
            varlen_out = TorchBackend().attend(q, k_cache, v_cache, varlen, 0.3)
            torch.testing.assert_close(rows_out, varlen_out, rtol=1e-5, atol=1e-6)


def test_a_decode_batch_samples_every_row_in_order():
    rng = random.Random(1)
    batch = random_batch(rng, 40, 16)
    keep = [i for i, n in enumerate(batch.num_new_tokens) if n == 1 and batch.samples[i]]
    decode = ScheduledBatch(*([getattr(batch, f)[i] for i in keep]
                              for f in ("seqs", "starts", "num_new_tokens", "samples", "from_device")))
    assert decode.is_decode
    rows = plan_logits_rows(decode)
    assert rows.indices == list(range(len(keep))) and rows.sample_rows is None and rows.prompt_rows == {}
