"""min_tokens and the repetition, frequency and presence penalties on a batch's logits (the
sampler's steps 2-3; a Triton kernel on CUDA). The token counts they read are kept on the
device by engine/token_histograms.py."""
import torch

from nanovllm import kernels
from nanovllm.layers.sampling_metadata import SamplingMetadata

# Penalised logits saturate here. Later steps divide by the temperature (>= 0.01, so x 100)
# and subtract two logits (x 2): from 2^120 that stays below float32's maximum (~2^128), so
# no +-inf, and no inf - inf = NaN, can reach the cut-offs or the draw.
LOGIT_LIMIT = 2.0 ** 120


def apply_min_tokens_and_penalties(logits: torch.Tensor, meta: SamplingMetadata, fused: bool = False) -> torch.Tensor:
    """Steps 2-3: min_tokens' bans, then the penalties (a Triton kernel when `fused`)."""
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


def apply_penalties(logits: torch.Tensor, meta: SamplingMetadata) -> torch.Tensor:
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
