"""The OpenAI-compatible server, started for real (uvicorn on a free loopback port) and driven
with the `openai` client: results against LLM.generate, streaming, usage, the sampling fields,
batching of concurrent clients. Errors and disconnects: test_server_errors.py; the
`nanovllm serve` command: test_server_cli.py."""
import asyncio
import json
import threading
import time

import httpx
import openai
import pytest

from nanovllm import SamplingParams
from nanovllm.entrypoints.openai_server import build_app
from nanovllm.sampling_params import BeamSearchParams
from tests.server_helpers import (CHAT, MODEL, PROMPTS, client, engine, greedy, llm,  # noqa: F401
                                  raw_error, same_text, serving, url)

def test_health_and_models(url, client):
    assert httpx.get(f"{url}/health").status_code == 200
    models = client.models.list().data
    assert [m.id for m in models] == [MODEL] and models[0].object == "model"


def test_completions_match_llm_generate(client, llm):
    expected = llm.generate(PROMPTS, greedy(), use_tqdm=False)
    resp = client.completions.create(model=MODEL, prompt=PROMPTS, max_tokens=16, temperature=0)
    assert resp.object == "text_completion" and resp.id.startswith("cmpl-") and resp.model == MODEL
    assert [c.index for c in resp.choices] == [0, 1, 2, 3]
    assert [c.text for c in resp.choices] == [o.outputs[0].text for o in expected]
    assert [c.finish_reason for c in resp.choices] == [o.outputs[0].finish_reason for o in expected]
    assert resp.usage.prompt_tokens == sum(len(o.prompt_token_ids) for o in expected)
    assert resp.usage.completion_tokens == sum(len(o.outputs[0].token_ids) for o in expected)
    assert resp.usage.total_tokens == resp.usage.prompt_tokens + resp.usage.completion_tokens
    # Token-id prompts: one list, and a list of lists.
    ids = [o.prompt_token_ids for o in expected]
    one = client.completions.create(model=MODEL, prompt=ids[0], max_tokens=16, temperature=0)
    assert one.choices[0].text == expected[0].outputs[0].text
    many = client.completions.create(model=MODEL, prompt=ids[:2], max_tokens=16, temperature=0)
    assert [c.text for c in many.choices] == [o.outputs[0].text for o in expected[:2]]


def test_use_beam_search_gives_llm_beam_search_beams(client, llm):
    params = BeamSearchParams(beam_width=3, max_tokens=8)
    expected = llm.beam_search(PROMPTS[:2], params)
    resp = client.completions.create(model=MODEL, prompt=PROMPTS[:2], max_tokens=8, n=3,
                                     extra_body={"use_beam_search": True})
    assert [c.index for c in resp.choices] == list(range(6))
    tokenizer = llm.get_tokenizer()
    for i, prompt in enumerate(PROMPTS[:2]):
        num_prompt = len(tokenizer(prompt).input_ids)
        beams = expected[i].sequences
        choices = resp.choices[3 * i:3 * i + 3]
        # the server's text is the generated part only (vLLM's server), without a completing EOS
        assert [c.text for c in choices] == [
            tokenizer.decode(b.tokens[num_prompt:len(b.tokens) - (b.finish_reason == "stop")]) for b in beams]
        assert [c.finish_reason for c in choices] == [b.finish_reason for b in beams]
    assert resp.usage.completion_tokens == sum(len(b.tokens) - len(tokenizer(p).input_ids)
                                               for p, out in zip(PROMPTS, expected) for b in out.sequences)


@pytest.mark.parametrize("extra, param", [({"stream": True}, "stream"), ({"logprobs": 2}, "logprobs"),
                                          ({"n": 11}, "n"), ({"length_penalty": "x"}, "length_penalty"),
                                          ({"max_tokens": 0}, "max_tokens")])
def test_use_beam_search_refuses_what_it_cannot_do(url, extra, param):
    error = raw_error(url, 400, {"model": MODEL, "prompt": "Hi", "use_beam_search": True, "n": 2, **extra})
    assert error["param"] == param


def test_completion_stream_concatenates_to_the_same_text(client):
    kwargs = dict(model=MODEL, prompt=PROMPTS[:2], max_tokens=20, temperature=0)
    full = client.completions.create(**kwargs)
    chunks = list(client.completions.create(**kwargs, stream=True, stream_options={"include_usage": True}))
    texts, finish = {0: "", 1: ""}, {}
    for chunk in chunks[:-1]:
        (choice,) = chunk.choices
        texts[choice.index] += choice.text
        if choice.finish_reason:
            finish[choice.index] = choice.finish_reason
    assert all(same_text(texts[c.index], c.text) for c in full.choices)
    assert finish == {c.index: c.finish_reason for c in full.choices}
    assert chunks[-1].choices == [] and chunks[-1].usage.model_dump() == full.usage.model_dump()
    assert len(chunks) > 4       # piece by piece, not all at once


def test_chat_matches_llm_chat(client, llm):
    expected = llm.chat(CHAT, greedy(12), use_tqdm=False)[0]
    resp = client.chat.completions.create(model=MODEL, messages=CHAT, max_completion_tokens=12, temperature=0)
    assert resp.object == "chat.completion" and resp.id.startswith("chatcmpl-")
    (choice,) = resp.choices
    assert choice.message.role == "assistant" and choice.message.content == expected.outputs[0].text
    assert choice.finish_reason == expected.outputs[0].finish_reason
    assert resp.usage.prompt_tokens == len(expected.prompt_token_ids)
    assert resp.usage.completion_tokens == len(expected.outputs[0].token_ids)
    # max_tokens works as well; the stream's deltas add up to the same message.
    chunks = list(client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=12, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert same_text(text, choice.message.content)
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == choice.finish_reason
    assert chunks[-1].usage.model_dump() == resp.usage.model_dump()


def test_n_stop_and_logprobs_carried_through(client, llm):
    resp = client.completions.create(model=MODEL, prompt=PROMPTS[0], max_tokens=8, temperature=1.0, n=2, seed=3)
    assert sorted(c.index for c in resp.choices) == [0, 1]
    assert resp.usage.completion_tokens == 16
    expected = llm.generate(PROMPTS[0], SamplingParams(n=2, seed=3, max_tokens=8), use_tqdm=False)[0]
    assert [c.text for c in resp.choices] == [c.text for c in expected.outputs]
    # stop: cut where a stop string of the greedy text starts.
    greedy_text = llm.generate(PROMPTS[1], greedy(), use_tqdm=False)[0].outputs[0].text
    stop = greedy_text[4:7]
    resp = client.completions.create(model=MODEL, prompt=PROMPTS[1], max_tokens=16, temperature=0, stop=[stop])
    assert resp.choices[0].finish_reason == "stop"
    assert resp.choices[0].text == greedy_text[:greedy_text.index(stop)]
    # logprobs: the sampled token and the top 2 per position.
    resp = client.completions.create(model=MODEL, prompt=PROMPTS[2], max_tokens=6, temperature=0, logprobs=2)
    lp = resp.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 6
    assert all(x <= 0 for x in lp.token_logprobs) and all(1 <= len(top) <= 3 for top in lp.top_logprobs)
    # Greedy: the sampled token is the most likely one.
    assert all(max(top.values()) == pytest.approx(x) for top, x in zip(lp.top_logprobs, lp.token_logprobs))
    chat = client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=5, temperature=0,
                                          logprobs=True, top_logprobs=2)
    content = chat.choices[0].logprobs.content
    assert len(content) == 5 and all(len(t.top_logprobs) == 2 for t in content)
    assert all(t.logprob == pytest.approx(t.top_logprobs[0].logprob) for t in content)


def test_echo_and_prompt_logprobs(client, llm):
    prompt = PROMPTS[3]
    expected = llm.generate(prompt, greedy(4, logprobs=1, prompt_logprobs=1), use_tqdm=False)[0]
    n_prompt = len(expected.prompt_token_ids)
    resp = client.completions.create(model=MODEL, prompt=prompt, max_tokens=4, temperature=0, echo=True, logprobs=1)
    (choice,) = resp.choices
    assert choice.text == prompt + expected.outputs[0].text
    lp = choice.logprobs
    assert len(lp.tokens) == n_prompt + 4 and lp.token_logprobs[0] is None
    want = [e[t].logprob for t, e in zip(expected.prompt_token_ids[1:], expected.prompt_logprobs[1:])]
    assert lp.token_logprobs[1:n_prompt] == pytest.approx(want, abs=1e-4)
    # max_tokens 0 with echo: the prompt alone, scored (how evaluation harnesses use it).
    resp = client.completions.create(model=MODEL, prompt=prompt, max_tokens=0, temperature=0, echo=True, logprobs=1)
    (choice,) = resp.choices
    assert choice.text == prompt and choice.finish_reason == "length" and resp.usage.completion_tokens == 0
    assert len(choice.logprobs.tokens) == n_prompt
    assert choice.logprobs.token_logprobs[1:] == pytest.approx(want, abs=1e-4)
    chunks = list(client.completions.create(model=MODEL, prompt=prompt, max_tokens=0, echo=True, stream=True))
    assert "".join(c.choices[0].text for c in chunks) == prompt
    # vLLM's prompt_logprobs field: per prompt token, None first, then {id: Logprob}.
    resp = client.completions.create(model=MODEL, prompt=prompt, max_tokens=2, temperature=0,
                                     extra_body={"prompt_logprobs": 1})
    got = resp.choices[0].model_extra["prompt_logprobs"]
    assert got[0] is None and len(got) == n_prompt
    assert all(c.model_extra["prompt_logprobs"] is None for c in
               client.completions.create(model=MODEL, prompt=prompt, max_tokens=2).choices)     # not asked
    chunks = client.completions.create(model=MODEL, prompt=prompt, max_tokens=2, stream=True,
                                       extra_body={"prompt_logprobs": 0})      # 0 is allowed with stream
    assert len(list(chunks)) >= 1
    for entry, want_entry in zip(got[1:], expected.prompt_logprobs[1:]):
        assert {int(t): v["rank"] for t, v in entry.items()} == {t: lp.rank for t, lp in want_entry.items()}
        assert [v["logprob"] for v in entry.values()] == pytest.approx([lp.logprob for lp in want_entry.values()],
                                                                       abs=1e-4)


def test_vllm_extra_sampling_fields_reach_the_engine(client, llm):
    fields = dict(top_k=5, min_p=0.05, min_tokens=6, repetition_penalty=1.3, seed=7)
    openai_fields = dict(presence_penalty=0.5, frequency_penalty=0.3, temperature=0.9)
    expected = llm.generate(PROMPTS[1], SamplingParams(max_tokens=10, **fields, **openai_fields),
                            use_tqdm=False)[0].outputs[0]
    resp = client.completions.create(model=MODEL, prompt=PROMPTS[1], max_tokens=10, **openai_fields,
                                     extra_body=fields)
    assert resp.choices[0].text == expected.text and resp.usage.completion_tokens == len(expected.token_ids)
    # A stop token id ends the choice there; include_stop_str_in_output keeps a stop string.
    greedy_out = llm.generate(PROMPTS[1], greedy(), use_tqdm=False)[0].outputs[0]
    stop_id = greedy_out.token_ids[3]
    resp = client.completions.create(model=MODEL, prompt=PROMPTS[1], max_tokens=16, temperature=0,
                                     extra_body={"stop_token_ids": [stop_id]})
    want = llm.generate(PROMPTS[1], greedy(stop_token_ids=[stop_id]), use_tqdm=False)[0].outputs[0]
    assert resp.choices[0].finish_reason == "stop" and resp.choices[0].model_extra["stop_reason"] == stop_id
    assert resp.choices[0].text == want.text and resp.usage.completion_tokens == len(want.token_ids)
    stop = greedy_out.text[4:7]
    resp = client.completions.create(model=MODEL, prompt=PROMPTS[1], max_tokens=16, temperature=0, stop=[stop],
                                     extra_body={"include_stop_str_in_output": True})
    assert resp.choices[0].text == greedy_out.text[:greedy_out.text.index(stop) + len(stop)]


TOOLS_TEMPLATE = ("{% for t in tools or [] %}[{{ t['function']['name'] }}]{% endfor %}"
                  "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}")


def test_chat_top_logprobs_0_and_tools_shown_to_the_template(client, engine):
    resp = client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=2, top_logprobs=0)
    assert resp.choices[0].logprobs is None
    tools = [{"type": "function", "function": {"name": "get_time_of_day", "parameters": {"type": "object"}}}]
    with serving(build_app(engine, [MODEL], chat_template=TOOLS_TEMPLATE)) as url:
        tool_client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)

        def prompt_tokens(**kwargs) -> int:
            resp = tool_client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=2, **kwargs)
            return resp.usage.prompt_tokens
        plain = prompt_tokens()
        shown = prompt_tokens(tools=tools, tool_choice="none")
        assert shown > plain                       # the template rendered the tool's name
        # Tools given through chat_template_kwargs (as vLLM allows) render the same.
        assert prompt_tokens(extra_body={"chat_template_kwargs": {"tools": tools}}) == shown


def test_concurrent_streaming_clients_share_batches(url, engine, llm):
    prompts = [f"{PROMPTS[i % 4]} {i}" for i in range(32)]
    expected = [o.outputs[0].text for o in llm.generate(prompts, greedy(24, ignore_eos=True), use_tqdm=False)]
    aclient = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=60)

    async def one(prompt: str) -> str:
        stream = await aclient.completions.create(model=MODEL, prompt=prompt, max_tokens=24, temperature=0,
                                                  stream=True, extra_body={"ignore_eos": True})
        return "".join([chunk.choices[0].text async for chunk in stream])

    async def bad() -> int:      # a bad request in the middle of them disturbs nobody
        with pytest.raises(openai.BadRequestError) as e:
            await aclient.completions.create(model=MODEL, prompt=PROMPTS[0], temperature=-1)
        return e.value.status_code

    async def main():
        results = await asyncio.gather(*[one(p) for p in prompts], bad())
        await aclient.close()
        return results

    start = engine.stats().num_steps
    results = asyncio.run(asyncio.wait_for(main(), 60))
    steps = engine.stats().num_steps - start
    assert all(same_text(got, want) for got, want in zip(results, expected)) and results[32] == 400
    assert steps < 32 * 24 / 4, f"{steps} steps for {32 * 24} tokens: the clients were not batched together"


def test_sse_wire_format(url):
    body = {"model": MODEL, "prompt": "hi", "max_tokens": 3, "stream": True}
    with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=30) as resp:
        assert resp.headers["content-type"].startswith("text/event-stream")
        events = [line for line in resp.iter_lines() if line]
    assert all(e.startswith("data: ") for e in events) and events[-1] == "data: [DONE]"
    chunks = [json.loads(e[len("data: "):]) for e in events[:-1]]
    assert {c["object"] for c in chunks} == {"text_completion"} and len({c["id"] for c in chunks}) == 1
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"


def sse_chunks(url: str, path: str, body: dict) -> list[tuple[float, dict]]:
    """(arrival time, chunk) of a streamed answer."""
    chunks = []
    with httpx.stream("POST", f"{url}{path}", json={**body, "stream": True}, timeout=30) as resp:
        for line in resp.iter_lines():
            if line.startswith("data: {"):
                chunks.append((time.monotonic(), json.loads(line[len("data: "):])))
    return chunks


def test_streams_send_no_empty_text(url):
    """A token that ends inside a multi-byte character (or that the tokenizer cannot spell:
    the tiny model's vocabulary is larger than its tokenizer's) makes no text yet: nothing is
    sent until there is some, as vLLM. The text and the token count still add up."""
    for seed in range(2):
        body = {"model": MODEL, "prompt": PROMPTS[0], "max_tokens": 40, "temperature": 1.0, "seed": seed,
                "ignore_eos": True, "logprobs": 0, "stream_options": {"include_usage": True}}
        whole = httpx.post(f"{url}/v1/completions", json=body | {"stream_options": None}, timeout=30).json()
        chunks = [c for _, c in sse_chunks(url, "/v1/completions", body)]
        choices = [c["choices"][0] for c in chunks if c["choices"]]
        assert all(c["text"] or c["finish_reason"] for c in choices), "a chunk without text"
        assert "".join(c["text"] for c in choices) == whole["choices"][0]["text"]
        assert sum(len(c["logprobs"]["tokens"]) for c in choices) == 40 == chunks[-1]["usage"]["completion_tokens"]
        messages = [{"role": "user", "content": PROMPTS[seed]}]
        chat_body = {**body, "messages": messages, "logprobs": True}
        chat = [c for _, c in sse_chunks(url, "/v1/chat/completions", chat_body)]
        deltas = [c["choices"][0] for c in chat if c["choices"]]
        assert all(d["delta"]["content"] or d["finish_reason"] for d in deltas), "a chat chunk without text"
        assert sum(len(d["logprobs"]["content"]) for d in deltas) == 40 == chat[-1]["usage"]["completion_tokens"]


def test_streamed_chat_sends_the_role_with_the_first_token(url):
    """The first chunk with choices goes out once a token exists, with it (as vLLM): a role
    chunk sent before (as before) made clients measure a time to first token of ~0."""
    body = {"model": MODEL, "messages": CHAT, "max_tokens": 8, "temperature": 0, "logprobs": True, "n": 1}
    chunks = [c for _, c in sse_chunks(url, "/v1/chat/completions", body)]
    first = next(c for c in chunks if c["choices"])["choices"][0]
    assert first["delta"]["role"] == "assistant"
    assert first["delta"]["content"] and first["logprobs"]["content"], "the first chunk carries no token"
    assert all("role" not in c["choices"][0]["delta"] for c in chunks[1:] if c["choices"])
    # With n > 1, each choice's first chunk carries its role, and its first token.
    body = {**body, "n": 3, "temperature": 1.0, "seed": 5}
    chunks = [c["choices"][0] for _, c in sse_chunks(url, "/v1/chat/completions", body)]
    for index in range(3):
        own = [c for c in chunks if c["index"] == index]
        assert own[0]["delta"]["role"] == "assistant" and own[0]["logprobs"]["content"]


def test_a_huge_prompt_does_not_stall_other_streams(url, client):
    """A multi-megabyte prompt is tokenized off the event loop: while it is (seconds), another
    client's stream keeps coming. (Tokenized on the loop, every stream stalled meanwhile.)"""
    huge = "The capital of France is Paris. " * 100_000        # 3.2 MB, ~1M tokens
    answer = {}

    def send_huge():
        start = time.monotonic()
        answer["response"] = httpx.post(f"{url}/v1/completions", json={"model": MODEL, "prompt": huge},
                                        timeout=120)
        answer["seconds"] = time.monotonic() - start
    sender = threading.Thread(target=send_huge)
    arrivals = []
    body = {"model": MODEL, "prompt": PROMPTS[1], "max_tokens": 200, "ignore_eos": True}
    sender.start()
    while sender.is_alive() or not arrivals:            # streams back to back, until the huge one is answered
        arrivals.append(time.monotonic())               # (the wait for a stream's first chunk counts too)
        arrivals += [t for t, _ in sse_chunks(url, "/v1/completions", body)]
    sender.join()
    assert answer["response"].status_code == 400 and answer["response"].json()["error"]["param"] == "max_tokens"
    gaps = [b - a for a, b in zip(arrivals, arrivals[1:])]
    assert answer["seconds"] > 1.0, "the prompt was too quick to tell"
    # (Relative to the tokenizing time: on a busy machine everything is slower. On the loop,
    # one gap was as long as the whole tokenizing.)
    assert max(gaps) < answer["seconds"] / 4, f"a stream stalled {max(gaps):.2f} s of {answer['seconds']:.2f} s"
    assert client.completions.create(model=MODEL, prompt="hi", max_tokens=2).usage.completion_tokens == 2
