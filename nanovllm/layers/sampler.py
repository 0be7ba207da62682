"""The sampler: from the last position's logits to one token per sequence, vectorised over the
batch and with no read-back to the host. The order is vLLM V1's: logprobs of the raw logits,
min_tokens, penalties, the argmax for greedy rows, then temperature, min-p, top-k, top-p and
the draw. docs/sampling.md says why each step sits where it does and what runs as
Triton kernels on CUDA."""
from dataclasses import dataclass

import torch

from nanovllm.layers.fused_sampling import fused_sample
from nanovllm.layers.logprobs import LogprobsTensors, gather_logprobs
from nanovllm.layers.penalties import apply_min_tokens_and_penalties
from nanovllm.layers.sampling_metadata import SamplingMetadata


@dataclass
class SamplerOutput:
    sampled_token_ids: torch.Tensor        # [B] int64
    logprobs: LogprobsTensors | None       # k = max over rows; the engine slices per row


class Sampler(torch.nn.Module):
    """`fused=True` (the CUDA default) draws the tokens with Triton kernels (layers/fused_sampling.py).
    The CPU takes the torch steps below, which are also the reference for the distribution
    the kernels draw from (the draws themselves differ)."""

    def __init__(self, fused: bool = False):
        super().__init__()
        self.fused = fused

    def forward(self, logits: torch.Tensor, meta: SamplingMetadata,
                row_seeds: torch.Tensor | None = None) -> SamplerOutput:
        """`row_seeds` [B] int64 on the host: each row's seed for this draw (the engine's keyed
        by a seeded request's seed and the token's position: engine/sampling_inputs.py). Needed
        when a random row is seeded; without them the rows draw from torch's global generator."""
        if meta.seeded_rows and row_seeds is None:
            raise ValueError("a batch with seeded random rows needs row_seeds")
        # All ops below are out of place: the caller's logits stay untouched.
        if not self.fused:
            logits = logits.float()
        raw_logits = logits if meta.max_num_logprobs is not None else None

        logits = apply_min_tokens_and_penalties(logits, meta.penalties, self.fused)
        if self.fused:
            sampled = fused_sample(logits, meta, row_seeds)
        elif meta.all_greedy:
            sampled = logits.argmax(dim=-1)
        else:
            probs = apply_temperature_and_filters(logits, meta).softmax(dim=-1)
            row_seeds = row_seeds.tolist() if meta.seeded_rows else []
            sampled = inverse_cdf_draw(probs, {i: row_seeds[i] for i in meta.seeded_rows})
            if not meta.all_random:
                sampled = torch.where(meta.greedy, logits.argmax(dim=-1), sampled)

        out = None
        if raw_logits is not None:
            out = gather_logprobs(raw_logits, sampled, meta.max_num_logprobs, self.fused)
        return SamplerOutput(sampled, out)


def apply_temperature_and_filters(logits: torch.Tensor, meta: SamplingMetadata) -> torch.Tensor:
    """The random-sampling steps, in vLLM V1's order: temperature, min-p, top-k, top-p.
    Min-p and top-k both keep the tokens at or above a logit, so their order does not
    matter; top-p does see them: its nucleus is taken over the distribution renormalised to
    the tokens they keep. (transformers runs min-p last, after top-p: a request combining
    min-p with top-p can keep more tokens there.)"""
    logits = logits / meta.temperature[:, None]
    if meta.min_p is not None:
        logits = apply_min_p(logits, meta.min_p)
    if meta.top_k is not None or meta.top_p is not None:
        logits = apply_top_k_top_p(logits, meta)
    return logits


def apply_top_k_top_p(logits: torch.Tensor, meta: SamplingMetadata) -> torch.Tensor:
    """Top-k keeps each row's k largest logits; top-p (the nucleus) then keeps the most likely
    tokens until their probability reaches top_p, at least one. Both come down to a per-row
    threshold logit: tokens below it get -inf (ties with it are kept). Logits already -inf
    (min-p's, min_tokens') stay out: top-p's softmax renormalises over the tokens left."""
    neg_inf = float("-inf")
    if meta.top_k is not None:
        values = logits.topk(meta.max_top_k, dim=-1).values                # [B, max_k], descending
        kth = values.gather(-1, (meta.top_k - 1).clamp(min=0)[:, None])    # [B, 1]
        kth = kth.masked_fill((meta.top_k == 0)[:, None], neg_inf)          # k = 0: off
        logits = logits.masked_fill(logits < kth, neg_inf)
    if meta.top_p is not None:
        if meta.top_k is not None and meta.top_p_within_top_k:
            # Every top-p row also has a top-k: its nucleus lies within its top-k values, so
            # there is no need to sort the whole vocabulary. (`values` came from the logits
            # min-p already masked: its -inf stay -inf.)
            values = values.masked_fill(values < kth, neg_inf)
        else:
            values = logits.sort(dim=-1, descending=True).values
        probs = values.softmax(dim=-1)
        mass_before = probs.cumsum(dim=-1) - probs                  # of the more likely tokens
        # At least the top token, whatever top_p (even 0) and even where the row is all -inf
        # (its softmax then NaN).
        num_kept = (mass_before < meta.top_p[:, None]).sum(dim=-1, keepdim=True).clamp(min=1)
        threshold = values.gather(-1, num_kept - 1)
        threshold = threshold.masked_fill((meta.top_p >= 1.0)[:, None], neg_inf)  # top_p = 1: off
        logits = logits.masked_fill(logits < threshold, neg_inf)
    return logits


def apply_min_p(logits: torch.Tensor, min_p: torch.Tensor) -> torch.Tensor:
    """Drop tokens less likely than min_p times the most likely one. In logit space,
    p_i >= min_p * p_max  <=>  logit_i >= max_logit + log(min_p): no softmax needed
    (min_p = 0 gives a threshold of -inf, keeping everything)."""
    threshold = logits.amax(dim=-1, keepdim=True) + min_p.log()[:, None]
    return logits.masked_fill(logits < threshold, float("-inf"))


def inverse_cdf_draw(probs: torch.Tensor, seeds: dict[int, int]) -> torch.Tensor:
    """Sample one token per row by the inverse CDF: one uniform number u per row, and the first
    token whose cumulative probability exceeds u times the row's total. One random number a row
    instead of one a token (an exponential race) makes it ~5-20x faster on a CPU. The sum is in
    float64 so that tokens of tiny probability keep their share. `seeds`: row -> seed, for the
    rows whose number comes from their own seed rather than torch's global generator."""
    cdf = probs.cumsum(dim=-1, dtype=torch.float64)
    u = torch.empty(probs.shape[0], 1, dtype=torch.float64, device=probs.device)
    if len(seeds) < probs.shape[0]:          # the global generator only when a row needs it
        u.uniform_()
    for i, seed in seeds.items():
        generator = torch.Generator(probs.device).manual_seed(seed)
        u[i] = torch.rand(1, dtype=torch.float64, generator=generator, device=probs.device)
    # right=True: a token of zero probability (its cdf equal to the one before) is never chosen.
    return torch.searchsorted(cdf, u * cdf[:, -1:], right=True).squeeze(1).clamp_(max=probs.shape[1] - 1)
