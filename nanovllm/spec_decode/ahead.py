"""The next verifying step launched before this one is read back (n-gram proposals, greedy rows).

A verifying step must be read back before the next is scheduled, since the next proposals need
its tokens; so its host work (scheduling, inputs, proposals, processing the tokens) adds to its
GPU time instead of overlapping it as a plain step's does. Yet when every proposal is accepted,
common where the output copies its input, the next step is known but for one token: the
target's own token after the proposals, which can stay on the device as the next step's first
input. So while step N runs, the engine assumes that all its proposals will be accepted, asks
the n-gram search for the next proposals on that assumption (the text that followed the match
also guesses the target's token), and launches step N + 1 at once.

When N is read back with a proposal rejected (or a sequence ended), N + 1 computed positions
that do not exist and is dropped: its keys and values lie beyond every sequence's tokens, where
later steps overwrite them, as rejected proposals' do. A wrong guess of the target's token only
makes N + 1's proposals fail their verification: the tokens are the target's either way.
"""
from dataclasses import dataclass

import torch

from nanovllm.device_copy import to_device
from nanovllm.engine.scheduler import ScheduledBatch, Scheduler
from nanovllm.spec_decode.ngram import NgramProposer, ngram_proposal
from nanovllm.spec_decode.verify import PendingVerify, Verified, launch_greedy


@dataclass
class Ahead:
    """Step N + 1, launched on the assumption that step N accepts every proposal."""
    step: PendingVerify
    assumed_accepted: list[int]       # per sequence, the proposals of step N it assumes accepted

    def holds(self, verified: Verified) -> bool:
        """Did step N (`verified`) accept every proposal of every sequence, none of them ending?"""
        return all(len(tokens) == accepted + 1 and not seq.is_finished
                   for seq, tokens, accepted in zip(self.step.batch.seqs, verified.tokens, self.assumed_accepted))

    def drop(self) -> None:
        for seq in self.step.batch.seqs:
            if not seq.is_finished:
                seq.num_in_flight -= 1


def launch_ahead(runner, scheduler: Scheduler, proposer: NgramProposer, step: PendingVerify,
                 max_model_len: int) -> Ahead | None:
    """Launch the step after `step` (not read back yet) as if it accepted all its proposals; None
    where that step cannot be known: a sequence mid-prompt or that the step may end by length,
    sequences that could be admitted or were left out of the step, too few free blocks."""
    batch = step.batch
    admitting = scheduler.waiting and len(scheduler.running) < scheduler.max_num_seqs
    if admitting or len(scheduler.running) != len(batch.seqs) or not all(batch.samples):
        return None
    ahead = ScheduledBatch([], [], [], [], [], [])
    for seq, proposed in zip(batch.seqs, batch.proposed):
        emitted = len(proposed) + 1                       # if all are accepted
        room = min(seq.params.max_tokens - seq.num_output_tokens, max_model_len - seq.num_tokens) - emitted
        if seq.is_finished or room < 1:
            return None
        # The search over the tokens as they would be: its first token guesses the target's.
        guessed = ngram_proposal(seq.token_ids + proposed, min(proposer.k, room - 1) + 1, proposer.min_n, proposer.max_n)
        ahead.seqs.append(seq)
        ahead.starts.append(seq.num_tokens + len(proposed))     # the position of the target's token
        ahead.num_new_tokens.append(max(1, len(guessed)))
        ahead.samples.append(True)
        ahead.from_device.append(True)
        ahead.proposed.append(guessed[1:])
    if ahead.num_tokens > scheduler.max_num_batched_tokens or not all(
            scheduler.block_manager.grow(seq, start + n)
            for seq, start, n in zip(ahead.seqs, ahead.starts, ahead.num_new_tokens)):
        return None               # (blocks already grown stay with their sequences, which grow into them)
    # seq.num_computed_tokens is left as step N set it: reading N back sets it anew (Speculator.finish).
    for seq in ahead.seqs:
        seq.num_in_flight += 1
    # Each sequence's first input: the target's token after its proposals in step N, on the device.
    rows = to_device(torch.tensor([step.first_row[i] + len(p) for i, p in enumerate(batch.proposed)]),
                     step.best_on_device.device)
    first_inputs = step.best_on_device.index_select(0, rows)
    return Ahead(launch_greedy(runner, ahead, first_inputs), [len(p) for p in batch.proposed])
