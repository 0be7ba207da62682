"""engine/inputs.py: the lean decode path lays out exactly what the general path does."""
import random

import torch

from nanovllm.engine.inputs import prepare_inputs
from nanovllm.engine.scheduler import ScheduledBatch
from nanovllm.engine.sequence import Sequence
from nanovllm.sampling_params import SamplingParams

CPU = torch.device("cpu")


def decoding_sequences(rng, count, block_size):
    seqs = []
    for i in range(count):
        seq = Sequence(str(i), 0, [rng.randrange(100) for _ in range(rng.randint(1, 60))], SamplingParams())
        for _ in range(rng.randint(0, 20)):
            seq.append_token(rng.randrange(100))
        seq.num_computed_tokens = seq.num_tokens - 1           # the newest token is the input
        blocks = -(-seq.num_tokens // block_size)
        seq.block_table = rng.sample(range(1000), blocks)
        seqs.append(seq)
    return seqs


def test_decode_path_matches_the_general_path():
    rng = random.Random(0)
    for block_size in (1, 16):
        seqs = decoding_sequences(rng, 9, block_size)
        ones = [1] * len(seqs)
        decode = prepare_inputs(ScheduledBatch(seqs, ones, is_prefill=False), block_size, CPU)
        general = prepare_inputs(ScheduledBatch(seqs, ones, is_prefill=True), block_size, CPU)
        for name in ("input_ids", "positions", "logits_indices"):
            assert torch.equal(getattr(decode, name), getattr(general, name)), name
        for name in ("slot_mapping", "cu_seqlens_q", "seq_lens", "block_tables"):
            assert torch.equal(getattr(decode.meta, name), getattr(general.meta, name)), name
        assert decode.meta.is_decode and decode.meta.max_seqlen_q == 1
        assert decode.meta.max_seqlen_k == general.meta.max_seqlen_k


def test_a_step_launched_ahead_computes_the_next_position():
    seqs = decoding_sequences(random.Random(1), 5, 16)
    for seq in seqs:                          # room for the token being sampled
        if seq.num_tokens + 1 > len(seq.block_table) * 16:
            seq.block_table.append(999)
    ahead_ids = torch.arange(5) + 500         # the pending tokens, still on the device
    ahead = prepare_inputs(ScheduledBatch(seqs, [1] * 5, is_prefill=False), 16, CPU, ahead_ids)
    assert torch.equal(ahead.input_ids, ahead_ids)
    assert ahead.positions.tolist() == [seq.num_tokens for seq in seqs]
    assert ahead.meta.seq_lens.tolist() == [seq.num_tokens + 1 for seq in seqs]
    assert ahead.meta.slot_mapping.tolist() == [
        seq.block_table[seq.num_tokens // 16] * 16 + seq.num_tokens % 16 for seq in seqs]
