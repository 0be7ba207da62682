"""The Scheduler with speculative decoding: a decoding sequence's proposed tokens
(`seq.spec_token_ids`) ride along in its span, 1 + k positions, as far as the step's token budget
and the free blocks allow. Proposals never cause a preemption: where they do not fit they are
cut or dropped."""
from nanovllm.engine.scheduler import ScheduledBatch, Scheduler
from nanovllm.engine.sequence import Sequence


class SpeculativeScheduler(Scheduler):
    def next_span(self, seq: Sequence, budget: int) -> int:
        # (engine/overlap.py's check asks this too, and may cut proposals first: they only save
        # steps, so cutting one changes no token.)
        if seq.spec_token_ids:
            del seq.spec_token_ids[max(budget - 1, 0):]
            if not self.block_manager.can_append(seq, seq.num_computed_tokens + 1 + len(seq.spec_token_ids)):
                seq.spec_token_ids.clear()
        return super().next_span(seq, budget)

    def _add(self, batch: ScheduledBatch, seq: Sequence, n: int) -> None:
        batch.proposed.append(list(seq.spec_token_ids))     # the inputs to verify
        super()._add(batch, seq, n)

    def _preempt(self, seq: Sequence) -> None:
        seq.spec_token_ids = []
        super()._preempt(seq)
