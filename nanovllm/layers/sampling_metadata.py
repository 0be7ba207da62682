"""What the sampler needs to know about a batch, as tensors: `SamplingMetadata`, built from
one `SamplingRow` per sequence (its SamplingParams and, when sampling reads them, its token
ids). Built on the host once per batch composition and sent to the device in a few copies;
the sampler (layers/sampler.py) then runs without reading anything back.
"""
from collections.abc import Collection
from dataclasses import dataclass

import torch

from nanovllm.device_copy import to_device
from nanovllm.layers.penalties import PenaltyInputs, uses_penalties
from nanovllm.sampling_params import SamplingParams


@dataclass
class SamplingRow:
    """What the engine knows about one sequence this step."""
    params: SamplingParams
    prompt_token_ids: list[int]
    output_token_ids: list[int]
    # The model's EOS ids (the tokenizer's and any further ones config.json lists): they stop
    # the request unless ignore_eos, so min_tokens bans them.
    eos_ids: Collection[int] = ()

    @classmethod
    def of(cls, params: SamplingParams, token_ids: list[int], num_prompt_tokens: int,
           eos_ids: Collection[int] = (), counts_kept: bool = False) -> "SamplingRow":
        """A row for a sequence's tokens. The token lists are copied only for rows that read
        them (min_tokens; penalties unless `counts_kept`: the caller passes the histograms to
        build): copying every sequence's tokens every step would dominate a large batch's
        host time."""
        if not (params.min_tokens or (uses_penalties(params) and not counts_kept)):
            return cls(params, [], [], eos_ids)
        return cls(params, token_ids[:num_prompt_tokens], token_ids[num_prompt_tokens:], eos_ids)


@dataclass
class SamplingMetadata:
    """Per-step sampling tensors for a batch of B rows over a vocabulary of V.

    Optional tensors are None when no row of the batch uses that step, which is how the
    sampler knows to skip it.
    """
    temperature: torch.Tensor                 # [B] float32; 1.0 on greedy rows
    greedy: torch.Tensor                      # [B] bool
    all_greedy: bool
    all_random: bool
    top_k: torch.Tensor | None                # [B] int64; 0 = off
    max_top_k: int                            # largest k in use (so topk() needs no host sync)
    top_p: torch.Tensor | None                # [B] float32; 1.0 = off
    top_p_within_top_k: bool                  # every row using top-p also uses top-k
    min_p: torch.Tensor | None                # [B] float32; 0.0 = off
    penalties: PenaltyInputs | None           # min_tokens' bans and the penalties (layers/penalties.py)
    seeded_rows: list[int]                    # random rows of seeded requests (they need row seeds)
    max_num_logprobs: int | None              # max `logprobs` over rows; None if no row asked

    @classmethod
    def build(cls, rows: list[SamplingRow], vocab_size: int, device: torch.device,
              token_counts: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None) -> "SamplingMetadata":
        """`token_counts`: (output counts [N, V], prompt masks [N, V], the batch's rows in them
        [B]) where the caller keeps them (engine/token_histograms.py, updated in place, so
        the metadata stays valid from step to step); else they are built from the rows' ids."""
        V = vocab_size
        ps = [r.params for r in rows]
        greedy = [p.is_greedy for p in ps]

        def tensor(values, dtype=torch.float32):
            return to_device(torch.tensor(values, dtype=dtype), device)

        # Greedy rows keep temperature 1 so the shared division is harmless for them.
        temperature = tensor([1.0 if g else float(p.temperature) for p, g in zip(ps, greedy)])
        # top_k >= V keeps everything: treat it as off.
        top_ks = [p.top_k if 0 < p.top_k < V else 0 for p in ps]
        logprobs = [p.logprobs for p in ps if p.logprobs is not None]
        return cls(
            temperature=temperature,
            greedy=tensor(greedy, torch.bool),
            all_greedy=all(greedy),
            all_random=not any(greedy),
            top_k=tensor(top_ks, torch.int64) if any(top_ks) else None,
            max_top_k=max(top_ks, default=0),
            top_p=tensor([float(p.top_p) for p in ps]) if any(p.top_p < 1.0 for p in ps) else None,
            top_p_within_top_k=all(k > 0 for k, p in zip(top_ks, ps) if p.top_p < 1.0),
            min_p=tensor([float(p.min_p) for p in ps]) if any(p.min_p > 0.0 for p in ps) else None,
            penalties=PenaltyInputs.build(rows, V, device, token_counts),
            seeded_rows=[i for i, (p, g) in enumerate(zip(ps, greedy)) if p.seed is not None and not g],
            max_num_logprobs=max(logprobs) if logprobs else None,
        )
