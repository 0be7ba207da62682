"""LLM.beam_search (nanovllm/beam_search.py): against transformers' beam search where no EOS is in
play; against a brute-force enumeration, and a reference on transformers' logprobs, where EOS
completes beams; the beams' shared KV blocks; outputs, prompt forms and errors."""
import functools
import math

import pytest
import torch

from nanovllm import LLM, SamplingParams
from nanovllm.beam_search import BeamSearch, BeamSearchOutput, get_beam_search_score
from nanovllm.sampling_params import BeamSearchParams
from tests.conftest import random_prompts

EOS = 2     # the tiny checkpoints' EOS (the tokenizer's <|im_end|>)


@pytest.fixture(scope="module")
def llm(tiny_qwen3):
    return LLM(tiny_qwen3, device="cpu")


@pytest.fixture(scope="module")
def vocab4(checkpoint_factory):
    """A model of 4 tokens, EOS among them: it ends often, and every continuation can be enumerated."""
    return checkpoint_factory("qwen3", vocab_size=4)


@pytest.fixture(scope="module")
def vocab8(checkpoint_factory):
    return checkpoint_factory("qwen3", vocab_size=8)


@pytest.fixture(scope="module")
def llm8(vocab8):
    return LLM(vocab8, device="cpu")


@functools.cache
def hf_model(path):
    from transformers import AutoModelForCausalLM
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)


def hf_next_logprobs(model, sequences: list[list[int]]) -> list[list[float]]:
    """transformers' next-token logprobs after each sequence (all of one length), in float32."""
    with torch.no_grad():
        logits = model(torch.tensor(sequences)).logits[:, -1].float()
    return torch.log_softmax(logits, dim=-1).tolist()


def vllm_score(prompt, generated, cum_logprob, length_penalty):
    """vLLM's ranking score, written out: the length counts the prompt and leaves out a final EOS."""
    length = len(prompt) + len(generated) - (generated[-1] == EOS)
    return cum_logprob / length ** length_penalty


def generated(seq, prompt):
    assert seq.tokens[:len(prompt)] == prompt
    return seq.tokens[len(prompt):]


# -- no EOS in play: transformers' beam search ----------------------------------------------

@pytest.mark.parametrize("model, beam_width, max_tokens, length_penalty", [
    ("tiny", 4, 8, 1.0),
    ("tiny", 2, 6, 0.5),
    ("vocab8", 3, 7, 2.0),
])
def test_equals_transformers_without_eos(request, model, beam_width, max_tokens, length_penalty, monkeypatch):
    """The stopping rules, aligned: with ignore_eos here and eos_token_id=None in transformers, no
    hypothesis ends before max_tokens. transformers then finalises its best num_beams running
    beams at the last step (its early stopping only weighs running beams against finished ones,
    and there are none before), and vLLM's rule completes the beam_width live beams after
    max_tokens steps: the same sequences, all of one length, so any length penalty ranks them by
    cumulative logprob in both. transformers' sequences_scores are that over
    max_tokens ** length_penalty (its length counts the generated tokens).

    The vocab8 model makes token 0, which it produces all the time, its EOS: ignore_eos must
    let beams run through it (transformers sees an ordinary token)."""
    if model == "tiny":
        path, llm, vocab = request.getfixturevalue("tiny_qwen3"), request.getfixturevalue("llm"), 400
    else:
        path, llm, vocab = request.getfixturevalue("vocab8"), request.getfixturevalue("llm8"), 8
        monkeypatch.setattr(llm.llm_engine, "eos_token_id", 0)
    prompts = random_prompts(2, 5, 30, vocab=vocab, seed=beam_width)
    params = BeamSearchParams(beam_width=beam_width, max_tokens=max_tokens, ignore_eos=True,
                              length_penalty=length_penalty)
    outputs = llm.beam_search(prompts, params)
    assert len(outputs) == len(prompts) and all(isinstance(o, BeamSearchOutput) for o in outputs)
    for prompt, output in zip(prompts, outputs):
        with torch.no_grad():
            ref = hf_model(path).generate(
                torch.tensor([prompt]), num_beams=beam_width, num_return_sequences=beam_width, do_sample=False,
                max_new_tokens=max_tokens, eos_token_id=None, length_penalty=length_penalty, early_stopping=True,
                output_scores=True, return_dict_in_generate=True)
        assert [generated(s, prompt) for s in output.sequences] == [row[len(prompt):] for row in ref.sequences.tolist()]
        for seq, ref_score in zip(output.sequences, ref.sequences_scores.tolist()):
            assert seq.cum_logprob == pytest.approx(ref_score * max_tokens ** length_penalty, abs=1e-4)
            assert seq.finish_reason == "length" and seq.stop_reason is None
    if model == "vocab8":
        assert any(0 in generated(s, p) for p, o in zip(prompts, outputs) for s in o.sequences)


# -- EOS in play: brute force -----------------------------------------------------------------

def every_ending(model, prompt: list[int], steps: int) -> list[tuple[list[int], float]]:
    """Every way a search of `steps` tokens can end (at an EOS, or after `steps` tokens without
    one), with its cumulative logprob: all continuations, enumerated."""
    open_, ended = [([], 0.0)], []
    for _ in range(steps):
        rows = hf_next_logprobs(model, [prompt + tokens for tokens, _ in open_])
        grown = []
        for (tokens, cum), row in zip(open_, rows):
            for token, logprob in enumerate(row):
                (ended if token == EOS else grown).append((tokens + [token], cum + logprob))
        open_ = grown
    return ended + open_


def test_exhaustive_case_equals_brute_force(vocab4):
    """With 4 tokens and beam_width 10, every beam proposes every token (2 x 10 >= 4), and the
    3 x 3 = 9 live beams of step 2 all fit in the beam: nothing is pruned before the last step,
    where the best 10 by cumulative logprob, all of one length, are kept: the best by score of
    theirs too. The search is then exhaustive, and its result is the best 10 by vLLM's score
    of ALL endings (EOS at step 1, 2 or 3, or 3 tokens without EOS)."""
    llm = LLM(vocab4, device="cpu")
    prompts = [[3, 1, 3, 0, 3], [0, 3, 3, 1, 1, 0, 3, 1, 3, 0, 0, 3]]
    endings = [every_ending(hf_model(vocab4), prompt, 3) for prompt in prompts]
    assert all(len(e) == 1 + 3 + 9 + 27 for e in endings)
    for length_penalty in (1.0, 2.5, -1.0):
        params = BeamSearchParams(beam_width=10, max_tokens=3, length_penalty=length_penalty)
        for prompt, output, ends in zip(prompts, llm.beam_search(prompts, params), endings):
            best = sorted(ends, key=lambda e: vllm_score(prompt, e[0], e[1], length_penalty), reverse=True)[:10]
            got = [generated(s, prompt) for s in output.sequences]
            assert got == [tokens for tokens, _ in best]
            assert any(tokens[-1] == EOS for tokens in got) and any(EOS not in tokens for tokens in got)
            for seq, (tokens, cum) in zip(output.sequences, best):
                assert seq.cum_logprob == pytest.approx(cum, abs=1e-4)
                ended = tokens[-1] == EOS
                assert (seq.finish_reason, seq.stop_reason) == (("stop", EOS) if ended else ("length", None))
                # Each token's logprob is in its step's entry; they add up to cum_logprob.
                chosen = [entry[token].logprob for entry, token in zip(seq.logprobs, tokens)]
                assert seq.cum_logprob == pytest.approx(sum(chosen), abs=1e-9)


def reference_beam_search(model, prompt, beam_width, steps, length_penalty):
    """vLLM's rules on transformers' whole distributions: each beam proposes its best
    2 x beam_width tokens; EOS proposals are completed, the best beam_width others live on."""
    live, completed = [([], 0.0)], []
    for _ in range(steps):
        rows = hf_next_logprobs(model, [prompt + tokens for tokens, _ in live])
        proposals = []
        for (tokens, cum), row in zip(live, rows):
            for token in sorted(range(len(row)), key=lambda t: row[t], reverse=True)[:2 * beam_width]:
                (completed if token == EOS else proposals).append((tokens + [token], cum + row[token]))
        live = sorted(proposals, key=lambda p: p[1], reverse=True)[:beam_width]
    completed += live
    completed.sort(key=lambda e: vllm_score(prompt, e[0], e[1], length_penalty), reverse=True)
    return completed[:beam_width]


@pytest.mark.parametrize("beam_width, length_penalty", [(2, 1.0), pytest.param(3, 0.5, marks=pytest.mark.slow)])
def test_pruning_case_equals_reference(vocab8, llm8, beam_width, length_penalty):
    """8 tokens, 6 steps: beams are pruned at every step and a beam proposes only its best
    2 x beam_width tokens; several prompts of different lengths in one search."""
    prompts = random_prompts(3, 3, 20, vocab=8, seed=7)
    params = BeamSearchParams(beam_width=beam_width, max_tokens=6, length_penalty=length_penalty)
    finished_by_eos = 0
    for prompt, output in zip(prompts, llm8.beam_search(prompts, params)):
        ref = reference_beam_search(hf_model(vocab8), prompt, beam_width, 6, length_penalty)
        assert [generated(s, prompt) for s in output.sequences] == [tokens for tokens, _ in ref]
        for seq, (_, cum) in zip(output.sequences, ref):
            assert seq.cum_logprob == pytest.approx(cum, abs=1e-4)
        finished_by_eos += sum(s.finish_reason == "stop" for s in output.sequences)
    assert finished_by_eos, "no returned beam ended at EOS: the case does not test EOS"


# -- KV blocks --------------------------------------------------------------------------------

def test_beams_share_blocks_and_free_them(tiny_qwen3):
    """From step 2 on, every request finds the prompt's blocks, and every earlier full block of
    its tokens, in the prefix cache: beams with equal tokens in a full block hold the same block
    (the prompt's blocks are held by all the beams of a step at once), and only each beam's last
    block is computed. At the end every block is free again."""
    block_size, beam_width, max_tokens = 4, 3, 7
    llm = LLM(tiny_qwen3, device="cpu", block_size=block_size)
    bm = llm.llm_engine.block_manager
    prompt = random_prompts(1, 18, 18, seed=11)[0]          # 4 full blocks and 2 tokens
    allocations = []            # per request: its tokens, block table, cached tokens, holders of its blocks
    allocate = bm.allocate

    def recording_allocate(seq):
        ok = allocate(seq)
        if ok:
            allocations.append((list(seq.token_ids), list(seq.block_table), seq.num_cached_tokens,
                                [bm.blocks[b].ref_count for b in seq.block_table]))
        return ok

    bm.allocate = recording_allocate
    outputs = llm.beam_search([prompt], BeamSearchParams(beam_width=beam_width, max_tokens=max_tokens,
                                                         ignore_eos=True))
    assert len(outputs[0].sequences) == beam_width
    # Step 1 is the prompt alone, computed; then beam_width requests a step.
    assert len(allocations) == 1 + (max_tokens - 1) * beam_width
    assert allocations[0][2] == 0
    prompt_blocks = allocations[0][1][:len(prompt) // block_size]
    for tokens, table, cached, _ in allocations[1:]:
        full = (len(tokens) - 1) // block_size              # the blocks a request can find cached
        assert cached == full * block_size, "a full block of the beam was computed again"
        assert table[:len(prompt_blocks)] == prompt_blocks
    for step in range(1, max_tokens):
        requests = allocations[1 + (step - 1) * beam_width:1 + step * beam_width]
        assert {len(tokens) for tokens, *_ in requests} == {len(prompt) + step}
        # The last request of a step sees the prompt's blocks held by all the step's beams.
        assert requests[-1][3][:len(prompt_blocks)] == [beam_width] * len(prompt_blocks)
    blocks_of = {}                                           # a full block's tokens (and all before) -> block ids
    for tokens, table, _, _ in allocations:
        for j in range((len(tokens) - 1) // block_size):
            blocks_of.setdefault(tuple(tokens[:(j + 1) * block_size]), set()).add(table[j])
    assert all(len(ids) == 1 for ids in blocks_of.values()), "equal prefixes in different blocks"
    assert any(len(prefix) > len(prompt) for prefix in blocks_of), "no block of generated tokens was shared"
    assert bm.num_free_blocks == bm.num_blocks and all(b.ref_count == 0 for b in bm.blocks)
    assert not llm.llm_engine.has_unfinished_requests()


# -- outputs, prompt forms, limits ------------------------------------------------------------

def test_outputs_and_text(llm8):
    tokenizer = llm8.get_tokenizer()
    ids = random_prompts(1, 8, 8, vocab=8, seed=3)[0]
    params = BeamSearchParams(beam_width=3, max_tokens=6)
    seqs = llm8.beam_search([ids], params)[0].sequences
    assert any(s.finish_reason == "stop" for s in seqs), "no beam ended at EOS"
    for seq in seqs:
        assert len(seq.logprobs) == len(seq.tokens) - len(ids)
        assert all(len(entry) == 2 * 3 for entry in seq.logprobs)      # the proposals of its steps
        ended = seq.finish_reason == "stop"
        assert seq.tokens[-1] == EOS if ended else EOS not in seq.tokens[len(ids):]
        # text: prompt and completion, without the completing EOS's text.
        assert seq.text == tokenizer.decode(seq.tokens[:-1] if ended else seq.tokens)
    with_stop = llm8.beam_search([ids], BeamSearchParams(beam_width=3, max_tokens=6, include_stop_str_in_output=True))
    for seq, plain in zip(with_stop[0].sequences, seqs):
        assert seq.tokens == plain.tokens
        assert seq.text == tokenizer.decode(seq.tokens)
        assert (seq.text != plain.text) == (seq.finish_reason == "stop")


def test_prompt_forms(llm):
    tokenizer = llm.get_tokenizer()
    text = "Hello, my name is"
    ids = tokenizer.encode(text)
    params = BeamSearchParams(beam_width=2, max_tokens=3)
    by_ids = [(s.tokens, s.cum_logprob) for s in llm.beam_search([ids], params)[0].sequences]
    assert all(tokens[:len(ids)] == ids for tokens, _ in by_ids)
    for form in (text, [text], ids, {"prompt_token_ids": ids}, [{"prompt": text}]):
        outputs = llm.beam_search(form, params)
        assert len(outputs) == 1
        assert [(s.tokens, s.cum_logprob) for s in outputs[0].sequences] == by_ids


def test_scores_rank_the_output(llm8):
    prompt = random_prompts(1, 6, 6, vocab=8, seed=4)[0]
    for length_penalty in (0.0, 1.0, 3.0):
        seqs = llm8.beam_search([prompt], BeamSearchParams(beam_width=4, max_tokens=5,
                                                           length_penalty=length_penalty))[0].sequences
        scores = [get_beam_search_score(s.tokens, s.cum_logprob, EOS, length_penalty) for s in seqs]
        assert scores == sorted(scores, reverse=True)
        assert scores == [vllm_score(prompt, generated(s, prompt), s.cum_logprob, length_penalty) for s in seqs]


def test_concurrency_limit_and_order(llm):
    prompts = random_prompts(3, 4, 12, seed=21)
    params = BeamSearchParams(beam_width=2, max_tokens=3, ignore_eos=True)
    together = llm.beam_search(prompts, params)
    one_by_one = llm.beam_search(prompts, params, concurrency_limit=1)
    assert [[s.tokens for s in o.sequences] for o in together] == [[s.tokens for s in o.sequences] for o in one_by_one]
    assert [o.sequences[0].tokens[:len(p)] for o, p in zip(together, prompts)] == prompts
    assert llm.beam_search([], params) == []


def test_driven_one_request_at_a_time(llm):
    """BeamSearch, driven as a server would drive it (each request on its own), searches as
    LLM.beam_search does."""
    prompts = random_prompts(2, 4, 12, seed=5)
    params = BeamSearchParams(beam_width=2, max_tokens=3, ignore_eos=True)
    search = BeamSearch(prompts, params, llm.llm_engine.eos_ids, llm.llm_engine.config.max_model_len)
    steps = 0
    while not search.done:
        search.advance([llm.generate(p, search.step_params, use_tqdm=False)[0] for p in search.next_prompts()])
        steps += 1
    assert steps == 3
    driven = search.outputs(llm.get_tokenizer())
    assert [[(s.tokens, s.text) for s in o.sequences] for o in driven] == \
           [[(s.tokens, s.text) for s in o.sequences] for o in llm.beam_search(prompts, params)]


def test_stops_at_max_model_len(tiny_qwen3):
    llm = LLM(tiny_qwen3, device="cpu", max_model_len=20)
    prompt = random_prompts(1, 17, 17, seed=2)[0]
    seqs = llm.beam_search([prompt], BeamSearchParams(beam_width=2, max_tokens=10, ignore_eos=True))[0].sequences
    assert [len(s.tokens) for s in seqs] == [20, 20]
    assert all(s.finish_reason == "length" for s in seqs)


def test_temperature_adds_the_sampled_token(llm):
    """With a temperature the engine samples a token, which joins a beam's proposals when it is
    not among its best 2 x beam_width (the logprobs are of the raw distribution either way)."""
    prompt = random_prompts(1, 6, 6, seed=8)[0]
    seqs = llm.beam_search([prompt], BeamSearchParams(beam_width=2, max_tokens=6, ignore_eos=True,
                                                      temperature=2.0))[0].sequences
    entries = [entry for seq in seqs for entry in seq.logprobs]
    assert all(len(entry) in (4, 5) for entry in entries)
    assert any(len(entry) == 5 for entry in entries), "at temperature 2 some draw should fall outside the top 4"
    for seq in seqs:
        chosen = [entry[token].logprob for entry, token in zip(seq.logprobs, generated(seq, prompt))]
        assert seq.cum_logprob == pytest.approx(sum(chosen), abs=1e-9)


@pytest.mark.parametrize("kwargs, field", [
    (dict(beam_width=0, max_tokens=4), "beam_width"),
    (dict(beam_width=11, max_tokens=4), "beam_width"),
    (dict(beam_width=2.0, max_tokens=4), "beam_width"),
    (dict(beam_width=True, max_tokens=4), "beam_width"),
    (dict(beam_width=2, max_tokens=0), "max_tokens"),
    (dict(beam_width=2, max_tokens=None), "max_tokens"),
    (dict(beam_width=2, max_tokens=4, ignore_eos=1), "ignore_eos"),
    (dict(beam_width=2, max_tokens=4, include_stop_str_in_output="yes"), "include_stop_str_in_output"),
    (dict(beam_width=2, max_tokens=4, temperature=-0.5), "temperature"),
    (dict(beam_width=2, max_tokens=4, temperature=2.5), "temperature"),
    (dict(beam_width=2, max_tokens=4, temperature="0"), "temperature"),
    (dict(beam_width=2, max_tokens=4, length_penalty=math.inf), "length_penalty"),
    (dict(beam_width=2, max_tokens=4, length_penalty=10 ** 400), "length_penalty"),
])
def test_bad_params_name_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field) as info:
        BeamSearchParams(**kwargs)
    assert info.value.parameter == field


def test_bad_calls_leave_the_engine_clean(llm):
    params = BeamSearchParams(beam_width=2, max_tokens=2)
    with pytest.raises(ValueError, match="params must be a BeamSearchParams"):
        llm.beam_search(["Hello"], SamplingParams())
    with pytest.raises(ValueError, match="concurrency_limit"):
        llm.beam_search(["Hello"], params, concurrency_limit=0)
    with pytest.raises(ValueError, match="out of vocabulary"):
        llm.beam_search([[5, 6], [1, 2, 10 ** 6]], params)
    with pytest.raises(ValueError, match="lora_request"):
        llm.beam_search(["Hello"], params, lora_request=object())
    assert not llm.llm_engine.has_unfinished_requests()
    bm = llm.llm_engine.block_manager
    assert bm.num_free_blocks == bm.num_blocks
