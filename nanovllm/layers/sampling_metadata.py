"""What the sampler needs to know about a batch, as tensors: `SamplingMetadata`, built from
one `SamplingRow` per sequence (its SamplingParams and, when sampling reads them, its token
ids). Built on the host once per batch composition and sent to the device in a few copies;
the sampler (layers/sampler.py) then runs without reading anything back.
"""
import itertools
from collections.abc import Collection
from dataclasses import dataclass

import numpy as np
import torch

from nanovllm.sampling_params import SamplingParams


def to_device(host: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Copy without waiting: through pinned memory, so the copy does not wait for the work
    already queued on the GPU (a pageable copy can), which would stall a pipelined step."""
    if device.type != "cuda":
        return host.to(device)
    return host.pin_memory().to(device, non_blocking=True)


def uses_penalties(params: SamplingParams) -> bool:
    return params.repetition_penalty != 1.0 or params.frequency_penalty != 0.0 or params.presence_penalty != 0.0


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
    repetition_penalty: torch.Tensor | None   # [B]; None when no row uses it
    frequency_penalty: torch.Tensor | None    # [B] } None when no row uses
    presence_penalty: torch.Tensor | None     # [B] } either
    output_counts: torch.Tensor | None        # [B, V] float32: occurrences in the output (any penalty)
    prompt_mask: torch.Tensor | None          # [B, V] bool: occurs in the prompt (repetition only)
    count_rows: torch.Tensor | None           # [B] int64: if set, the two above are tables with a
                                              # row per sequence and row i of the batch is count_rows[i]
    min_tokens_rows: torch.Tensor | None      # [M] int64 } logits[rows, ids] = -inf: the EOS/stop ids
    min_tokens_ids: torch.Tensor | None       # [M] int64 } of rows still short of min_tokens
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
        use_top_k = any(top_ks)
        use_top_p = any(p.top_p < 1.0 for p in ps)
        use_min_p = any(p.min_p > 0.0 for p in ps)

        # Penalties. Token histograms are built on the device from flat id lists (sending the
        # ids is far cheaper than building B x V tensors on the host), and only over the rows
        # that use a penalty: the prompt only for the repetition penalty.
        uses_rep = [p.repetition_penalty != 1.0 for p in ps]
        uses_freq_pres = [p.frequency_penalty != 0.0 or p.presence_penalty != 0.0 for p in ps]
        rep = freq = pres = output_counts = prompt_mask = count_rows = None
        if token_counts is not None and (any(uses_rep) or any(uses_freq_pres)):
            # (rows without a penalty get their real counts here: their neutral penalty
            # values leave the logits unchanged)
            output_counts, prompt_mask, count_rows = token_counts
        elif any(uses_rep) or any(uses_freq_pres):
            output_counts = _token_counts([r.output_token_ids if u or v else []
                                           for r, u, v in zip(rows, uses_rep, uses_freq_pres)], V, device)
            if any(uses_rep):
                prompt_mask = _token_counts([r.prompt_token_ids if u else []
                                             for r, u in zip(rows, uses_rep)], V, device) > 0
        if any(uses_rep):
            rep = tensor([float(p.repetition_penalty) for p in ps])
        if any(uses_freq_pres):
            freq = tensor([float(p.frequency_penalty) for p in ps])
            pres = tensor([float(p.presence_penalty) for p in ps])

        # min_tokens: until a row has min_tokens outputs it must not stop, so its stop ids and
        # (unless ignore_eos, where they do not stop anyway) every EOS id are banned.
        mt_rows, mt_ids = [], []
        for i, r in enumerate(rows):
            if len(r.output_token_ids) < r.params.min_tokens:
                ids = set(r.params.stop_token_ids)
                if not r.params.ignore_eos:
                    ids.update(r.eos_ids)
                ids = sorted(t for t in ids if 0 <= t < V)
                mt_rows += [i] * len(ids)
                mt_ids += ids

        seeded_rows = [i for i, (p, g) in enumerate(zip(ps, greedy)) if p.seed is not None and not g]
        logprobs = [p.logprobs for p in ps if p.logprobs is not None]

        return cls(
            temperature=temperature,
            greedy=tensor(greedy, torch.bool),
            all_greedy=all(greedy),
            all_random=not any(greedy),
            top_k=tensor(top_ks, torch.int64) if use_top_k else None,
            max_top_k=max(top_ks, default=0),
            top_p=tensor([float(p.top_p) for p in ps]) if use_top_p else None,
            top_p_within_top_k=all(k > 0 for k, p in zip(top_ks, ps) if p.top_p < 1.0),
            min_p=tensor([float(p.min_p) for p in ps]) if use_min_p else None,
            repetition_penalty=rep, frequency_penalty=freq, presence_penalty=pres,
            output_counts=output_counts, prompt_mask=prompt_mask, count_rows=count_rows,
            min_tokens_rows=tensor(mt_rows, torch.int64) if mt_rows else None,
            min_tokens_ids=tensor(mt_ids, torch.int64) if mt_rows else None,
            seeded_rows=seeded_rows,
            max_num_logprobs=max(logprobs) if logprobs else None,
        )


def _token_counts(id_lists: list[list[int]], V: int, device: torch.device) -> torch.Tensor:
    """[B, V] float32: how often each id in [0, V) occurs in each list."""
    flat = flat_token_indices(range(len(id_lists)), id_lists, V, device)
    counts = torch.zeros(len(id_lists), V, dtype=torch.float32, device=device)
    counts.view(-1).index_add_(0, flat, torch.ones(flat.shape, device=device))
    return counts


def flat_token_indices(rows, id_lists: list[list[int]], V: int, device: torch.device) -> torch.Tensor:
    """Indices row * V + id into a flattened [rows, V] table of every id in each row's list;
    ids outside [0, V) (which the model cannot produce, so never penalised) are dropped."""
    # np.fromiter is ~4x faster than torch.tensor(list) for the long flat id lists here.
    ids = np.fromiter(itertools.chain.from_iterable(id_lists), dtype=np.int64, count=sum(map(len, id_lists)))
    starts = np.repeat(np.array(rows, dtype=np.int64) * V, [len(x) for x in id_lists])
    keep = (ids >= 0) & (ids < V)
    return to_device(torch.from_numpy(starts[keep] + ids[keep]), device)
