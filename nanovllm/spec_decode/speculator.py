"""The Speculator: the hooks SpeculativeEngine (engine.py) calls (`propose` before scheduling, `run`
instead of the runner's launch, `finish` to read the step back) and the counters (`SpecDecodeMetrics`)."""
from collections.abc import Collection
from dataclasses import dataclass

from nanovllm.spec_decode.config import SpeculativeConfig
from nanovllm.spec_decode.ngram import NgramProposer, ngram_proposal
from nanovllm.spec_decode.verify import Verified, verify


@dataclass
class SpecDecodeMetrics:
    """Proposed and accepted tokens (of one request, or of the whole engine), as vLLM counts
    them: an accepted token is a proposal the target agreed with; each verifying step also
    emits one token of the target's own."""
    num_draft_tokens: int = 0
    num_accepted_tokens: int = 0
    num_drafts: int = 0               # (sequence, step) pairs that verified at least one proposal

    def add(self, num_draft_tokens: int, num_accepted_tokens: int, num_drafts: int = 1) -> None:
        self.num_draft_tokens += num_draft_tokens
        self.num_accepted_tokens += num_accepted_tokens
        self.num_drafts += num_drafts

    @classmethod
    def total(cls, parts) -> "SpecDecodeMetrics":
        out = cls()
        for part in parts:
            if part is not None:
                out.add(part.num_draft_tokens, part.num_accepted_tokens, part.num_drafts)
        return out

    @property
    def acceptance_rate(self) -> float | None:
        return self.num_accepted_tokens / self.num_draft_tokens if self.num_draft_tokens else None

    @property
    def mean_acceptance_length(self) -> float | None:
        """Tokens emitted per verifying step of a sequence: 1 + accepted proposals (vLLM's
        'mean acceptance length')."""
        return 1 + self.num_accepted_tokens / self.num_drafts if self.num_drafts else None


class Speculator:
    def __init__(self, config):
        spec: SpeculativeConfig = config.speculative_config
        self.max_model_len = config.max_model_len
        if spec.method == "ngram":
            self.proposer = NgramProposer(spec.num_speculative_tokens, spec.prompt_lookup_min, spec.prompt_lookup_max)
        else:
            from nanovllm.spec_decode.draft_model import DraftModelProposer
            self.proposer = DraftModelProposer(config)
        self.draft_probs = {}             # seq_id -> q of its proposals (draft model only)
        self.metrics = SpecDecodeMetrics()

    def propose(self, running: list, eos_ids: Collection[int]) -> None:
        """Set each running sequence's proposals (`spec_token_ids`). Only a sequence that is
        decoding gets any, and never more than could be emitted: a step emits up to k + 1."""
        limits = [self._limit(seq) for seq in running]
        if hasattr(self.proposer, "eos_ids"):
            self.proposer.eos_ids = eos_ids
        self.draft_probs = {}
        for seq, (tokens, q) in zip(running, self.proposer.propose(running, limits)):
            seq.spec_token_ids = tokens
            if q is not None:
                self.draft_probs[seq.seq_id] = q

    def expects_proposals(self, running: list) -> bool:
        """With a plain step in flight: would the tokens known so far give any sequence a
        proposal? Asked of the n-gram search only (a draft model's answer costs its forward
        passes: it is assumed yes, and every draft-model step is speculative)."""
        if not isinstance(self.proposer, NgramProposer):
            return True
        return any(ngram_proposal(seq.token_ids, 1, self.proposer.min_n, self.proposer.max_n)
                   for seq in running if seq.num_computed_tokens >= seq.num_prompt_tokens)

    def _limit(self, seq) -> int:
        decoding = seq.num_computed_tokens == seq.num_tokens - 1 and seq.num_in_flight == 0
        if not decoding:
            return 0
        return max(0, min(seq.params.max_tokens - seq.num_output_tokens, self.max_model_len - seq.num_tokens) - 1)

    def run(self, runner, batch, eos_ids: Collection[int]) -> Verified:
        """The step on the target model, read back at once; counts proposals and acceptances."""
        verified = verify(runner, batch, eos_ids, self.draft_probs)
        for seq, proposed, tokens in zip(batch.seqs, batch.proposed, verified.tokens):
            if proposed:
                if seq.spec_metrics is None:
                    seq.spec_metrics = SpecDecodeMetrics()
                seq.spec_metrics.add(len(proposed), len(tokens) - 1)
                self.metrics.add(len(proposed), len(tokens) - 1)
        self.draft_probs = {}
        return verified

    def finish(self, verified: Verified, scheduler, process) -> list:
        """The engine's _finish for a speculative step: a sequence got 1 to k+1 tokens. Only the
        keys/values of the accepted ones are kept: the computed count stops before the last new
        token, as after any decode (the slots of rejected proposals get overwritten). The tokens
        are then appended and checked one round at a time (`process`: the engine's handling of
        one token per sequence), as if each came from a step of its own, so a stop inside an
        accepted run ends the sequence there. Returns the requests with an output to make."""
        batch, touched = verified.batch, {}
        for seq, tokens in zip(batch.seqs, verified.tokens):
            if tokens:
                seq.num_computed_tokens = seq.num_tokens + len(tokens) - 1
            seq.spec_token_ids = []
        for j, result in enumerate(verified.rounds):
            if j:      # the scheduler expects one token in flight per token it is given
                for seq, token in zip(batch.seqs, result.sampled):
                    seq.num_in_flight += token is not None and not seq.is_finished
            scheduler.update(batch, result.sampled)
            touched.update((r.request_id, r) for r in process(batch, result))
        return list(touched.values())

    @staticmethod
    def request_metrics(seqs) -> SpecDecodeMetrics:
        """RequestOutput.metrics: the request's proposed and accepted token counts (the engine's
        totals are `metrics`)."""
        return SpecDecodeMetrics.total(seq.spec_metrics for seq in seqs)

