"""Continuous batching: each step, decide which sequences run and how many tokens each computes.

Policy (vLLM V1's): there is one kind of step. Every running sequence gets its next tokens
first: one for a sequence that is decoding, the next chunk of its prompt for one whose prompt
is not fully computed yet. What is left of the step's token budget (`max_num_batched_tokens`)
then admits waiting sequences, in order, while `max_num_seqs` allows and blocks can be
allocated; the last one admitted may get only the first chunk of its prompt (chunked
prefill), unless that would be a short head of a long prompt (`_short_head`). So a prompt that
joins never stalls the decodes: they run in the same forward pass.
When a running sequence's next token needs a block and none is free, the most recently
admitted running sequence is preempted: its blocks are freed and it goes back to the front of
the queue, to be recomputed (prompt + the tokens it had generated) when there is room again.

A step may be scheduled while the previous one is still on the device (the engine overlaps
the two): a sequence whose sampled token is not read back yet (`seq.num_in_flight`) then
computes that token, which the step reads on the device. Such a step leaves out sequences that
the token in flight ends by length; one that it ends by EOS or a stop string computes a token
in vain. (The engine schedules ahead only where no preemption is needed: engine/overlap.py.)

With speculative decoding a decoding sequence may carry proposed tokens (`seq.spec_token_ids`):
its span is then its newest token followed by them (spec_decode/scheduler.py fits them in).
"""
from collections import deque
from dataclasses import dataclass, field

from nanovllm.config import EngineConfig
from nanovllm.engine.block_manager import BlockManager
from nanovllm.engine.sequence import Sequence, SequenceStatus


@dataclass
class ScheduledBatch:
    """One step: for each sequence, the span of positions it computes. Decided when
    scheduled, since the sequences move on while the step is in flight."""
    seqs: list[Sequence]
    starts: list[int]             # first position each sequence computes
    num_new_tokens: list[int]     # how many positions
    samples: list[bool]           # does the span end at its newest (or last proposed) token, so it samples?
    from_device: list[bool]       # is its first input the previous step's sample, still on the device?
    # Speculative decoding: the proposed tokens each span ends with (inputs to verify; the
    # span then samples at each of them and at the token before). Empty without speculation.
    proposed: list[list[int]] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return sum(self.num_new_tokens)

    @property
    def is_decode(self) -> bool:
        """Every sequence computes exactly one token and samples: what decode graphs replay."""
        return len(self.seqs) == self.num_tokens and all(self.samples)


class Scheduler:
    def __init__(self, config: EngineConfig, block_manager: BlockManager):
        self.max_num_seqs = config.max_num_seqs
        self.max_num_batched_tokens = config.max_num_batched_tokens
        self.max_model_len = config.max_model_len
        self.chunked_prefill = config.enable_chunked_prefill
        self.block_manager = block_manager
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def schedule(self) -> ScheduledBatch | None:
        """The next step, or None when nothing can run."""
        batch = ScheduledBatch([], [], [], [], [])
        budget = self.max_num_batched_tokens
        for seq in list(self.running):
            if seq.status != SequenceStatus.RUNNING:
                continue                          # preempted earlier in this loop
            n = self.next_span(seq, budget)
            if n == 0:
                continue
            while not self.block_manager.grow(seq, seq.num_computed_tokens + n):
                victim = self.running[-1]
                self._preempt(victim)
                if victim is seq:
                    break
            else:
                self._add(batch, seq, n)
                budget -= n
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            if not self.block_manager.allocate(seq):
                break                             # no room yet: wait for running ones to finish
            rest = seq.num_tokens - seq.num_computed_tokens
            n = min(rest, budget)
            if n < rest and (not self.chunked_prefill or self._short_head(seq, n, rest)):
                self.block_manager.free_blocks(seq)
                break                             # the whole prompt (or a longer chunk) goes in a later step
            self.waiting.popleft()
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            self._add(batch, seq, n)
            budget -= n
        return batch if batch.seqs else None

    def _short_head(self, seq: Sequence, n: int, rest: int) -> bool:
        """Would a long prompt with nothing computed begin with a head of under an eighth of the
        budget? It then waits for a step with more room (usually the next, which its rest would
        have needed anyway): its later chunks would attend over a cached context, which costs more
        than a prompt's own attention (on CUDA: cuDNN's dense kernel, layers/attention_backends.py)."""
        return seq.num_computed_tokens == 0 and n < self.max_num_batched_tokens // 8 <= rest

    def next_span(self, seq: Sequence, budget: int) -> int:
        """How many tokens a running sequence computes next: the rest of what is known of it
        (its token in flight included), within the budget; 0 when the token in flight is its last."""
        known = seq.num_tokens + seq.num_in_flight + len(seq.spec_token_ids)
        if seq.num_in_flight and (known - seq.num_prompt_tokens >= seq.params.max_tokens
                                  or known >= self.max_model_len):
            return 0
        return max(0, min(known - seq.num_computed_tokens, budget))

    def _add(self, batch: ScheduledBatch, seq: Sequence, n: int) -> None:
        start, end, known = seq.num_computed_tokens, seq.num_computed_tokens + n, seq.num_tokens
        # Full blocks of known tokens are offered to the prefix cache now: this step writes
        # their keys/values before any later step can read them.
        self.block_manager.cache_computed_blocks(seq, min(end, known))
        samples = end == known + seq.num_in_flight + len(seq.spec_token_ids)
        batch.seqs.append(seq)
        batch.starts.append(start)
        batch.num_new_tokens.append(n)
        batch.samples.append(samples)
        batch.from_device.append(start == known)      # the token in flight is its input
        seq.num_computed_tokens = end
        seq.num_in_flight += samples

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.block_manager.free_blocks(seq)
        seq.status = SequenceStatus.WAITING
        self.waiting.appendleft(seq)
        self.num_preemptions += 1

    def update(self, batch: ScheduledBatch, sampled: list[int | None]) -> None:
        """Record a step read back: append the sampled tokens (`sampled[i]` is None for a
        sequence whose span was not its last prompt chunk)."""
        for seq, token in zip(batch.seqs, sampled):
            if token is None or seq.is_finished:
                continue                          # mid-prompt, or it stopped while this step was in flight
            seq.append_token(token)
            seq.num_in_flight -= 1
            self.block_manager.cache_computed_blocks(seq, min(seq.num_computed_tokens, seq.num_tokens))

    def finish(self, seq: Sequence, reason: str, stop_reason: int | str | None = None) -> None:
        """End a sequence (stopped, out of length, or aborted) and free its blocks."""
        seq.finish_reason, seq.stop_reason = reason, stop_reason
        if seq.status == SequenceStatus.RUNNING:
            self.running.remove(seq)
        elif seq.status == SequenceStatus.WAITING:
            self.waiting.remove(seq)
        seq.status = SequenceStatus.FINISHED
        seq.num_in_flight = 0
        self.block_manager.free_blocks(seq)
