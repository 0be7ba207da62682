"""The sort-free top-k / top-p / min-p thresholds against the torch filters that sort
(layers/sampler.py), and sampling among the tokens they keep. In Triton's CPU interpreter
without CUDA."""
import pytest
import torch

from nanovllm.kernels import triton_available
from nanovllm.layers.sampler import apply_min_p, apply_top_k_top_p
from nanovllm.sampling_params import SamplingParams

pytestmark = pytest.mark.skipif(not triton_available(), reason="triton is not installed")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def order_key(x: torch.Tensor) -> torch.Tensor:
    bits = x.float().contiguous().view(torch.int32)
    return torch.where(bits >= 0, bits, bits ^ 0x7FFFFFFF)


def reference_kept(logits, temperature, top_k, top_p, min_p):
    """The torch sampler's filters (temperature, top-k, top-p, min-p) -> kept mask."""
    from nanovllm.layers.sampling_metadata import SamplingMetadata, SamplingRow
    rows = [SamplingRow(SamplingParams(temperature=t, top_k=k, top_p=p, min_p=m), [], [], None)
            for t, k, p, m in zip(temperature, top_k, top_p, min_p)]
    meta = SamplingMetadata.build(rows, logits.shape[1], torch.device("cpu"))
    x = logits / meta.temperature[:, None]
    if meta.top_k is not None or meta.top_p is not None:
        x = apply_top_k_top_p(x, meta)
    if meta.min_p is not None:
        x = apply_min_p(x, meta.min_p)
    return torch.isfinite(x), meta


CASES = [  # temperature, top_k, top_p, min_p
    (1.0, 5, 1.0, 0.0), (0.7, 1, 1.0, 0.0), (1.0, 0, 0.9, 0.0), (1.3, 0, 0.3, 0.0), (0.5, 20, 0.8, 0.0),
    (1.0, 0, 1.0, 0.1), (0.9, 8, 0.95, 0.05), (1.0, 0, 0.999, 0.0), (2.0, 99, 1.0, 0.0), (1.0, 3, 0.01, 0.0),
    (1.0, 2100, 0.9, 0.0),   # k above the kernel's 2048 lanes; >= a small vocab
    (0.8, 0, 0.95, 0.0),     # logits rounded to integers: ties everywhere, within lanes too
    (0.8, 40, 0.95, 0.0),    # the same ties, top-k then top-p
    (1.0, 30, 0.7, 0.0),     # half the row -inf (as min_tokens or penalties may leave it)
    (0.8, 0, 0.95, 0.0),     # the same -inf row, top-p alone
    (0.6, 300, 0.9, 0.0),    # a top-k larger than the lanes' kept keys hold (small lane counts)
]


def make_logits(vocab, dtype):
    gen = torch.Generator().manual_seed(vocab)
    logits = torch.randn(len(CASES), vocab, generator=gen) * 3
    logits[0, :10] = logits[0, 10]                    # ties at the top-k boundary are kept
    logits[11:13] = logits[11:13].round()
    logits[13:15, ::2] = float("-inf")
    return logits.to(dtype)


# The kernel keeps each lane's 4 largest keys. With 2048 lanes the small rows here fit in them
# (the threshold comes from registers); with 16 or 32 lanes each lane holds dozens of tokens
# and the search passes over the row do the work, as with a real vocabulary.
@pytest.mark.parametrize("vocab, dtype, lanes", [
    (100, torch.float32, 2048), (2500, torch.float32, 2048),      # one tile; several, the last partial
    (700, torch.float16, 2048),                                   # 16-bit keys (as bf16 on the GPU)
    (700, torch.float16, 16), (600, torch.float32, 32),           # many tokens per lane
])
def test_thresholds_keep_what_the_sorting_filters_keep(vocab, dtype, lanes, monkeypatch):
    from nanovllm.kernels import sampling_filters, sampling_thresholds
    monkeypatch.setattr(sampling_filters, "BLOCK", lanes)
    logits = make_logits(vocab, dtype)
    t, k, p, m = (list(c) for c in zip(*CASES))
    kept, meta = reference_kept(logits.float(), t, k, p, m)
    keys = sampling_thresholds(logits.to(DEVICE), meta.temperature.to(DEVICE),
                               None if meta.top_k is None else meta.top_k.to(DEVICE),
                               None if meta.top_p is None else meta.top_p.to(DEVICE),
                               None if meta.min_p is None else meta.min_p.to(DEVICE)).cpu()
    ours = order_key(logits) >= keys[:, None]
    for row in range(len(CASES)):
        if not torch.equal(ours[row], kept[row]):
            assert _on_top_p_knife_edge(logits[row], CASES[row], ours[row] ^ kept[row]), \
                (CASES[row], int(ours[row].sum()), int(kept[row].sum()))


@pytest.mark.parametrize("lanes", [16, 2048])
def test_each_filter_alone(lanes, monkeypatch):
    """top-k only, top-p only, min-p only batches (the kernel skips what no row uses)."""
    from nanovllm.kernels import sampling_filters, sampling_thresholds
    monkeypatch.setattr(sampling_filters, "BLOCK", lanes)
    logits = make_logits(300, torch.float16)[[0, 2, 11, 13]]
    temperature = torch.tensor([1.0, 0.7, 0.8, 1.2])
    for top_k, top_p, min_p in [([5, 1, 40, 7], None, None), (None, [0.9, 0.5, 0.95, 0.8], None),
                                (None, None, [0.1, 0.02, 0.3, 0.05])]:
        kept, meta = reference_kept(logits.float(), temperature.tolist(), top_k or [0] * 4, top_p or [1.0] * 4,
                                    min_p or [0.0] * 4)
        keys = sampling_thresholds(logits.to(DEVICE), meta.temperature.to(DEVICE),
                                   None if top_k is None else meta.top_k.to(DEVICE),
                                   None if top_p is None else meta.top_p.to(DEVICE),
                                   None if min_p is None else meta.min_p.to(DEVICE)).cpu()
        ours = order_key(logits) >= keys[:, None]
        assert torch.equal(ours, kept), (top_k, top_p, min_p, ours.sum(-1), kept.sum(-1))


def _on_top_p_knife_edge(row, case, differ) -> bool:
    """Whether the filters part only on one token whose top-p decision is within float32
    rounding: the mass of the tokens more likely than it is within 1e-5 of top_p (exactly,
    in float64). Sums in a different order may land it on either side."""
    temperature, top_k, top_p, min_p = case
    if top_p >= 1.0 or top_k or min_p or int(differ.sum()) != 1:
        return False
    probs = torch.softmax(row.double() / temperature, -1)
    token = int(differ.nonzero())
    mass_before = float(probs[probs > probs[token]].sum())
    return abs(mass_before - top_p) < 1e-5


def test_sampling_draws_only_kept_tokens_in_proportion():
    from nanovllm.kernels import gumbel_sample, sampling_thresholds
    gen = torch.Generator().manual_seed(3)
    row = torch.randn(24, generator=gen) * 2
    draws = 600
    logits = row.expand(draws, -1).contiguous().to(DEVICE)
    temperature = torch.full((draws,), 0.8, device=DEVICE)
    # the rows are all alike: one row's threshold serves them all (the interpreter is slow)
    keys = sampling_thresholds(logits[:1], temperature[:1], None, torch.full((1,), 0.7, device=DEVICE), None)
    keys = keys.expand(draws).contiguous()
    tokens = gumbel_sample(logits, temperature, torch.zeros(draws, dtype=torch.bool, device=DEVICE), 5, keys).cpu()
    kept, _ = reference_kept(row[None], [0.8], [0], [0.7], [0.0])
    assert kept[0][tokens].all(), "a filtered-out token was drawn"
    expected = torch.where(kept[0], row / 0.8, float("-inf")).softmax(-1)
    freq = torch.bincount(tokens, minlength=24).float() / draws
    assert 0.5 * (freq - expected).abs().sum() < 0.07
    assert int(kept[0].sum()) > 2                      # the test has something to get wrong
