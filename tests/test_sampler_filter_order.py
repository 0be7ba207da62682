"""The order of the sampler's filters: vLLM V1's, min-p before top-k and top-p, so top-p's
nucleus is of the distribution renormalised over what min-p (and top-k) keep. transformers'
generate() applies min-p after top-p; a request combining them keeps more tokens there. On
the torch path and the fused one (Triton; in the interpreter on a CPU)."""
import pytest
import torch

from nanovllm.layers.sampler import apply_temperature_and_filters
from nanovllm.sampling_params import SamplingParams
from tests.test_sampler import V, assert_same_filtered, hf_chain, meta_of, row, sample


def head_and_tail(vocab_size, seed):
    """A row with a head of 5 likely tokens (logits 2.0 down to 0.0) over a tail of tokens
    around -2.0, each below the min-p cuts of ORDER_ROWS but together about a third of the
    probability: top-p over the whole row keeps more of the head than top-p over what min-p
    keeps."""
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(vocab_size, generator=gen) * 0.3 - 2.0
    logits[torch.randperm(vocab_size, generator=gen)[:5]] = torch.tensor([2.0, 1.6, 1.0, 0.5, 0.0])
    return logits


# (params, whether vLLM's order keeps fewer tokens than transformers' on a head_and_tail row)
ORDER_ROWS = [
    (dict(temperature=1.0, top_p=0.8, min_p=0.1), True),             # 3 tokens kept, not 5
    (dict(temperature=0.8, top_p=0.7, min_p=0.05), True),
    (dict(temperature=1.0, top_k=10, top_p=0.8, min_p=0.1), True),   # min-p's cut above top-k's
    (dict(temperature=1.2, top_k=3, top_p=0.9, min_p=0.2), False),   # top-k's cut above min-p's
]


@pytest.mark.parametrize("within_top_k", [False, True])
def test_min_p_comes_before_top_p_as_in_vllm(within_top_k):
    """Top-p takes its nucleus over what min-p (and top-k) keep, as vLLM V1: here that keeps
    fewer tokens than transformers' order (top-p, then min-p) would. `within_top_k`: only the
    rows with a top-k, so top-p runs on the top-k values, which must be taken after min-p."""
    cases = [(c, d) for c, d in ORDER_ROWS if "top_k" in c or not within_top_k]
    rows = [row(**c) for c, _ in cases]
    logits = torch.stack([head_and_tail(V, seed=i) for i in range(len(rows))])
    meta = meta_of(rows)
    assert meta.top_p_within_top_k == within_top_k
    ours = apply_temperature_and_filters(logits, meta)
    for i, (r, (_, differs)) in enumerate(zip(rows, cases)):
        assert_same_filtered(ours[i], hf_chain(logits[i], r.params))
        transformers_order = hf_chain(logits[i], r.params, min_p_last=True)
        assert torch.equal(torch.isinf(ours[i]), torch.isinf(transformers_order)) != differs


@pytest.mark.slow
def test_fused_sampler_applies_min_p_before_top_p():
    """The fused path (Triton thresholds, float16 logits) draws only from vLLM's nucleus: over
    150 draws, transformers' order would draw a token outside it with probability > 1 - 2e-7."""
    n = 150
    params = dict(temperature=1.0, top_p=0.8, min_p=0.1)
    base = head_and_tail(V, seed=0).to(torch.float16)
    kept = torch.isfinite(hf_chain(base.float(), SamplingParams(**params)))
    transformers_probs = hf_chain(base.float(), SamplingParams(**params), min_p_last=True).softmax(-1)
    assert transformers_probs[~kept].sum() > 0.1      # (1 - 0.1)^150 < 2e-7
    torch.manual_seed(0)
    tokens = sample(True, base.expand(n, V).contiguous(), [row(**params) for _ in range(n)]).sampled_token_ids
    assert kept[tokens].all(), "a token outside vLLM's nucleus was drawn"
    assert len(set(tokens.tolist())) == int(kept.sum()) == 3
