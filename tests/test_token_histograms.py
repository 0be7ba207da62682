"""engine/token_histograms.py: the device-side token counts equal counts rebuilt from the ids,
through recording, eviction (more sequences than rows) and rebuilding."""
import random

import pytest
import torch

from nanovllm.engine.sequence import Sequence
from nanovllm.engine.token_histograms import TokenHistograms
from nanovllm.sampling_params import SamplingParams

V = 50


def counts_of(seq):
    out = torch.zeros(V)
    for t in seq.token_ids[seq.num_prompt_tokens:]:
        out[t] += 1
    mask = torch.zeros(V, dtype=torch.bool)
    mask[seq.token_ids[:seq.num_prompt_tokens]] = True
    return out, mask


def test_counts_follow_the_sequences_through_eviction():
    rng = random.Random(0)
    seqs = [Sequence(str(i), 0, [rng.randrange(V) for _ in range(rng.randint(1, 9))], SamplingParams())
            for i in range(7)]
    for seq in seqs[:3]:                      # some already have outputs when first seen
        for _ in range(4):
            seq.append_token(rng.randrange(V))
    table = TokenHistograms(V, capacity=4, device=torch.device("cpu"))
    for step in range(40):
        batch = rng.sample(seqs, rng.randint(1, 4))
        index = table.gather(batch)
        counts, mask = table.output_counts[index], table.prompt_mask[index]
        assert len(set(index.tolist())) == len(batch)
        for i, seq in enumerate(batch):
            want_counts, want_mask = counts_of(seq)
            assert torch.equal(counts[i], want_counts) and torch.equal(mask[i], want_mask), (step, seq.seq_id)
        sampled = torch.tensor([rng.randrange(V) for _ in batch])
        table.record(index, sampled)
        for seq, token in zip(batch, sampled.tolist()):
            seq.append_token(token)
    assert len(table.rows) == 4               # seven sequences took turns in four rows


def test_a_batch_larger_than_the_table_is_refused():
    table = TokenHistograms(V, capacity=2, device=torch.device("cpu"))
    seqs = [Sequence(str(i), 0, [1, 2], SamplingParams()) for i in range(3)]
    with pytest.raises(ValueError, match="3 sequences"):
        table.gather(seqs)


def test_a_finished_sequence_gives_up_its_row_first():
    """Rows go to new sequences from finished ones before running ones lose theirs (a running
    sequence's row would have to be rebuilt from all its ids)."""
    from nanovllm.engine.sequence import SequenceStatus
    table = TokenHistograms(V, capacity=2, device=torch.device("cpu"))
    a, b, c = (Sequence(name, 0, [1, 2], SamplingParams()) for name in "abc")
    rows = table.gather([a, b]).tolist()               # a is now the least recently used
    b.status = SequenceStatus.FINISHED
    assert table.gather([c]).tolist() == [rows[1]]      # b's row, not a's
    assert table.gather([a]).tolist() == [rows[0]]      # a kept its row
