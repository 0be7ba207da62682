"""The sort-free top-k / top-p / min-p thresholds against the torch filters that sort
(layers/sampler.py), and sampling among the tokens they keep. In Triton's CPU interpreter
without CUDA."""
import pytest
import torch

from nanovllm.kernels import triton_available
from nanovllm.layers.sampler import apply_min_p, apply_temperature_and_filters, apply_top_k_top_p
from nanovllm.sampling_params import SamplingParams

pytestmark = pytest.mark.skipif(not triton_available(), reason="triton is not installed")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def order_key(x: torch.Tensor) -> torch.Tensor:
    bits = x.float().contiguous().view(torch.int32)
    return torch.where(bits >= 0, bits, bits ^ 0x7FFFFFFF)


def reference_kept(logits, temperature, top_k, top_p, min_p):
    """The torch sampler's filters (temperature, min-p, top-k, top-p) -> kept mask."""
    from nanovllm.layers.sampling_metadata import SamplingMetadata, SamplingRow
    rows = [SamplingRow(SamplingParams(temperature=t, top_k=k, top_p=p, min_p=m), [], [])
            for t, k, p, m in zip(temperature, top_k, top_p, min_p)]
    meta = SamplingMetadata.build(rows, logits.shape[1], torch.device("cpu"))
    return torch.isfinite(apply_temperature_and_filters(logits, meta)), meta


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
    (100, torch.float32, 2048),                                   # one tile
    pytest.param(2500, torch.float32, 2048, marks=pytest.mark.slow),  # several, the last partial
    (700, torch.float16, 2048),                                   # 16-bit keys (as bf16 on the GPU)
    # many tokens per lane (slow under the interpreter: in CI's slow run)
    pytest.param(700, torch.float16, 16, marks=pytest.mark.slow),
    pytest.param(600, torch.float32, 32, marks=pytest.mark.slow),
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


def thresholds(logits, meta):
    """sampling_thresholds on DEVICE for the rows of `meta` (its filters no row uses: None)."""
    from nanovllm.kernels import sampling_thresholds
    top_k, top_p, min_p = (None if t is None else t.to(DEVICE) for t in (meta.top_k, meta.top_p, meta.min_p))
    return sampling_thresholds(logits.to(DEVICE), meta.temperature.to(DEVICE), top_k, top_p, min_p).cpu()


def head_and_tail(vocab, dtype):
    """Two rows: a head of 5 (row 0) or 120 (row 1) tokens with logits 2.0 down to 0.0, over a
    tail around -2.5 that min-p mostly removes but that holds 78% (row 0) or 11% (row 1) of
    the probability."""
    gen = torch.Generator().manual_seed(7)
    rows = []
    for head in (5, 120):
        row = torch.randn(vocab, generator=gen) * 0.3 - 2.5
        row[torch.randperm(vocab, generator=gen)[:head]] = torch.linspace(2.0, 0.0, head)
        rows.append(row)
    return torch.stack(rows).to(dtype)


# temperature, top_k, top_p, min_p, head_and_tail row, whether vLLM's order (top-p over what
# min-p and top-k keep) keeps other tokens than transformers' (min-p after top-p)
ORDER_CASES = [
    (1.0, 0, 0.8, 0.1, 0, True),        # 3 kept, not 5: top-p's mass from the kept keys alone
    (1.0, 0, 0.8, 0.02, 1, True),       # 72, not 91: ~9 tokens >= the cut per lane at 16 lanes
    (0.9, 300, 0.8, 0.02, 1, True),     # min-p's cut above top-k's
    (1.0, 50, 0.8, 0.02, 1, False),     # top-k's cut above min-p's: the order does not matter
    (1.0, 3, 0.9, 0.2, 0, False),
    (0.8, 10, 0.7, 0.1, 0, False),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("lanes", [pytest.param(16, marks=pytest.mark.slow), 2048])     # 16: slow under the interpreter
def test_top_p_takes_the_mass_min_p_and_top_k_keep(dtype, lanes, monkeypatch):
    """vLLM's order: top-p's nucleus is of the distribution renormalised over the tokens
    min-p and top-k keep. With 16 lanes, row 1 has more than 4 such tokens in some lane, so
    the kernel takes their mass from an extra pass; row 0 has at most 3 in every lane, and
    their mass comes from the kept keys."""
    from nanovllm.kernels import sampling_filters
    monkeypatch.setattr(sampling_filters, "BLOCK", lanes)
    vocab = 700
    table = head_and_tail(vocab, dtype)
    logits = table[[c[4] for c in ORDER_CASES]]
    t, k, p, m = ([c[i] for c in ORDER_CASES] for i in range(4))
    kept, meta = reference_kept(logits.float(), t, k, p, m)
    # transformers' order: top-k, top-p over the whole row, then min-p
    x = logits.float() / meta.temperature[:, None]
    transformers_kept = torch.isfinite(apply_min_p(apply_top_k_top_p(x, meta), meta.min_p))
    base, _ = reference_kept(logits.float(), t, k, [1.0] * len(t), m)     # min-p and top-k only
    per_lane = [int(torch.bincount(row.nonzero()[:, 0] % 16, minlength=16).max()) for row in base]
    assert max(per_lane[i] for i, c in enumerate(ORDER_CASES) if c[4] == 0) <= 3
    assert min(per_lane[i] for i, c in enumerate(ORDER_CASES) if c[4] == 1) >= 4
    ours = order_key(logits) >= thresholds(logits, meta)[:, None]
    for row, case in enumerate(ORDER_CASES):
        assert torch.equal(ours[row], kept[row]), (case, int(ours[row].sum()), int(kept[row].sum()))
        assert torch.equal(kept[row], transformers_kept[row]) != case[5], case


def test_min_p_cut_on_16_bit_keys(monkeypatch):
    """Min-p's float32 cut as a 16-bit key: of two neighbouring float16 values around the cut,
    the one above it is kept and the one below is not, whichever of them the cut rounds to;
    with min-p alone, and as top-p's base. min_p 1.0 at a maximum of 0: +0.0 and -0.0 are
    both at the cut, and both kept."""
    from nanovllm.kernels import sampling_filters
    spacing = 2.0 ** -9                                   # between float16 values in [-4, -2)
    low = -2.30078125                                     # a float16 value; low + spacing is too
    rows, params = [], []
    for fraction, temperature in [(0.3, 1.0), (0.7, 1.0), (0.3, 0.5), (0.7, 0.5)]:
        cut = low + fraction * spacing                    # nearest float16: low (0.3), low + spacing (0.7)
        row = torch.full((40,), -10.0)
        row[[3, 17, 21, 30]] = torch.tensor([0.0, -0.5, low, low + spacing])
        rows.append(row)
        params.append((temperature, float(torch.tensor(cut / temperature).exp())))
    zeros = torch.full((40,), -10.0)
    zeros[[5, 9]] = torch.tensor([0.0, -0.0])
    rows.append(zeros)
    params.append((1.0, 1.0))
    logits = torch.stack(rows).to(torch.float16)
    t, m = [p[0] for p in params], [p[1] for p in params]
    for lanes in (16, 2048):
        monkeypatch.setattr(sampling_filters, "BLOCK", lanes)
        for top_p in (1.0, 0.999):
            kept, meta = reference_kept(logits.float(), t, [0] * len(t), [top_p] * len(t), m)
            assert kept.sum(-1).tolist() == [3, 3, 3, 3, 2]      # low is out, low + spacing in
            ours = order_key(logits) >= thresholds(logits, meta)[:, None]
            assert torch.equal(ours, kept), (lanes, top_p, ours.sum(-1), kept.sum(-1))


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


@pytest.mark.slow      # ~9 s of interpreted kernels
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


def test_extreme_settings_keep_the_top_token():
    """Whatever the settings, the cut-off keeps the most likely token (and its ties), as the
    torch filters do: top_p 0 or float32's smallest, min_p 1, top_k 1, together, over logits
    at the sampler's saturation limit and over a row that min_tokens banned entirely (which
    keeps everything: there is no top token to prefer)."""
    from nanovllm.layers.penalties import LOGIT_LIMIT
    gen = torch.Generator().manual_seed(5)
    base = torch.randn(50, generator=gen) * 3
    base[[7, 30]] = base.max() + 1                           # a tie at the top
    saturated = torch.where(base > 0, LOGIT_LIMIT, -LOGIT_LIMIT)
    saturated[[7, 30]] = LOGIT_LIMIT
    saturated[3] = float("-inf")
    banned = torch.full((50,), float("-inf"))
    settings = [  # temperature, top_k, top_p, min_p
        (1.0, 0, 0.0, 0.0), (0.01, 0, 1e-45, 0.0), (2.0, 0, 0.0, 1.0), (1.0, 1, 1e-45, 1.0),
        (0.01, 1, 1.0, 0.0), (0.01, 0, 1.0, 1.0), (0.5, 3, 1e-45, 1e-45),
    ]
    for row in (base, saturated, banned):
        logits = row.expand(len(settings), -1).contiguous()
        t, k, p, m = (torch.tensor([s[i] for s in settings]) for i in range(4))
        keys = sampling_thresholds_of(logits, t, k.long(), p, m)
        kept = order_key(logits) >= keys[:, None]
        if torch.isfinite(row).any():
            top = row == row.max()
            assert torch.equal(kept, top.expand_as(kept)), (kept.sum(-1), top.sum())
        else:
            assert kept.all()


def sampling_thresholds_of(logits, temperature, top_k, top_p, min_p):
    from nanovllm.kernels import sampling_thresholds
    return sampling_thresholds(logits.to(DEVICE), temperature.to(DEVICE), top_k.to(DEVICE), top_p.to(DEVICE),
                               min_p.to(DEVICE)).cpu()
