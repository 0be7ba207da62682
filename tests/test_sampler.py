"""The sampler's steps against independent references (transformers' logits processors and
direct torch computations), its sampling distribution, seeds and min_tokens (its logprobs:
test_sampler_logprobs.py)."""
import pytest
import torch
from transformers.generation.logits_process import (
    MinPLogitsWarper, RepetitionPenaltyLogitsProcessor, TemperatureLogitsWarper,
    TopKLogitsWarper, TopPLogitsWarper,
)

from nanovllm.engine.sampling_inputs import stream_seed
from nanovllm.layers.penalties import apply_penalties
from nanovllm.layers.sampler import Sampler, apply_temperature_and_filters
from nanovllm.layers.sampling_metadata import SamplingMetadata, SamplingRow
from nanovllm.sampling_params import SamplingParams
from tests.conftest import KERNEL_DEVICE as KERNEL_DEVICE_NAME

V = 64
CPU = torch.device("cpu")
KERNEL_DEVICE = torch.device(KERNEL_DEVICE_NAME)   # where Sampler(fused=True) runs its Triton kernels
NO_IDS = torch.empty(1, 0, dtype=torch.long)  # HF warpers ignore input_ids


def row(prompt=(1, 2, 3), output=(), eos=None, extra_eos=(), **kwargs) -> SamplingRow:
    eos_ids = (() if eos is None else (eos,)) + tuple(extra_eos)
    return SamplingRow(SamplingParams(**kwargs), list(prompt), list(output), eos_ids)


def meta_of(rows, vocab_size=V, device=CPU):
    return SamplingMetadata.build(rows, vocab_size, device)


def seeds_of(rows) -> torch.Tensor:
    """Row seeds as the engine makes them: a seeded row's keyed by its seed and the position of
    the token drawn (here after its prompt and output); the others' random."""
    return torch.tensor([stream_seed(r.params.seed, len(r.prompt_token_ids) + len(r.output_token_ids))
                         if r.params.seed is not None else int(torch.randint(0, 2**62, ())) for r in rows])


def sample(fused: bool, logits, rows, vocab_size=V):
    """Sampler(fused) on the device its path runs on; the output's tensors back on the CPU."""
    device = KERNEL_DEVICE if fused else CPU
    out = Sampler(fused)(logits.to(device), meta_of(rows, vocab_size, device), seeds_of(rows))
    if out.logprobs is not None:
        for name, value in vars(out.logprobs).items():
            setattr(out.logprobs, name, value.cpu())
    out.sampled_token_ids = out.sampled_token_ids.cpu()
    return out


def fixed_logits(batch, vocab_size=V, seed=0, scale=3.0):
    return torch.randn(batch, vocab_size, generator=torch.Generator().manual_seed(seed)) * scale


def hf_chain(logits_row, p: SamplingParams, min_p_last: bool = False):
    """transformers' warpers in vLLM V1's order: temperature, min-p, top-k, top-p (each warper
    works on whatever the one before left, so they compose in any order). `min_p_last`:
    generate()'s own order, min-p after top-p, which the sampler used to follow."""
    x = logits_row[None].clone()
    x = TemperatureLogitsWarper(p.temperature)(NO_IDS, x)
    if p.min_p > 0.0 and not min_p_last:
        x = MinPLogitsWarper(p.min_p)(NO_IDS, x)
    if p.top_k > 0:
        x = TopKLogitsWarper(p.top_k)(NO_IDS, x)
    if p.top_p < 1.0:
        x = TopPLogitsWarper(p.top_p)(NO_IDS, x)
    if p.min_p > 0.0 and min_p_last:
        x = MinPLogitsWarper(p.min_p)(NO_IDS, x)
    return x[0]


def assert_same_filtered(ours, ref):
    """Same tokens removed, same values for the kept ones."""
    assert torch.equal(torch.isinf(ours), torch.isinf(ref))
    kept = ~torch.isinf(ref)
    torch.testing.assert_close(ours[kept], ref[kept])


# One batch mixing every filter, each row its own settings (several rows use none).
FILTER_ROWS = [
    dict(temperature=1.0),
    dict(temperature=0.7),
    dict(temperature=1.3, top_k=5),
    dict(temperature=1.0, top_k=1),
    dict(temperature=1.0, top_k=V + 10),          # larger than the vocabulary: off
    dict(temperature=0.9, top_p=0.8),
    dict(temperature=1.0, top_p=0.3),
    dict(temperature=1.0, min_p=0.05),
    dict(temperature=0.5, min_p=0.3),
    dict(temperature=1.2, top_k=20, top_p=0.9),
    dict(temperature=0.8, top_k=30, top_p=0.95, min_p=0.02),
    dict(temperature=1.0, top_p=0.6, min_p=0.1),
]


def uses(case, *steps):
    """The case uses only (some of) these steps besides temperature."""
    return set(case) - {"temperature"} <= set(steps)


FILTER_SUBSETS = {
    "all": lambda c: True,
    "temperature": lambda c: uses(c),
    "top_k": lambda c: uses(c, "top_k"),
    "top_p": lambda c: uses(c, "top_p"),
    "min_p": lambda c: uses(c, "min_p"),
    # every top-p row also has a top-k: top-p runs on the top-k values only
    "top_p_within_top_k": lambda c: uses(c, "top_k", "top_p") and ("top_p" not in c or "top_k" in c),
}
FILTER_ROWS += [dict(temperature=0.6, top_k=40, top_p=0.5), dict(temperature=1.0, top_k=3, top_p=0.99)]


@pytest.mark.parametrize("subset", FILTER_SUBSETS)
def test_filters_match_transformers(subset):
    """Each step alone (rows using other steps dropped), and all together, in one batch."""
    rows = [row(**c) for c in FILTER_ROWS if FILTER_SUBSETS[subset](c)]
    logits = fixed_logits(len(rows))
    meta = meta_of(rows)
    assert meta.top_p_within_top_k == (subset not in ("all", "top_p"))
    ours = apply_temperature_and_filters(logits, meta)
    for i, r in enumerate(rows):
        assert_same_filtered(ours[i], hf_chain(logits[i], r.params))


def test_unused_steps_are_skipped():
    meta = meta_of([row(temperature=0.8), row(temperature=0.0)])
    assert meta.top_k is None and meta.top_p is None and meta.min_p is None
    assert meta.penalties is None and meta.max_num_logprobs is None
    assert not meta.all_greedy and not meta.all_random
    assert meta_of([row(temperature=0.0)]).all_greedy
    assert meta_of([row(temperature=0.5)]).all_random


PENALTY_CASES = [
    dict(prompt=[1, 2, 3, 3], output=[3, 4, 4, 4, 9], repetition_penalty=1.3),
    dict(prompt=[7], output=[5, 5, 6], repetition_penalty=0.8),
    dict(prompt=[10, 11], output=[11, 12, 12, 13], frequency_penalty=0.7),
    dict(prompt=[10, 11], output=[11, 12, 12, 13], presence_penalty=-1.5),
    dict(prompt=[20, 21, 22], output=[22, 23, 23, 24, 24, 24], repetition_penalty=1.5,
         frequency_penalty=0.4, presence_penalty=0.9),
    dict(prompt=[1, 2], output=[]),                      # no penalty in this row
]


@pytest.mark.parametrize("subset", [[0, 1, 5], [2, 3, 5], list(range(6))],
                         ids=["repetition", "freq_pres", "all"])
def test_penalties_match_references(subset):
    rows = [row(**PENALTY_CASES[i]) for i in subset]
    meta = meta_of(rows).penalties
    assert (meta.repetition_penalty is None) == (subset == [2, 3, 5])
    assert (meta.frequency_penalty is None) == (subset == [0, 1, 5])
    logits = fixed_logits(len(rows), seed=1)
    ours = apply_penalties(logits, meta)
    for i, r in enumerate(rows):
        p = r.params
        # repetition: transformers' processor over prompt + output
        ids = torch.tensor([r.prompt_token_ids + r.output_token_ids])
        ref = RepetitionPenaltyLogitsProcessor(p.repetition_penalty)(ids, logits[i:i + 1].clone())[0]
        # frequency / presence: direct count over the output only
        counts = torch.zeros(V)
        for t in r.output_token_ids:
            counts[t] += 1
        ref = ref - p.frequency_penalty * counts - p.presence_penalty * (counts > 0).float()
        torch.testing.assert_close(ours[i], ref)


def tv_distance(samples, probs):
    empirical = torch.bincount(samples, minlength=probs.numel()).float() / samples.numel()
    return 0.5 * (empirical - probs).abs().sum().item()


# (params, logit scale, the steps that change its distribution). Two settings in one batch,
# since with both top-p and min-p on one row, one of them usually has nothing left to remove.
DISTRIBUTION_CASES = [
    (dict(temperature=1.5, top_k=12, top_p=0.9, min_p=0.05), 1.0, ["temperature", "top_k", "top_p"]),
    (dict(temperature=1.5, top_k=12, top_p=0.95, min_p=0.3), 1.5, ["temperature", "min_p"]),
]
OFF = dict(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0)


def test_sampling_follows_processed_distribution():
    torch.manual_seed(0)
    n, vocab = 20_000, 16
    logits, rows, targets = [], [], []
    for params, scale, _ in DISTRIBUTION_CASES:
        base = fixed_logits(1, vocab, seed=2, scale=scale)[0]
        targets.append(hf_chain(base, SamplingParams(**params)).softmax(-1))
        logits.append(base.expand(n, vocab))
        rows += [row(**params) for _ in range(n)]
    out = Sampler()(torch.cat(logits), meta_of(rows, vocab))
    samples = out.sampled_token_ids
    assert samples.dtype == torch.int64 and samples.shape == (2 * n,)
    # Expected TV at n draws is about 0.01; a sampler that skips or garbles any step that
    # matters here lands at least 0.08 away.
    bound = 0.025
    for (params, scale, steps), target, part in zip(DISTRIBUTION_CASES, targets, samples.split(n)):
        assert torch.all(target[part] > 0), "a filtered token was drawn"
        assert tv_distance(part, target) < bound
        base = fixed_logits(1, vocab, seed=2, scale=scale)[0]
        for step in steps:
            wrong = hf_chain(base, SamplingParams(**dict(params, **{step: OFF[step]}))).softmax(-1)
            assert 0.5 * (wrong - target).abs().sum() > 3 * bound


def test_seeded_rows_follow_the_distribution():
    n, vocab = 4000, 8
    base = fixed_logits(1, vocab, seed=3, scale=1.0)[0]
    rows = [row(seed=i) for i in range(n)]
    samples = Sampler()(base.expand(n, vocab).clone(), meta_of(rows, vocab), seeds_of(rows)).sampled_token_ids
    assert tv_distance(samples, base.softmax(-1)) < 0.05


def test_top_k_1_equals_greedy():
    logits = fixed_logits(32, seed=4)
    rows = [row(temperature=1.5, top_k=1) for _ in range(32)]
    out = Sampler()(logits, meta_of(rows))
    assert torch.equal(out.sampled_token_ids, logits.argmax(-1))


def test_greedy_rows_in_a_mixed_batch_are_exact_argmax():
    torch.manual_seed(1)
    logits = fixed_logits(8, seed=5, scale=0.3)   # flat: random rows rarely hit the argmax
    rows = [row(temperature=0.0) if i % 2 == 0 else row(temperature=1.0, top_p=0.95)
            for i in range(8)]
    rows[2] = row(temperature=0.0, output=[int(logits[2].argmax())], repetition_penalty=2.0)
    original = logits.clone()
    out = Sampler()(logits, meta_of(rows))
    assert torch.equal(logits, original), "the caller's logits must not change"
    expected = logits.argmax(-1)
    # row 2: the penalty applies to greedy rows as well, so its argmax moves
    ids = torch.tensor([rows[2].prompt_token_ids + rows[2].output_token_ids])
    expected[2] = RepetitionPenaltyLogitsProcessor(2.0)(ids, logits[2:3].clone()).argmax()
    assert expected[2] != logits[2].argmax()
    assert torch.equal(out.sampled_token_ids[::2], expected[::2])


def run_seeded(steps_logits, seed, position, others):
    """Tokens of a seeded request (temperature 1, flat logits) over several steps, placed at
    `position` in a batch with `others` (a list of row kwargs) around it."""
    tokens = []
    for step, logits in enumerate(steps_logits):
        rows = [row(**o) for o in others]
        rows.insert(position, row(seed=seed, output=tokens))
        batch = fixed_logits(len(rows), seed=100 + step)
        batch[position] = logits
        tokens.append(int(Sampler()(batch, meta_of(rows), seeds_of(rows)).sampled_token_ids[position]))
    return tokens


def test_seeds_reproduce_alone_and_in_any_batch():
    steps = [fixed_logits(1, seed=200 + s, scale=0.5)[0] for s in range(12)]
    alone = run_seeded(steps, 1234, 0, [])
    assert run_seeded(steps, 1234, 0, []) == alone
    torch.manual_seed(99)  # the global RNG state must not matter either
    mixed = [dict(temperature=0.0), dict(temperature=0.9, top_k=7), dict(seed=5, temperature=1.0),
             dict(temperature=1.0, top_p=0.5, min_p=0.1, repetition_penalty=1.2)]
    assert run_seeded(steps, 1234, 2, mixed) == alone
    assert run_seeded(steps, 1234, 1, mixed[:1]) == alone
    assert run_seeded(steps, 4321, 0, []) != alone


@pytest.mark.parametrize("fused", [False, True])
def test_unseeded_rows_use_the_global_rng(fused):
    logits = fixed_logits(16, seed=6, scale=0.3)
    rows = [row() for _ in range(16)]
    torch.manual_seed(7)
    a = sample(fused, logits, rows).sampled_token_ids
    torch.manual_seed(7)
    b = sample(fused, logits, rows).sampled_token_ids
    c = sample(fused, logits, rows).sampled_token_ids
    assert torch.equal(a, b) and not torch.equal(a, c)


@pytest.mark.slow      # ~9 s of interpreted kernels
def test_fused_sampler_temperature_batch():
    """The fused path (Triton Gumbel-max, in the interpreter here): greedy rows are the exact
    argmax of the penalised logits, sampled rows follow softmax(logits / T)."""
    n, vocab = 600, 16
    base = fixed_logits(1, vocab, seed=8, scale=1.0)[0]
    rows = [row(temperature=0.0, output=[int(base.argmax())], repetition_penalty=3.0)]
    rows += [row(temperature=0.6) for _ in range(n)]
    logits = base.expand(n + 1, vocab).clone().to(torch.float16).to(KERNEL_DEVICE)
    original = logits.clone()
    tokens = Sampler(fused=True)(logits, meta_of(rows, vocab, KERNEL_DEVICE)).sampled_token_ids.cpu()
    assert torch.equal(logits, original), "the caller's logits must not change"
    logits = logits.cpu()
    assert tokens[0] == apply_penalties(logits[:1].float(), meta_of(rows[:1], vocab).penalties).argmax()
    assert tokens[0] != base.argmax()
    assert tv_distance(tokens[1:], (base / 0.6).softmax(-1)) < 0.06


@pytest.mark.parametrize("fused", [False, pytest.param(True, marks=pytest.mark.slow)])    # interpreted: ~10 s
def test_seeded_rows_draw_from_their_row_seed(fused):
    """On either path a seeded row's token is a function of its row seed (and logits) alone:
    the other rows and torch's global generator do not change it; a batch with a seeded row
    and no row seeds is refused."""
    logits = fixed_logits(6, seed=9, scale=0.3)
    rows = [row(temperature=0.9, seed=3)] + [row(temperature=0.9, top_k=5) for _ in range(5)]
    device = KERNEL_DEVICE if fused else CPU
    meta = meta_of(rows, V, device)
    with pytest.raises(ValueError, match="row_seeds"):
        Sampler(fused)(logits.to(device), meta)
    draws = []
    for global_seed in range(3):          # (each fused call takes ~0.5 s in the interpreter)
        torch.manual_seed(global_seed)
        seeds = torch.tensor([11] + [global_seed] * 5)
        draws.append(Sampler(fused)(logits.to(device), meta, seeds).sampled_token_ids.cpu())
    assert len({int(d[0]) for d in draws}) == 1
    assert len({tuple(d[1:].tolist()) for d in draws}) > 1
    others = [int(Sampler(fused)(logits.to(device), meta, torch.tensor([s] + [0] * 5)).sampled_token_ids[0])
              for s in range(4)]
    assert len(set(others)) > 1


def test_fused_sampler_with_filters_draws_only_kept_tokens():
    """Each row its own filters (and one greedy row): every draw is a token the torch filters keep."""
    settings = [dict(top_k=3), dict(top_p=0.5), dict(min_p=0.2), dict(top_k=10, top_p=0.6, min_p=0.05),
                dict(temperature=0.0), dict()]
    rows = [row(**dict(dict(temperature=0.9), **kw)) for kw in settings]
    logits = fixed_logits(len(rows), seed=12)
    meta = meta_of(rows)
    kept = torch.isfinite(apply_temperature_and_filters(logits, meta))
    for seed in range(3):
        torch.manual_seed(seed)
        tokens = sample(True, logits, rows).sampled_token_ids
        assert kept[torch.arange(len(rows)), tokens].all()
        assert tokens[4] == logits[4].argmax()


@pytest.mark.parametrize("fused", [False, True])
def test_min_tokens_masks_eos_and_stop_ids(fused):
    """Until min_tokens, every id that would stop the row is banned: its stop ids, EOS and the
    model's further EOS ids (the last two unless ignore_eos)."""
    eos, extra, stop_a, stop_b = 2, 11, 5, 9
    logits = fixed_logits(5, seed=8)
    logits[:, eos] = 100.0
    logits[:, extra] = 95.0
    logits[:, stop_a] = 90.0
    logits[:, stop_b] = 80.0
    common = dict(eos=eos, extra_eos=[extra])
    rows = [
        row(temperature=0.0, min_tokens=3, output=[1], stop_token_ids=[stop_a, stop_b], **common),
        row(temperature=0.0, min_tokens=3, output=[1, 1, 1], stop_token_ids=[stop_a], **common),  # done
        row(temperature=0.0, min_tokens=3, output=[], ignore_eos=True, stop_token_ids=[stop_a], **common),
        row(temperature=1.0, min_tokens=2, output=[1], stop_token_ids=[stop_a, stop_b, 10**6], **common),
        row(temperature=0.0, min_tokens=0, logprobs=2, **common),
    ]
    out = sample(fused, logits, rows)
    masked = logits.clone()
    masked[0, [eos, extra, stop_a, stop_b]] = float("-inf")
    sampled = out.sampled_token_ids.tolist()
    assert sampled[0] == int(masked[0].argmax()) and sampled[0] not in (eos, extra, stop_a, stop_b)
    assert sampled[1] == eos                    # min_tokens reached: EOS allowed again
    assert sampled[2] == eos                    # ignore_eos: EOS is not a stop, so not masked...
    assert sampled[3] not in (eos, extra, stop_a, stop_b)
    # ...while its stop id is (and the extra EOS, like EOS, is not)
    meta = meta_of(rows).penalties
    pairs = set(zip(meta.min_tokens_rows.tolist(), meta.min_tokens_ids.tolist()))
    assert pairs == {(0, eos), (0, extra), (0, stop_a), (0, stop_b), (2, stop_a),
                     (3, eos), (3, extra), (3, stop_a), (3, stop_b)}
    # logprobs stay those of the raw logits: EOS is still the top token
    assert out.logprobs.top_ids[0, 0] == eos


@pytest.mark.parametrize("fused", [False, True])
def test_top_p_below_float32_keeps_the_top_token(fused):
    """A top_p that float32 rounds to 0 (SamplingParams refuses it, but the sampler must not
    rely on that) or to its smallest value keeps only the most likely token: the torch
    filter indexed position -1 there."""
    logits = fixed_logits(3, seed=21)
    rows = [row(top_p=0.5) for _ in range(3)]
    meta = meta_of(rows, device=KERNEL_DEVICE if fused else CPU)
    meta.top_p = torch.tensor([0.0, 1e-300, 1e-45], device=meta.top_p.device)
    for seed in range(3):
        torch.manual_seed(seed)
        tokens = Sampler(fused)(logits.to(meta.top_p.device), meta).sampled_token_ids.cpu()
        assert torch.equal(tokens, logits.argmax(-1))


# The interpreter (numpy) reports the float32 overflow that the penalties kernel then saturates.
@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")
@pytest.mark.parametrize("rep", [1e-45, 3.4e38])
def test_extreme_repetition_penalty_saturates(rep):
    """A repetition penalty at float32's extremes pushes seen logits past float32's range:
    they saturate at +-LOGIT_LIMIT (finite after the temperature too), keeping their order,
    and the sampler still draws a token the filters keep."""
    from nanovllm.layers.penalties import LOGIT_LIMIT
    logits = torch.tensor([[3.0, -2.0, 1.0, -5.0, 0.5, float("-inf")]])
    r = row(prompt=[0, 1, 5], output=[2, 3], repetition_penalty=rep, temperature=0.01, top_p=0.9, min_p=0.1)
    meta = meta_of([r], vocab_size=6)
    penalised = apply_penalties(logits, meta.penalties)
    assert penalised[0, 5] == float("-inf")                       # banned stays banned
    assert torch.isfinite(penalised[0, :5]).all()
    assert penalised.abs()[0, :5].max() <= LOGIT_LIMIT
    assert torch.isfinite(penalised[0, :5] / 0.01).all()
    if rep < 1:
        assert penalised[0, 0] == LOGIT_LIMIT and penalised[0, 2] == LOGIT_LIMIT       # seen, positive
        assert penalised[0, 1] < 0 and penalised[0, 3] < 0
    else:
        assert penalised[0, 1] == -LOGIT_LIMIT and penalised[0, 3] == -LOGIT_LIMIT     # seen, negative
    filtered = apply_temperature_and_filters(penalised, meta)
    assert torch.isfinite(filtered[0, penalised[0].argmax()])     # the top token is kept
    for fused in (False, True):
        out = sample(fused, logits, [r], vocab_size=6).sampled_token_ids
        assert torch.isfinite(filtered[0, out[0]]), (fused, out)


@pytest.mark.parametrize("fused", [False, True])
def test_a_row_with_every_token_banned_still_samples(fused):
    """min_tokens with every id a stop id leaves nothing: the step must not fail (a hostile
    request must not stop the engine), and the token is still in the vocabulary."""
    vocab = 16
    logits = fixed_logits(3, vocab_size=vocab, seed=4)
    rows = [row(min_tokens=2, stop_token_ids=list(range(vocab)), **kw)
            for kw in (dict(temperature=0.0), dict(top_p=0.5, top_k=3, min_p=0.1), dict(logprobs=2))]
    out = sample(fused, logits, rows, vocab_size=vocab)
    assert ((out.sampled_token_ids >= 0) & (out.sampled_token_ids < vocab)).all()
    assert (out.logprobs.top_ids < vocab).all()
