"""Continuous batching: each step, decide which sequences run and how many tokens each computes.

Policy (nano-vllm's, plus chunking):
- Prefill first. Waiting sequences are taken in order while the step's token budget
  (`max_num_batched_tokens`) and `max_num_seqs` allow. A prompt longer than the remaining
  budget is cut (chunked prefill): its first chunk runs now, the rest in the next steps.
- Otherwise decode: every running sequence computes its newest token. When a sequence's
  new token needs a block and none is free, the most recently admitted running sequence
  is preempted: its blocks are freed and it goes back to the front of the queue, to be
  recomputed (prompt + the tokens it had generated) when there is room again.
A step is therefore all-prefill or all-decode; decode steps have exactly one token per
sequence, which is what CUDA graphs replay.
"""
from collections import deque
from dataclasses import dataclass

from nanovllm.config import EngineConfig
from nanovllm.engine.block_manager import BlockManager
from nanovllm.engine.sequence import Sequence, SequenceStatus


@dataclass
class ScheduledBatch:
    seqs: list[Sequence]
    num_new_tokens: list[int]     # tokens each sequence computes this step
    is_prefill: bool
    # Per sequence: does this step give it a new token (is its chunk the last of its prompt)?
    # Decided when scheduled, since the sequences move on while the step is in flight.
    samples: list[bool] | None = None

    def __post_init__(self):
        if self.samples is None:
            self.samples = [seq.num_computed_tokens + n == seq.num_tokens
                            for seq, n in zip(self.seqs, self.num_new_tokens)]

    @property
    def num_tokens(self) -> int:
        return sum(self.num_new_tokens)


class Scheduler:
    def __init__(self, config: EngineConfig, block_manager: BlockManager):
        self.max_num_seqs = config.max_num_seqs
        self.max_num_batched_tokens = config.max_num_batched_tokens
        self.max_model_len = config.max_model_len
        self.chunked_prefill = config.enable_chunked_prefill
        self.block_manager = block_manager
        self.block_size = config.block_size
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def schedule(self) -> ScheduledBatch | None:
        return self._schedule_prefill() or self._schedule_decode()

    def _schedule_prefill(self) -> ScheduledBatch | None:
        seqs, counts, budget = [], [], self.max_num_batched_tokens
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            if not seq.block_table and not self.block_manager.allocate(seq):
                break                             # no room yet: wait for running ones to finish
            n = min(seq.num_tokens - seq.num_computed_tokens, budget)
            if n < seq.num_tokens - seq.num_computed_tokens and not self.chunked_prefill and seqs:
                break                             # no chunking: the whole prompt goes next step
            self.block_manager.cache_computed_blocks(seq, seq.num_computed_tokens + n)
            seqs.append(seq)
            counts.append(n)
            budget -= n
            if seq.num_computed_tokens + n < seq.num_tokens:
                break                             # a partial chunk: the rest comes next step
            self.waiting.popleft()
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
        return ScheduledBatch(seqs, counts, is_prefill=True) if seqs else None

    def _schedule_decode(self) -> ScheduledBatch | None:
        scheduled = []
        for seq in list(self.running):
            if seq.status != SequenceStatus.RUNNING:
                continue                          # preempted earlier in this loop
            while not self.block_manager.can_append(seq):
                victim = self.running[-1]
                self._preempt(victim)
                if victim is seq:
                    break
            else:
                self.block_manager.append_slot(seq)
                scheduled.append(seq)
        return ScheduledBatch(scheduled, [1] * len(scheduled), False, [True] * len(scheduled)) if scheduled else None

    def schedule_ahead(self, launched: ScheduledBatch) -> ScheduledBatch | None:
        """The next decode step of a decode step still on the device, scheduled before its
        tokens are known (each sequence will then have one token more). Only when nothing
        could change the plan: no prompt is waiting, no sequence needs its new token counted
        on the host to be sampled (min_tokens; penalties count on the device, in step order),
        and blocks suffice without preemption. Sequences
        that the pending token finishes by length are left out; one that stops on EOS or a
        stop string computes one token in vain, which is dropped."""
        if self.waiting:
            return None
        seqs, growing = [], []        # growing: those whose next token starts a new block
        for seq in launched.seqs:
            if seq.status != SequenceStatus.RUNNING:
                continue
            if seq.params.min_tokens:
                return None
            num_tokens = len(seq.token_ids) + 1      # with the token being sampled
            if num_tokens - seq.num_prompt_tokens < seq.params.max_tokens and num_tokens < self.max_model_len:
                seqs.append(seq)
                if num_tokens > len(seq.block_table) * self.block_size:
                    growing.append(seq)
        if not seqs or len(growing) > self.block_manager.num_free_blocks:
            return None
        for seq in growing:
            self.block_manager.append_slot(seq, len(seq.token_ids) + 1)
        return ScheduledBatch(seqs, [1] * len(seqs), False, [True] * len(seqs))

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.block_manager.free_blocks(seq)
        seq.status = SequenceStatus.WAITING
        self.waiting.appendleft(seq)
        self.num_preemptions += 1

    def update(self, batch: ScheduledBatch, sampled: list[int | None]) -> None:
        """Record a finished step: advance computed counts and append sampled tokens
        (`sampled[i]` is None for a sequence whose prefill chunk was not its last)."""
        for seq, n, token in zip(batch.seqs, batch.num_new_tokens, sampled):
            if seq.is_finished:
                continue                          # it stopped while this step was in flight
            seq.num_computed_tokens += n
            if token is not None:
                seq.append_token(token)
            if not batch.is_prefill:              # prefill blocks were offered when scheduled
                self.block_manager.cache_computed_blocks(seq, seq.num_computed_tokens)

    def finish(self, seq: Sequence, reason: str, stop_reason: int | str | None = None) -> None:
        """End a sequence (stopped, out of length, or aborted) and free its blocks."""
        seq.finish_reason, seq.stop_reason = reason, stop_reason
        if seq.status == SequenceStatus.RUNNING:
            self.running.remove(seq)
        elif seq.status == SequenceStatus.WAITING:
            self.waiting.remove(seq)
        seq.status = SequenceStatus.FINISHED
        self.block_manager.free_blocks(seq)
