"""Accepting proposed tokens so that the output follows the target model's distribution
exactly (Leviathan et al., "Fast Inference from Transformers via Speculative Decoding", 2023).

For one sequence: k proposed tokens x_1..x_k, drawn from the proposer's distributions
q_1..q_k, and the target's distributions p_1..p_{k+1} at the same positions (p_{k+1} after
the last proposal). Walking the proposals in order, x_i is accepted with probability
min(1, p_i(x_i) / q_i(x_i)); at the first rejection a token is drawn from
normalize(max(0, p_i - q_i)) instead and the walk stops; if all k are accepted a bonus token
is drawn from p_{k+1}. Each emitted token is then distributed exactly as p at its position.
An n-gram proposal has no distribution: q is a point mass on x (accept with probability p(x);
on rejection draw from p without x, renormalised). A greedy request's p is a point mass on
the target's argmax, so this becomes: accept while the proposal is the argmax.

Pure torch, one sequence at a time; `generator` (a seeded request's) makes it reproducible.
"""
import torch

from nanovllm.layers.penalties import apply_min_tokens_and_penalties
from nanovllm.layers.sampler import apply_temperature_and_filters
from nanovllm.layers.sampling_metadata import SamplingMetadata

# A seeded request's draws are keyed by its seed and the token's position (engine/sampling_inputs.py);
# speculative decoding's own draws use these streams, apart from the sampler's (0).
PROPOSAL_DRAWS, ACCEPTANCE_DRAWS = 1, 2


def rejection_sample(target_probs: torch.Tensor, draft_token_ids: list[int], draft_probs: torch.Tensor | None = None,
                     generator: torch.Generator | None = None) -> list[int]:
    """`target_probs` [k+1, V]: p at each proposed position and after the last; `draft_probs`
    [k, V]: q (None: point masses on the proposals). Returns the accepted proposals followed
    by one token (the resampled one or the bonus): 1 to k+1 tokens."""
    k = len(draft_token_ids)
    device = target_probs.device
    draft = torch.tensor(draft_token_ids, dtype=torch.int64, device=device)
    rows = torch.arange(k, device=device)
    p_x = target_probs[rows, draft]
    q_x = draft_probs[rows, draft] if draft_probs is not None else torch.ones(k, device=device)
    uniform = torch.rand(k, generator=generator, device=device)
    # u < p/q, written without the division (q(x) > 0: x was drawn from q).
    accepted = (uniform * q_x < p_x).tolist()
    num_accepted = accepted.index(False) if False in accepted else k
    if num_accepted == k:
        return draft_token_ids + [_draw(target_probs[k], generator)]
    p = target_probs[num_accepted]
    q = draft_probs[num_accepted] if draft_probs is not None else \
        torch.nn.functional.one_hot(draft[num_accepted], p.shape[-1]).to(p.dtype)
    residual = (p - q).clamp(min=0)
    # A rejection means p(x) < q(x), so some token has p > q: the residual has mass (if rounding
    # left none, p itself is the right fallback).
    if not residual.sum() > 0:
        residual = p
    return draft_token_ids[:num_accepted] + [_draw(residual, generator)]


def greedy_accept(target_argmax: list[int], draft_token_ids: list[int]) -> list[int]:
    """The greedy case without random numbers: proposals while they equal the target's argmax,
    then the argmax at the first disagreement (or after the last proposal)."""
    out = []
    for proposed, best in zip(draft_token_ids, target_argmax):
        if proposed != best:
            break
        out.append(proposed)
    return out + [target_argmax[len(out)]]


def _draw(weights: torch.Tensor, generator: torch.Generator | None) -> int:
    """One token from unnormalised non-negative weights [V]."""
    return int(torch.multinomial(weights.float(), 1, generator=generator))


def sampling_probs(logits: torch.Tensor, meta: SamplingMetadata) -> torch.Tensor:
    """The distribution the sampler draws each row's token from, [B, V] float32: steps 2-5
    (the torch steps), a point mass on the argmax for a greedy row. Speculative decoding's
    rejection sampler (nanovllm/spec_decode/) needs this distribution itself, not one draw."""
    logits = apply_min_tokens_and_penalties(logits.float(), meta.penalties)
    greedy = torch.nn.functional.one_hot(logits.argmax(dim=-1), logits.shape[-1]).float()
    if meta.all_greedy:
        return greedy
    probs = apply_temperature_and_filters(logits, meta).softmax(dim=-1)
    return probs if meta.all_random else torch.where(meta.greedy[:, None], greedy, probs)
