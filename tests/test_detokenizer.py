import pytest

from nanovllm.demo_model import build_tokenizer
from nanovllm.engine.detokenizer import make_detokenizer
from nanovllm.sampling_params import SamplingParams

TEXT = "Hello, my name is nanovllm. Prefix caching lets requests share é 漢字 🙂 blocks."


@pytest.fixture(autouse=True, params=["rust-decoder", "tokenizer.decode"])
def decode_path(request, monkeypatch):
    """Every test runs with the direct call of the Rust decoder and with tokenizer.decode
    (what tokenizers that clean up spaces, or slow ones, use)."""
    if request.param == "tokenizer.decode":
        monkeypatch.setattr("nanovllm.engine.detokenizer._decoder", lambda tok, p: lambda ids: tok.decode(
            ids, skip_special_tokens=p.skip_special_tokens,
            spaces_between_special_tokens=p.spaces_between_special_tokens))
    return request.param


def test_the_direct_decoder_agrees_with_tokenizer_decode(tok, ids, prompt, decode_path):
    from nanovllm.engine.detokenizer import _decoder
    for skip in (True, False):
        decode = _decoder(tok, SamplingParams(skip_special_tokens=skip))
        for window in (ids, prompt + ids, prompt[-3:], ids[:1], []):
            assert decode(window) == tok.decode(window, skip_special_tokens=skip)


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer()


@pytest.fixture(scope="module")
def ids(tok):
    return tok.encode(TEXT)


@pytest.fixture(scope="module")
def prompt(tok):
    return tok.encode("<|im_start|>user\nIntroduce yourself:<|im_end|>\n<|im_start|>assistant\n")


def feed(det, ids, chunk=1, stopped_by_token=False):
    """Feed ids in chunks; returns (the stop string, if any, and the chunk index it came at)."""
    for start in range(0, len(ids), chunk):
        last = start + chunk >= len(ids)
        stop = det.update(ids[start:start + chunk], stopped_by_token and last)
        if stop is not None:
            return stop, start // chunk
    return None, None


@pytest.mark.parametrize("chunk", [1, 3, 100])
def test_incremental_text_equals_full_decode(tok, ids, prompt, chunk):
    assert tok.decode(ids) == TEXT
    det = make_detokenizer(tok, SamplingParams(), prompt, incremental=True)
    seen = []
    for start in range(0, len(ids), chunk):
        assert det.update(ids[start:start + chunk], False) is None
        seen.append(det.text)
        # multi-byte characters split over tokens are held back, never shown half-done
        assert "\ufffd" not in det.text and TEXT.startswith(det.text)
    assert det.text == TEXT
    assert det.token_ids == ids
    full = make_detokenizer(tok, SamplingParams(), prompt, incremental=False)
    for start in range(0, len(ids), chunk):
        full.update(ids[start:start + chunk], False)
    assert full.text == TEXT and full.token_ids == ids


def test_stop_string_across_tokens(tok, ids, prompt):
    stop = "nanovllm. Pre"
    pieces = [tok.decode([i]) for i in ids]
    assert stop not in pieces and not any(stop in p for p in pieces)   # it spans several tokens
    # the index of the token that completes the stop string
    completes = next(i for i in range(len(ids)) if stop in tok.decode(ids[:i + 1]))
    for include in (False, True):
        det = make_detokenizer(tok, SamplingParams(stop=["zzz", stop], include_stop_str_in_output=include),
                          prompt, incremental=False)    # stop strings force incremental decoding
        found, at = feed(det, ids)
        assert found == stop and at == completes
        cut = TEXT.index(stop) + (len(stop) if include else 0)
        assert det.text == TEXT[:cut]
        assert det.token_ids == ids[:completes + 1]     # every generated token is kept


def test_stop_string_found_inside_a_chunk(tok, ids, prompt):
    det = make_detokenizer(tok, SamplingParams(stop=["requests", "ll"]), prompt, incremental=True)
    found, _ = feed(det, ids, chunk=len(ids))
    assert found == "ll" and det.text == "He"          # the earliest match wins


def test_min_tokens_delays_the_stop_string_check(tok, ids, prompt):
    # "Hello" lies within the first 3 tokens, which min_tokens=3 exempts from the check.
    det = make_detokenizer(tok, SamplingParams(stop=["Hello", " is"], min_tokens=3), prompt, incremental=True)
    found, _ = feed(det, ids)
    assert found == " is" and det.text == "Hello, my name"


def test_unknown_token_ids_decode_to_nothing(tok, prompt):
    unknown = [len(tok), len(tok) + 50, 10**6]
    known = tok.encode("Hello")
    for incremental in (True, False):
        det = make_detokenizer(tok, SamplingParams(stop=["xyz"] if incremental else None), prompt + unknown[:1],
                          incremental=incremental)
        assert feed(det, unknown + known[:1] + unknown + known[1:]) == (None, None)
        assert det.text == "Hello"
        assert det.token_ids == unknown + known[:1] + unknown + known[1:]


@pytest.mark.parametrize("incremental", [True, False])
def test_stop_token_is_kept_in_ids_but_not_in_text(tok, ids, prompt, incremental):
    eos = tok.eos_token_id
    period = tok.encode(".")[0]
    body = ids[:13]                                        # "Hello, my name is nanovllm"
    body_text = tok.decode(body)
    cases = [  # (params, the ending token, the expected text)
        (dict(), eos, body_text),
        (dict(skip_special_tokens=False), eos, body_text),
        (dict(include_stop_str_in_output=True), eos, body_text),      # special tokens still skipped
        (dict(include_stop_str_in_output=True, skip_special_tokens=False), eos, body_text + "<|im_end|>"),
        (dict(stop_token_ids=[period]), period, body_text),
        (dict(stop_token_ids=[period], include_stop_str_in_output=True), period, body_text + "."),
    ]
    for params, last, expected in cases:
        det = make_detokenizer(tok, SamplingParams(**params), prompt, incremental=incremental)
        feed(det, body + [last], chunk=4, stopped_by_token=True)
        assert det.text == expected, params
        assert det.token_ids == body + [last]


def test_special_tokens_in_the_middle(tok, prompt):
    hello, world = tok.encode("Hello"), tok.encode(" my name")
    im_start = tok.convert_tokens_to_ids("<|im_end|>")
    out = hello + [im_start] + world
    for incremental in (True, False):
        kept = make_detokenizer(tok, SamplingParams(skip_special_tokens=False), prompt, incremental)
        feed(kept, out)
        assert kept.text == "Hello<|im_end|> my name"
        skipped = make_detokenizer(tok, SamplingParams(), prompt, incremental)
        feed(skipped, out)
        assert skipped.text == "Hello my name"


def test_new_text_deltas_concatenate_to_text(tok, ids, prompt):
    # Streaming without stop strings: every delta is sent as soon as it is complete.
    det = make_detokenizer(tok, SamplingParams(), prompt, incremental=True)
    deltas = []
    for i in ids:
        det.update([i], False)
        deltas.append(det.new_text())
        assert "".join(deltas) == det.text
    assert det.new_text(finished=True) == ""

    # With stop strings, len(longest) - 1 characters are held back until the end.
    params = SamplingParams(stop=["requests", "zz"])
    det = make_detokenizer(tok, params, prompt, incremental=True)
    deltas = []
    for i in ids:
        stop = det.update([i], False)
        deltas.append(det.new_text(finished=stop is not None))
        if stop:
            break
        held = params.output_text_buffer_length
        assert "".join(deltas) == det.text[:max(0, len(det.text) - held)]
    assert stop == "requests"
    assert "".join(deltas) == det.text == TEXT[:TEXT.index("requests")]


def test_new_text_releases_the_hold_back_when_finished(tok, prompt):
    det = make_detokenizer(tok, SamplingParams(stop=["a long stop string"]), prompt, incremental=True)
    det.update(tok.encode("Hello"), False)
    assert det.new_text() == ""                          # all 5 characters could start the stop
    assert det.new_text(finished=True) == "Hello"


@pytest.mark.parametrize("detokenize", [True, False])
def test_delta_reports_carry_only_what_is_new(tok, prompt, detokenize):
    """A DELTA request's reports split its tokens, text and logprobs between them; a final-only
    one's report is the whole output each time."""
    from nanovllm.engine.sequence import Sequence
    from nanovllm.sampling_params import RequestOutputKind
    params = SamplingParams(output_kind=RequestOutputKind.DELTA, detokenize=detokenize, logprobs=0)
    seq = Sequence("0", 0, prompt, params)
    det = make_detokenizer(tok, params, prompt, incremental=True)
    reports = []
    for piece in ("Hello", " my name", "", " is"):
        for token in tok.encode(piece):
            seq.token_ids.append(token)
            seq.logprobs.add([token], [-1.0], [1], [None])
            det.on_token(seq, None)
        reports.append(det.report(seq))
    assert [t for r in reports for t in r[0]] == seq.output_token_ids and reports[2][0] == []
    assert "".join(r[1] for r in reports) == ("Hello my name is" if detokenize else "")
    assert [lp for r in reports for lp in r[2]] == list(seq.logprobs)
    whole = make_detokenizer(tok, SamplingParams(), prompt, incremental=False)
    whole.update(seq.output_token_ids, False)
    assert whole.report(seq)[:2] == whole.report(seq)[:2] == (seq.output_token_ids, "Hello my name is")


def test_detokenize_false(tok, ids, prompt):
    det = make_detokenizer(tok, SamplingParams(detokenize=False), prompt, incremental=True)
    assert feed(det, ids, chunk=5) == (None, None)
    assert det.text == "" and det.new_text(finished=True) == ""
    assert det.token_ids == ids


def test_flush_on_finish_matches_one_shot_text():
    """A sequence that ends inside a multi-byte character: streamed text, once flushed, equals
    the one-shot decode (which shows the partial character as U+FFFD)."""
    tok = build_tokenizer()
    ids = tok.encode("caf\u00e9 \u00e9t\u00e9")
    # Byte-level tokens of '\u00e9' are two bytes; find a prefix that ends mid-character.
    for cut in range(1, len(ids) + 1):
        if tok.decode(ids[:cut]).endswith("\ufffd"):
            break
    else:
        pytest.skip("the tokenizer merged every multi-byte character into one token")
    params = SamplingParams()
    streamed = make_detokenizer(tok, params, [], incremental=True)
    one_shot = make_detokenizer(tok, params, [], incremental=False)
    for t in ids[:cut]:
        streamed.update([t], False)
    one_shot.update(ids[:cut], False)
    assert streamed.text != one_shot.text
    streamed.flush()
    assert streamed.text == one_shot.text
