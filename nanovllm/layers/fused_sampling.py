"""The sampler's draw on CUDA, in Triton kernels: the min-p/top-k/top-p cut-offs found without
sorting (kernels/sampling_filters.py), then one Gumbel-max pass over the vocabulary
(kernels/gumbel_sample.py). Same distribution as the torch steps of layers/sampler.py, which
the tests compare it with."""
import torch

from nanovllm import kernels
from nanovllm.device_copy import to_device


def fused_sample(logits: torch.Tensor, meta, row_seeds: torch.Tensor | None) -> torch.Tensor:
    """One token per row of `logits` (after min_tokens and penalties), as Sampler.forward's."""
    logits = logits.contiguous()
    if meta.all_greedy:
        return kernels.greedy_sample(logits)
    thresholds = None
    if meta.top_k is not None or meta.top_p is not None or meta.min_p is not None:
        thresholds = kernels.sampling_thresholds(logits, meta.temperature, meta.top_k, meta.top_p, meta.min_p)
    # Unless given, the seed comes from torch's global generator (torch.manual_seed rules).
    seed = to_device(row_seeds, logits.device) if row_seeds is not None else int(torch.randint(0, 2**62, ()))
    return kernels.gumbel_sample(logits, meta.temperature, meta.greedy, seed, thresholds)
