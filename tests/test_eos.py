"""EOS, the model's further EOS ids and stop token ids through the engine: where generation
stops, what it reports, and how min_tokens holds them back. The tiny test model never emits
its real EOS, so the tests make a token it does produce greedily the EOS (or an extra one)."""
import pytest

from nanovllm import LLM, SamplingParams
from tests.conftest import fused_sampler_llm, random_prompts

PROMPT = random_prompts(1, 10, 60, seed=5)[0]


@pytest.fixture(scope="module")
def llm(tiny_qwen3):
    return LLM(tiny_qwen3, device="cpu")


@pytest.fixture(scope="module")
def fused_llm(tiny_qwen3):
    return fused_sampler_llm(tiny_qwen3)


def greedy(llm, **kwargs):
    return llm.generate([PROMPT], SamplingParams(temperature=0, **kwargs), use_tqdm=False)[0].outputs[0]


def test_eos_stops_generation(llm, monkeypatch):
    base = greedy(llm, max_tokens=20, ignore_eos=True)
    # The EOS: a token greedy first produces at index 2 or later (so min_tokens can hold it back).
    first = next(i for i, t in enumerate(base.token_ids) if i >= 2 and t not in base.token_ids[:i])
    eos = base.token_ids[first]
    monkeypatch.setattr(llm.llm_engine, "eos_token_id", eos)

    out = greedy(llm, max_tokens=20)
    assert out.token_ids == base.token_ids[:first + 1]          # EOS ends it and stays in the ids...
    assert out.finish_reason == "stop" and out.stop_reason is None
    assert out.text == greedy(llm, max_tokens=first, ignore_eos=True).text   # ...but not in the text

    # ignore_eos: EOS is an ordinary token, generation runs on to max_tokens.
    on = greedy(llm, max_tokens=20, ignore_eos=True)
    assert on.token_ids == base.token_ids and on.finish_reason == "length" and eos in on.token_ids

    # min_tokens holds EOS back for the first min_tokens tokens, exactly: with min_tokens=first
    # greedy still stops at index first; with first + 1 it cannot.
    at = greedy(llm, max_tokens=20, min_tokens=first)
    assert at.token_ids == base.token_ids[:first + 1] and at.finish_reason == "stop"
    held = greedy(llm, max_tokens=20, min_tokens=first + 1)
    assert held.token_ids[:first] == base.token_ids[:first]
    assert eos not in held.token_ids[:first + 1] and len(held.token_ids) > first + 1
    if held.finish_reason == "stop":
        assert held.token_ids[-1] == eos and held.stop_reason is None


@pytest.mark.parametrize("engine", ["llm", "fused_llm"])
def test_extra_eos_ids_stop_and_are_held_back_by_min_tokens(request, engine, monkeypatch):
    """The further EOS ids of the model's config (e.g. Llama-3-Instruct's) stop generation,
    reported by id (vLLM merges them into stop_token_ids), and min_tokens masks them like EOS,
    on the torch sampler and on the fused one."""
    llm = request.getfixturevalue(engine)
    base = greedy(llm, max_tokens=12, ignore_eos=True)
    extra = base.token_ids[0]
    monkeypatch.setattr(llm.llm_engine, "extra_eos_ids", {extra})

    out = greedy(llm, max_tokens=12)
    assert out.token_ids == [extra] and out.finish_reason == "stop" and out.stop_reason == extra
    held = greedy(llm, max_tokens=12, min_tokens=3)
    assert extra not in held.token_ids[:3] and len(held.token_ids) > 3
    # With ignore_eos they are no stop, so nothing is masked.
    assert greedy(llm, max_tokens=12, min_tokens=3, ignore_eos=True).token_ids == base.token_ids


def test_out_of_vocabulary_stop_token_ids_are_refused_and_the_engine_serves_on(llm):
    engine = llm.llm_engine
    vocab = engine.vocab_size
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    expected = greedy(llm, max_tokens=6, ignore_eos=True).token_ids
    engine.add_request("running", PROMPT, params)
    engine.step()                                               # its prefill: it is running now
    for bad in (vocab, 10**9, -1):
        with pytest.raises(ValueError) as info:
            engine.add_request("bad", PROMPT, SamplingParams(max_tokens=4, stop_token_ids=[3, bad]))
        assert f"stop_token_ids contains {bad}, which is out of vocabulary" in str(info.value)
        assert info.value.parameter == "stop_token_ids"
    assert set(engine.requests) == {"running"}
    outputs = []
    while engine.has_unfinished_requests():
        outputs += [o for o in engine.step() if o.finished]
    assert [o.outputs[0].token_ids for o in outputs] == [expected]
    # the highest id in the vocabulary is fine; LLM.generate refuses the bad one and serves on
    assert greedy(llm, max_tokens=6, ignore_eos=True, stop_token_ids=[vocab - 1]).token_ids == expected
    with pytest.raises(ValueError, match="out of vocabulary"):
        llm.generate([PROMPT, PROMPT], [params, SamplingParams(stop_token_ids=[vocab])], use_tqdm=False)
    assert not engine.has_unfinished_requests()
    assert greedy(llm, max_tokens=6, ignore_eos=True).token_ids == expected
