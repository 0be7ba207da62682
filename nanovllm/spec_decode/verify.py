"""One speculative step on the target model: every sequence's span (a prompt chunk, a decode,
or its newest token followed by k proposed tokens) in ONE forward pass, logits at each
position that samples, then per sequence the rejection sampler decides what is emitted.

The result is laid out in rounds for the engine: round j holds each sequence's j-th new
token (a `StepResult` like a plain step's), so that the engine appends and checks them one
at a time and a stop (EOS, a stop token or string, max_tokens) inside an accepted run cuts it
there.
"""
from collections.abc import Collection
from dataclasses import dataclass

import torch

from nanovllm.engine.logprob_rows import rows_with_prompt_logprobs
from nanovllm.engine.model_runner import StepResult
from nanovllm.engine.overlap import ReadyEvent
from nanovllm.engine.sampling_inputs import draw_generator
from nanovllm.engine.scheduler import ScheduledBatch
from nanovllm.layers.logprobs import LogprobsTensors, gather_logprobs, gather_prompt_logprobs
from nanovllm.device_copy import to_device
from nanovllm.layers.penalties import uses_penalties
from nanovllm.layers.sampling_metadata import SamplingMetadata, SamplingRow
from nanovllm.spec_decode.rejection_sampler import ACCEPTANCE_DRAWS, greedy_accept, rejection_sample, \
    sampling_probs


@dataclass
class Verified:
    """A speculative step, already read back."""
    batch: ScheduledBatch
    tokens: list[list[int]]          # per sequence of the batch: its new tokens ([] mid-prompt)
    rounds: list[StepResult]         # round j: every sequence's j-th new token (None if it has none)


def verify(runner, batch: ScheduledBatch, eos_ids: Collection[int], draft_probs: dict[int, torch.Tensor]
           ) -> Verified:
    """Run `batch` on the target model; `draft_probs[seq_id]` [k, V]: the draft model's q for
    a sequence's proposals (absent: n-gram proposals, point masses)."""
    proposed = batch.proposed or [[] for _ in batch.seqs]
    # Logits rows: a chunk's prompt-logprob rows, then for a sequence that samples one row per
    # proposed token and one after them.
    indices, first_row, prompt_rows = rows_with_prompt_logprobs(batch, [len(p) + 1 for p in proposed])
    with torch.inference_mode():
        logits = runner.execute(runner.prepare(batch, indices)).float()
        # Without prompt-logprob rows every row samples, in order: no gather (nor its index's copy).
        sampled_logits = logits if not prompt_rows else logits[
            [start_row + j for i, start_row in first_row.items() for j in range(len(proposed[i]) + 1)]]
        if all(_argmax_is_enough(batch.seqs[i].params) for i in first_row):
            # Plain greedy rows need neither the sampler's inputs nor distributions.
            probs, max_num_logprobs = None, None
            best = sampled_logits.argmax(dim=-1)
        else:
            rows = [_sampling_row(batch.seqs[i], proposed[i][:j], eos_ids)
                    for i in first_row for j in range(len(proposed[i]) + 1)]
            meta = SamplingMetadata.build(rows, runner.vocab_size, runner.device)
            probs, max_num_logprobs = sampling_probs(sampled_logits, meta), meta.max_num_logprobs
            best = probs.argmax(dim=-1)            # greedy rows: the argmax (one read-back for all)
        runner.wait_ready(ReadyEvent(runner.device))   # (a tensor-parallel worker's death raises here)
        best = best.tolist()
        tokens, row = [[] for _ in batch.seqs], 0
        for i in first_row:
            seq, k = batch.seqs[i], len(proposed[i])
            if seq.params.is_greedy:
                tokens[i] = greedy_accept(best[row:row + k + 1], proposed[i])
            else:
                p = probs[row:row + k + 1]
                q = draft_probs.get(seq.seq_id)
                # keyed by the position of the first token it may emit, as the sampler's draws
                first = batch.starts[i] + batch.num_new_tokens[i] - k
                generator = draw_generator(seq, first, p.device, ACCEPTANCE_DRAWS)
                tokens[i] = rejection_sample(p, proposed[i], None if q is None else q[:k], generator)
            row += k + 1
        sample_logprobs = None
        if max_num_logprobs is not None:
            emitted_rows = [first_row[i] + j for i in first_row for j in range(len(tokens[i]))]
            emitted = to_device(torch.tensor([t for i in first_row for t in tokens[i]]), logits.device)
            sample_logprobs = gather_logprobs(logits[emitted_rows], emitted, max_num_logprobs)
        prompt_logprobs = gather_prompt_logprobs(logits, prompt_rows, batch)
    return Verified(batch, tokens, _rounds(tokens, sample_logprobs, prompt_logprobs))


def _argmax_is_enough(params) -> bool:
    """Greedy, and nothing that changes the logits or asks for logprobs."""
    return params.is_greedy and not params.min_tokens and not uses_penalties(params) and params.logprobs is None


def _sampling_row(seq, proposed_before: list[int], eos_ids) -> SamplingRow:
    """The sampler's row for the position after `proposed_before`: min_tokens and the penalties
    count the proposals before it as outputs, as if they had been emitted."""
    needs_tokens = seq.params.min_tokens or uses_penalties(seq.params)
    token_ids = seq.token_ids + proposed_before if needs_tokens and proposed_before else seq.token_ids
    return SamplingRow.of(seq.params, token_ids, seq.num_prompt_tokens, eos_ids)


_LOGPROBS_FIELDS = ("token_ids", "token_logprobs", "token_ranks", "top_ids", "top_logprobs")


def _rounds(tokens: list[list[int]], logprobs: LogprobsTensors | None, prompt_logprobs: dict) -> list[StepResult]:
    """Round j: each sequence's j-th token; its logprobs rows follow the sequences that have one."""
    # The logprobs rows are sequence-major (all of a sequence's tokens in a row): find each
    # round's rows in them.
    starts, row = [], 0
    for seq_tokens in tokens:
        starts.append(row)
        row += len(seq_tokens)
    rounds = []
    for j in range(max([1, *map(len, tokens)])):       # round 0 also carries the prompt logprobs
        sampled = [seq_tokens[j] if j < len(seq_tokens) else None for seq_tokens in tokens]
        round_logprobs = None
        if logprobs is not None:
            index = torch.tensor([start + j for start, t in zip(starts, sampled) if t is not None],
                                 device=logprobs.token_ids.device)
            round_logprobs = LogprobsTensors(*(getattr(logprobs, f).index_select(0, index) for f in _LOGPROBS_FIELDS))
        rounds.append(StepResult(sampled, round_logprobs, prompt_logprobs if j == 0 else {}))
    return rounds
