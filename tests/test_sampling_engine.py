"""Sampling features end to end through LLM.generate: stops, n, seeds, logprobs."""
import math

import pytest
import torch

from nanovllm import LLM, SamplingParams
from tests.conftest import fused_sampler_llm, random_prompts


@pytest.fixture(scope="module")
def llm(tiny_qwen3):
    return LLM(tiny_qwen3, device="cpu")


@pytest.fixture(scope="module")
def hf_model(tiny_qwen3):
    from transformers import AutoModelForCausalLM
    return AutoModelForCausalLM.from_pretrained(tiny_qwen3, dtype=torch.float32)


PROMPTS = random_prompts(3, 10, 60, seed=5)


def greedy(llm, prompts, **kw):
    return llm.generate(prompts, SamplingParams(temperature=0, **kw), use_tqdm=False)


def test_stop_strings_cut_text_and_report_reason(llm):
    base = greedy(llm, PROMPTS[:1], max_tokens=30, ignore_eos=True)[0].outputs[0]
    text = base.text
    assert len(text) > 12
    stop = text[5:9]          # very likely spans a token boundary
    out = greedy(llm, PROMPTS[:1], max_tokens=30, ignore_eos=True, stop=[stop])[0].outputs[0]
    cut = text.find(stop)
    assert out.text == text[:cut] and out.finish_reason == "stop" and out.stop_reason == stop
    assert base.token_ids[:len(out.token_ids)] == out.token_ids    # tokens up to the one completing the stop
    kept = greedy(llm, PROMPTS[:1], max_tokens=30, ignore_eos=True, stop=stop,
                  include_stop_str_in_output=True)[0].outputs[0]
    assert kept.text == text[:cut + len(stop)]


def test_stop_token_ids_and_min_tokens(llm):
    base = greedy(llm, PROMPTS[:1], max_tokens=20, ignore_eos=True)[0].outputs[0]
    tok = base.token_ids[3]
    out = greedy(llm, PROMPTS[:1], max_tokens=20, ignore_eos=True, stop_token_ids=[tok])[0].outputs[0]
    first = base.token_ids.index(tok)
    assert out.token_ids == base.token_ids[:first + 1]            # the stop token is kept in the ids
    assert out.finish_reason == "stop" and out.stop_reason == tok
    # min_tokens=8 bans the stop token from the first 8 tokens (indices 0-7): the earliest it
    # can stop is at the 9th.
    late = greedy(llm, PROMPTS[:1], max_tokens=20, ignore_eos=True, stop_token_ids=[tok], min_tokens=8)[0].outputs[0]
    assert len(late.token_ids) > 8 and tok not in late.token_ids[:8]
    # The exact boundary: with min_tokens=first the stop token may come right at index first
    # (greedy picks it there, as in base); with min_tokens=first+1 it may not.
    assert first >= 1
    at = greedy(llm, PROMPTS[:1], max_tokens=20, ignore_eos=True, stop_token_ids=[tok], min_tokens=first)[0].outputs[0]
    assert at.token_ids == base.token_ids[:first + 1] and at.stop_reason == tok
    after = greedy(llm, PROMPTS[:1], max_tokens=20, ignore_eos=True, stop_token_ids=[tok],
                   min_tokens=first + 1)[0].outputs[0]
    assert after.token_ids[:first] == base.token_ids[:first] and after.token_ids[first] != tok


def test_n_completions_share_the_prompt(llm):
    params = SamplingParams(n=3, temperature=1.0, seed=11, max_tokens=12, ignore_eos=True)
    out = llm.generate(PROMPTS[:1], params, use_tqdm=False)[0]
    assert [c.index for c in out.outputs] == [0, 1, 2]
    assert len({tuple(c.token_ids) for c in out.outputs}) > 1
    # Child i uses seed + i: child 1 of seed 11 equals child 0 of seed 12.
    alone = llm.generate(PROMPTS[:1], SamplingParams(temperature=1.0, seed=12, max_tokens=12, ignore_eos=True),
                         use_tqdm=False)[0]
    assert alone.outputs[0].token_ids == out.outputs[1].token_ids


def test_n_completions_share_the_prompt_blocks(llm):
    """n=3 children of a 40-token prompt hold its full blocks once (shared, reference counted)
    and each has a block of its own for the partial last block and what it generates."""
    engine = llm.llm_engine
    block_size, manager = engine.config.block_size, engine.block_manager
    full = 40 // block_size
    assert full >= 1 and 40 % block_size       # the prompt ends in a partial block
    free_before = manager.num_free_blocks
    prompt = random_prompts(1, 40, 40, seed=9)[0]
    engine.add_request("share", prompt, SamplingParams(n=3, temperature=1.0, seed=2, max_tokens=4, ignore_eos=True))
    engine.step()                               # the prefill: all three children's blocks allocated
    tables = [seq.block_table for seq in engine.requests["share"].seqs]
    assert all(len(t) == full + 1 for t in tables)
    assert tables[0][:full] == tables[1][:full] == tables[2][:full]
    assert len({t[full] for t in tables}) == 3
    assert all(manager.blocks[b].ref_count == 3 for b in tables[0][:full])
    assert free_before - manager.num_free_blocks == full + 3
    assert [seq.num_cached_tokens for seq in engine.requests["share"].seqs[1:]] == [full * block_size] * 2
    while engine.has_unfinished_requests():
        engine.step()
    assert manager.num_free_blocks == free_before


@pytest.fixture(scope="module")
def fused_llm(tiny_qwen3):
    return fused_sampler_llm(tiny_qwen3, num_gpu_blocks_override=7, max_num_seqs=3, block_size=16)


@pytest.fixture(scope="module")
def small_cache_llm(tiny_qwen3):
    return LLM(tiny_qwen3, device="cpu", num_gpu_blocks_override=7, max_num_seqs=3, block_size=16)


@pytest.mark.parametrize("engine", ["llm", "small_cache_llm",
                                    pytest.param("fused_llm", marks=pytest.mark.slow)])   # interpreted: ~16 s
def test_seeded_requests_do_not_depend_on_the_batch(request, engine):
    """Through either sampler a seeded request's draws are keyed by its seed and the token's
    position; with a cache small enough that the mixed run preempts and recomputes too."""
    llm = request.getfixturevalue(engine)
    params = SamplingParams(temperature=0.9, top_p=0.9, seed=3, max_tokens=16, ignore_eos=True)
    alone = llm.generate(PROMPTS[:1], params, use_tqdm=False)[0].outputs[0].token_ids
    others = [SamplingParams(temperature=1.0, max_tokens=16, ignore_eos=True)] * 2
    mixed = llm.generate(PROMPTS, [params] + others, use_tqdm=False)[0].outputs[0].token_ids
    assert alone == mixed
    other_seed = llm.generate(PROMPTS[:1], SamplingParams(temperature=0.9, top_p=0.9, seed=4, max_tokens=16,
                                                          ignore_eos=True), use_tqdm=False)[0].outputs[0].token_ids
    assert other_seed != alone
    if engine != "llm":
        assert llm.llm_engine.scheduler.num_preemptions > 0


def test_top_k_1_equals_greedy(llm):
    g = greedy(llm, PROMPTS, max_tokens=10)
    k1 = llm.generate(PROMPTS, SamplingParams(temperature=1.0, top_k=1, max_tokens=10), use_tqdm=False)
    assert [o.outputs[0].token_ids for o in g] == [o.outputs[0].token_ids for o in k1]


def assert_logprobs_entry(entry, row, token, k, decode):
    """One position's {token_id: Logprob} against transformers' log-softmax `row`: the top k
    (values, ranks 1..k), plus the chosen/prompt token with vLLM's rank (the number of tokens
    at least as likely), each with the tokenizer's text of that one id."""
    top = row.topk(k)
    assert set(entry) == set(top.indices.tolist()) | {token}
    for rank, (lp, t) in enumerate(zip(top.values.tolist(), top.indices.tolist()), start=1):
        assert math.isclose(entry[t].logprob, lp, abs_tol=1e-4) and entry[t].rank == rank
    assert math.isclose(entry[token].logprob, row[token].item(), abs_tol=1e-4)
    assert entry[token].rank == int((row >= row[token]).sum())
    for t, logprob in entry.items():
        assert logprob.decoded_token == decode(t), t


def test_logprobs_match_transformers(llm, hf_model, tiny_qwen3):
    from transformers import AutoTokenizer
    tokenizer = AutoTokenizer.from_pretrained(tiny_qwen3)

    def decode(t):       # ids past the tokenizer's vocabulary (the model's is larger) have no text
        return tokenizer.decode([t]) if t < len(tokenizer) else ""

    out = llm.generate(PROMPTS[:1], SamplingParams(temperature=0.8, seed=1, max_tokens=6, ignore_eos=True,
                                                   logprobs=3, prompt_logprobs=2), use_tqdm=False)[0]
    c = out.outputs[0]
    ids = out.prompt_token_ids + c.token_ids
    with torch.no_grad():
        ref = torch.log_softmax(hf_model(torch.tensor([ids])).logits[0].float(), dim=-1)
    n_prompt = len(out.prompt_token_ids)
    total = 0.0
    for j, (token, entry) in enumerate(zip(c.token_ids, c.logprobs)):
        assert_logprobs_entry(entry, ref[n_prompt - 1 + j], token, 3, decode)
        total += entry[token].logprob
    assert math.isclose(c.cumulative_logprob, total, abs_tol=1e-4)
    assert out.prompt_logprobs[0] is None and len(out.prompt_logprobs) == n_prompt
    for i in range(1, n_prompt):
        assert_logprobs_entry(out.prompt_logprobs[i], ref[i - 1], ids[i], 2, decode)
    decoded = [lp.decoded_token for entry in c.logprobs + out.prompt_logprobs[1:] for lp in entry.values()]
    assert any(text.strip() for text in decoded)    # real texts were compared, not only ""


def test_prompt_logprobs_survive_chunked_prefill(tiny_qwen3):
    chunked = LLM(tiny_qwen3, device="cpu", max_num_batched_tokens=16, max_num_seqs=2)
    whole = LLM(tiny_qwen3, device="cpu")
    params = SamplingParams(temperature=0, max_tokens=2, prompt_logprobs=1)
    a = chunked.generate(PROMPTS[2:3], params, use_tqdm=False)[0].prompt_logprobs
    b = whole.generate(PROMPTS[2:3], params, use_tqdm=False)[0].prompt_logprobs
    assert len(a) == len(b) == len(PROMPTS[2])
    for x, y in zip(a[1:], b[1:]):
        assert x.keys() == y.keys()
        assert all(math.isclose(x[t].logprob, y[t].logprob, abs_tol=1e-4) for t in x)


def penalised_greedy_reference(model, prompt, steps, rep, freq, pres):
    """Greedy decoding with transformers' logits and the three penalties applied by hand:
    repetition over prompt + output (HF style), frequency and presence over the output."""
    ids, out = list(prompt), []
    for _ in range(steps):
        with torch.no_grad():
            logits = model(torch.tensor([ids])).logits[0, -1].clone()
        for t in set(ids):
            logits[t] = logits[t] / rep if logits[t] > 0 else logits[t] * rep
        for t in set(out):
            logits[t] -= freq * out.count(t) + pres
        out.append(int(logits.argmax()))
        ids.append(out[-1])
    return out


@pytest.mark.parametrize("options, fused", [(dict(), False), (dict(num_gpu_blocks_override=12, max_num_seqs=3), False),
                                            (dict(num_gpu_blocks_override=12, max_num_seqs=3), True)])
def test_penalties_end_to_end(tiny_qwen3, hf_model, options, fused):
    """Repetition, frequency and presence penalties over many steps, also across preemption
    (a cache too small for all sequences at once), match the reference loop; also with the
    CUDA path's one-pass penalties kernel (fused; in the interpreter here). The histograms'
    metadata is reused while the batch stays the same."""
    llm = fused_sampler_llm(tiny_qwen3, block_size=16, **options) if fused else \
        LLM(tiny_qwen3, device="cpu", block_size=16, **options)
    penalties = dict(rep=1.3, freq=0.4, pres=0.6)
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True, repetition_penalty=1.3,
                            frequency_penalty=0.4, presence_penalty=0.6)
    outs = llm.generate(PROMPTS, params, use_tqdm=False)
    expected = [penalised_greedy_reference(hf_model, p, 24, **penalties) for p in PROMPTS]
    assert [o.outputs[0].token_ids for o in outs] == expected
    plain = greedy(llm, PROMPTS, max_tokens=24, ignore_eos=True)
    assert [o.outputs[0].token_ids for o in plain] != expected      # the penalties changed something
    if options:
        assert llm.llm_engine.scheduler.num_preemptions > 0


def test_penalties_and_min_tokens_keep_steps_pipelined(llm, monkeypatch):
    """Penalties count tokens on the device, in step order, and min_tokens counts the token in
    flight, so the next step is launched before this one's tokens are read back."""
    runner = llm.llm_engine.runner
    launched_ahead, launch = [], runner.launch

    def spy(batch, eos_ids, after=None):
        launched_ahead.append(after is not None)         # launched before the last step was read back
        return launch(batch, eos_ids, after)

    monkeypatch.setattr(runner, "launch", spy)
    for extra in (dict(repetition_penalty=1.3, frequency_penalty=0.5), dict(min_tokens=4)):
        launched_ahead.clear()
        greedy(llm, PROMPTS[:2], max_tokens=12, ignore_eos=True, **extra)
        assert sum(launched_ahead) >= 10, extra


def test_seeded_row_seed_is_a_function_of_the_token_position(fused_llm):
    """The fused sampler's seed for a seeded request: the same for the same token position
    whether the step was launched ahead (its input token still being sampled) or not, after
    a prefill chunk or a decode step; different for the next position, the next completion
    and an unseeded request (fresh from the global generator)."""
    from nanovllm.engine.sampling_inputs import row_seeds
    from nanovllm.engine.scheduler import ScheduledBatch
    from nanovllm.engine.sequence import Sequence
    runner = fused_llm.llm_engine.runner

    def seed_of(seq, start, n):
        from_device = start == seq.num_tokens
        return int(row_seeds(ScheduledBatch([seq], [start], [n], [True], [from_device]))[0])

    seq = Sequence("r", 0, list(range(10)), SamplingParams(seed=7))
    draws_10 = seed_of(seq, 0, 10)                              # the prompt's last chunk
    draws_11_ahead = seed_of(seq, 10, 1)                        # launched before token 10 is read back
    seq.append_token(3)                                         # read back: token 10
    assert seed_of(seq, 10, 1) == draws_11_ahead                # token 11's seed, launched either way
    draws_12_ahead = seed_of(seq, 11, 1)
    seq.append_token(4)                                         # now read back: token 11
    assert seed_of(seq, 11, 1) == draws_12_ahead
    assert len({draws_10, draws_11_ahead, draws_12_ahead}) == 3
    sibling = Sequence("r", 1, list(range(10)), SamplingParams(seed=7))     # completion 1 of n
    assert seed_of(sibling, 0, 10) != draws_10
    unseeded = Sequence("u", 0, list(range(10)), SamplingParams())
    assert seed_of(unseeded, 0, 10) != seed_of(unseeded, 0, 10)


def test_fused_logprobs_equal_the_torch_ones(llm, fused_llm):
    """Logprobs, ranks and top tokens (sampled and prompt) from the fused path's one-pass
    logsumexp-and-rank kernel equal the torch path's."""
    params = SamplingParams(temperature=0.0, max_tokens=6, logprobs=3, prompt_logprobs=2)
    a = llm.generate(PROMPTS[:2], params, use_tqdm=False)
    b = fused_llm.generate(PROMPTS[:2], params, use_tqdm=False)
    for x, y in zip(a, b):
        assert x.outputs[0].token_ids == y.outputs[0].token_ids
        for lp_x, lp_y in zip(x.outputs[0].logprobs + x.prompt_logprobs[1:], y.outputs[0].logprobs + y.prompt_logprobs[1:]):
            assert lp_x.keys() == lp_y.keys()
            for t in lp_x:
                assert lp_x[t].rank == lp_y[t].rank
                assert abs(lp_x[t].logprob - lp_y[t].logprob) < 1e-5
