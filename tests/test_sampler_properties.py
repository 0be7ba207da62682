"""Property test of the sampler: any valid SamplingParams, extremes included (the smallest
float32 top_p and min_p, top_k 1 and the whole vocabulary, penalties at their bounds, a
repetition penalty from the smallest to the largest float32, temperatures around the greedy
threshold), through the torch sampler and the fused one (Triton kernels; in the interpreter
without CUDA) never raises, and always returns a token of the vocabulary that the filters
kept. A tiny vocabulary and few examples keep it fast."""
import pytest
import torch
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from nanovllm.kernels import triton_available
from nanovllm.layers.penalties import apply_penalties
from nanovllm.layers.sampler import Sampler, apply_temperature_and_filters
from nanovllm.layers.sampling_metadata import SamplingMetadata, SamplingRow
from nanovllm.sampling_params import SamplingParams
from tests.conftest import KERNEL_DEVICE

V = 40
EOS = 2
SMALLEST = 1e-45        # float32's smallest positive value (a subnormal) rounds from this
LARGEST = 3.4e38        # just below float32's largest


def extremes_or(values, strategy):
    """The listed extremes often, anything in between the rest of the time."""
    return st.one_of(st.sampled_from(values), strategy)


params = st.builds(
    SamplingParams,
    temperature=extremes_or([0.0, 1e-6, 9.99e-6, 1e-5, 1.0001e-5, 0.0099, 0.01, 1.0, 2.0],
                            st.floats(0.0, 2.0)),
    top_p=extremes_or([SMALLEST, 1e-30, 1e-7, 0.5, 1 - 1e-7, 1.0], st.floats(SMALLEST, 1.0)),
    top_k=extremes_or([-1, 0, 1, 2, V - 1, V, V + 5], st.integers(0, V + 5)),
    min_p=extremes_or([0.0, SMALLEST, 1e-30, 0.5, 1 - 1e-7, 1.0], st.floats(0.0, 1.0)),
    presence_penalty=extremes_or([-2.0, 0.0, 2.0], st.floats(-2.0, 2.0)),
    frequency_penalty=extremes_or([-2.0, 0.0, 2.0], st.floats(-2.0, 2.0)),
    repetition_penalty=extremes_or([SMALLEST, 1e-3, 1.0, 2.0, LARGEST], st.floats(SMALLEST, LARGEST)),
    min_tokens=st.integers(0, 3),
    # (the whole vocabulary: with min_tokens, every token is banned)
    stop_token_ids=st.one_of(st.lists(st.integers(0, V - 1), max_size=3), st.just(list(range(V)))),
    logprobs=st.none() | st.integers(0, 20),
    seed=st.none() | st.integers(-2**63, 2**63 - 1),
    ignore_eos=st.booleans(),
)

token_ids = st.lists(st.integers(0, V - 1), max_size=6)


@st.composite
def batches(draw):
    """(logits [B, V], rows): logits of a small or huge scale, with ties or without, and rows
    whose token histories make the penalties and min_tokens apply."""
    num_rows = draw(st.integers(1, 3))
    scale = draw(st.sampled_from([0.0, 1e-3, 1.0, 8.0, 1e4, 1e30]))
    generator = torch.Generator().manual_seed(draw(st.integers(0, 2**32 - 1)))
    logits = torch.randn(num_rows, V, generator=generator) * scale
    if draw(st.booleans()):
        logits = logits.round()           # ties everywhere
    rows = []
    for _ in range(num_rows):
        p = draw(params)
        rows.append(SamplingRow(p, draw(token_ids), draw(token_ids), (EOS,)))
    return logits, rows


def check(out, logits, rows, meta, near_top_p_ok: bool):
    """The tokens are in the vocabulary, not banned by min_tokens, and kept by the filters:
    greedy rows take a largest penalised logit; other rows a token the torch filters keep
    (`near_top_p_ok`: or that they keep with top_p raised by 1e-3, where the kernel's sums in
    another order may land; min-p and top-k compare the same float32 values in both)."""
    tokens = out.sampled_token_ids.cpu()
    assert tokens.shape == (len(rows),) and tokens.dtype == torch.int64
    assert ((tokens >= 0) & (tokens < V)).all(), tokens
    x = logits.float()
    penalties = meta.penalties
    if penalties is not None and penalties.min_tokens_rows is not None:
        x = x.index_put((penalties.min_tokens_rows, penalties.min_tokens_ids), torch.tensor(float("-inf")))
    if penalties is not None and penalties.output_counts is not None:
        x = apply_penalties(x, penalties)
    kept = torch.isfinite(apply_temperature_and_filters(x, meta))
    if near_top_p_ok and meta.top_p is not None:
        meta.top_p = (meta.top_p + 1e-3).clamp(max=1.0)
        kept |= torch.isfinite(apply_temperature_and_filters(x, meta))
    for i, (token, row) in enumerate(zip(tokens.tolist(), rows)):
        if not torch.isfinite(x[i]).any():
            continue                      # min_tokens banned every token: any will do
        assert torch.isfinite(x[i, token]), "a banned token was drawn"
        if row.params.is_greedy:
            assert x[i, token] == x[i].max(), (i, token)
        else:
            # the cut-offs keep at least the most likely token
            assert kept[i, x[i].argmax()], (i, row.params)
            assert kept[i, token], (i, token, row.params)
    if out.logprobs is not None:
        assert ((out.logprobs.top_ids >= 0) & (out.logprobs.top_ids < V)).all()
        assert not out.logprobs.token_logprobs.isnan().any()


def row_seeds(rows) -> torch.Tensor:
    """Per-row seeds on the host, as the engine passes them (a seeded row's from its seed)."""
    return torch.tensor([(r.params.seed or 0) % 2**62 for r in rows], dtype=torch.int64)


SETTINGS = settings(max_examples=60, deadline=None, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


@SETTINGS
@given(batches())
def test_torch_sampler_takes_any_valid_params(batch):
    logits, rows = batch
    meta = SamplingMetadata.build(rows, V, torch.device("cpu"))
    out = Sampler(fused=False)(logits, meta, row_seeds(rows))
    check(out, logits, rows, meta, near_top_p_ok=False)


@pytest.mark.skipif(not triton_available(), reason="triton is not installed")
# The interpreter (numpy) reports the float32 overflow that the penalties kernel then saturates.
@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")
# Under the interpreter, shrinking a failure would take minutes: report it as found.
@settings(SETTINGS, max_examples=12, phases=[Phase.explicit, Phase.generate])
@given(batches())
def test_fused_sampler_takes_any_valid_params(batch):
    logits, rows = batch
    device = torch.device(KERNEL_DEVICE)
    meta = SamplingMetadata.build(rows, V, device)
    out = Sampler(fused=True)(logits.to(device), meta, row_seeds(rows))
    check(out, logits, rows, SamplingMetadata.build(rows, V, torch.device("cpu")), near_top_p_ok=True)
