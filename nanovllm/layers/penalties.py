"""min_tokens and the repetition, frequency and presence penalties on a batch's logits (the
sampler's steps 2-3; a Triton kernel on CUDA): what they read (`PenaltyInputs`, part of the
batch's SamplingMetadata) and how they apply. The token counts they read are kept on the device
by engine/token_histograms.py."""
import itertools
from dataclasses import dataclass

import numpy as np
import torch

from nanovllm import kernels
from nanovllm.device_copy import to_device
from nanovllm.sampling_params import SamplingParams

# Penalised logits saturate here. Later steps divide by the temperature (>= 0.01, so x 100)
# and subtract two logits (x 2): from 2^120 that stays below float32's maximum (~2^128), so
# no +-inf, and no inf - inf = NaN, can reach the cut-offs or the draw.
LOGIT_LIMIT = 2.0 ** 120


def uses_penalties(params: SamplingParams) -> bool:
    return params.repetition_penalty != 1.0 or params.frequency_penalty != 0.0 or params.presence_penalty != 0.0


@dataclass
class PenaltyInputs:
    """A batch's penalties and min_tokens bans, as tensors; None where no row uses one."""
    repetition_penalty: torch.Tensor | None   # [B]; None when no row uses it
    frequency_penalty: torch.Tensor | None    # [B] } None when no row uses
    presence_penalty: torch.Tensor | None     # [B] } either
    output_counts: torch.Tensor | None        # [B, V] float32: occurrences in the output (any penalty)
    prompt_mask: torch.Tensor | None          # [B, V] bool: occurs in the prompt (repetition only)
    count_rows: torch.Tensor | None           # [B] int64: if set, the two above are tables with a
                                              # row per sequence and row i of the batch is count_rows[i]
    min_tokens_rows: torch.Tensor | None      # [M] int64 } logits[rows, ids] = -inf: the EOS/stop ids
    min_tokens_ids: torch.Tensor | None       # [M] int64 } of rows still short of min_tokens

    @classmethod
    def build(cls, rows: list, V: int, device: torch.device,
              token_counts: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None) -> "PenaltyInputs | None":
        """From the batch's SamplingRows (see SamplingMetadata.build for `token_counts`); None
        when no row uses a penalty or min_tokens."""
        ps = [r.params for r in rows]

        def tensor(values, dtype=torch.float32):
            return to_device(torch.tensor(values, dtype=dtype), device)

        # Token histograms are built on the device from flat id lists (sending the ids is far
        # cheaper than building B x V tensors on the host), and only over the rows that use a
        # penalty: the prompt only for the repetition penalty.
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
        if output_counts is None and not mt_rows:
            return None
        return cls(rep, freq, pres, output_counts, prompt_mask, count_rows,
                   tensor(mt_rows, torch.int64) if mt_rows else None,
                   tensor(mt_ids, torch.int64) if mt_rows else None)


def apply_min_tokens_and_penalties(logits: torch.Tensor, meta: PenaltyInputs | None, fused: bool = False
                                   ) -> torch.Tensor:
    """Steps 2-3: min_tokens' bans, then the penalties (a Triton kernel when `fused`)."""
    if meta is None:
        return logits
    if meta.min_tokens_rows is not None:
        logits = logits.index_put((meta.min_tokens_rows, meta.min_tokens_ids), logits.new_full((), float("-inf")))
    if meta.output_counts is not None:
        if fused:
            logits = kernels.apply_penalties(logits.contiguous(), meta.output_counts, meta.prompt_mask,
                                             meta.repetition_penalty, meta.frequency_penalty,
                                             meta.presence_penalty, meta.count_rows, limit=LOGIT_LIMIT)
        else:
            logits = apply_penalties(logits, meta)
    return logits


def apply_penalties(logits: torch.Tensor, meta: PenaltyInputs) -> torch.Tensor:
    counts, prompt_mask = meta.output_counts, meta.prompt_mask
    if meta.count_rows is not None:
        counts, prompt_mask = counts[meta.count_rows], prompt_mask[meta.count_rows]
    penalised = logits
    if meta.repetition_penalty is not None:
        # Repetition (HF): a seen token's logit moves toward "less likely" whatever its sign.
        seen = prompt_mask | (counts > 0)
        rep = torch.where(seen, meta.repetition_penalty[:, None], 1.0)
        penalised = torch.where(penalised > 0, penalised / rep, penalised * rep)
    if meta.frequency_penalty is not None:
        # Frequency and presence (OpenAI): subtract per occurrence, and once if present.
        penalised = penalised - meta.frequency_penalty[:, None] * counts
        penalised = penalised - meta.presence_penalty[:, None] * (counts > 0)
    # Saturate rather than overflow (a banned token's -inf stays -inf).
    return torch.where(logits == float("-inf"), logits, penalised.clamp(-LOGIT_LIMIT, LOGIT_LIMIT))


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
