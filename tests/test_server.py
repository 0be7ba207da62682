"""The OpenAI-compatible server, started for real (uvicorn on a free loopback port) and driven
with the `openai` client: results, streaming, usage, batching, disconnects, errors."""
import asyncio
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import httpx
import openai
import pytest
import uvicorn

from nanovllm import LLM, SamplingParams
from nanovllm.entrypoints.async_llm import AsyncLLM
from nanovllm.entrypoints.openai_server import build_app
from tests.conftest import wait_gone, wait_idle

ENGINE_KWARGS = dict(device="cpu", dtype="float32", max_model_len=256, num_gpu_blocks_override=512)
MODEL = "tiny"
PROMPTS = ["Hello, my name is", "The capital of France is", "Paged attention keeps", "List all prime numbers"]
CHAT = [{"role": "user", "content": "Introduce yourself in one sentence."}]


@contextlib.contextmanager
def serving(app):
    """Run `app` with uvicorn in a background thread on a free port; yields the base URL."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=1))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "server did not start"
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        sock.close()


@pytest.fixture(scope="module")
def engine(tiny_qwen3):
    engine = AsyncLLM(tiny_qwen3, **ENGINE_KWARGS)
    yield engine
    engine.shutdown_sync()


@pytest.fixture(scope="module")
def url(engine):
    with serving(build_app(engine, [MODEL])) as url:
        yield url


@pytest.fixture(scope="module")
def client(url):
    return openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=30)


@pytest.fixture(scope="module")
def llm(tiny_qwen3):
    return LLM(tiny_qwen3, **ENGINE_KWARGS)


def greedy(max_tokens: int = 16, **kwargs) -> SamplingParams:
    return SamplingParams(temperature=0, max_tokens=max_tokens, **kwargs)


def same_text(streamed: str, whole: str) -> bool:
    """Streamed text equals the non-streamed one, character for character (a final incomplete
    UTF-8 character included: the tiny model's random bytes produce them often)."""
    return streamed == whole


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


def test_disconnect_mid_stream_aborts_and_frees_blocks(url, engine, client):
    body = {"model": MODEL, "prompt": PROMPTS[0], "max_tokens": 200, "ignore_eos": True, "stream": True}
    others = threading.Thread(target=lambda: [client.completions.create(model=MODEL, prompt=p, max_tokens=16)
                                              for p in PROMPTS])
    start = engine.stats().num_steps
    with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=30) as resp:
        lines = resp.iter_lines()
        assert next(lines).startswith("data: ")
        others.start()
        stats = engine.stats()
        assert stats.num_free_blocks < stats.num_blocks
    # The connection is closed: the server aborts the request at its next step.
    others.join(timeout=30)
    stats = wait_idle(engine)
    assert stats.num_steps - start < 200, "the disconnected request ran to the end"
    assert stats.num_free_blocks == stats.num_blocks
    assert client.completions.create(model=MODEL, prompt=PROMPTS[0], max_tokens=2).choices[0].text is not None


def _raw_error(url: str, status: int, body, headers=None) -> dict:
    kwargs = {"content": body} if isinstance(body, str) else {"json": body}
    resp = httpx.post(f"{url}/v1/completions", headers=headers, timeout=30, **kwargs)
    assert resp.status_code == status, resp.text
    error = resp.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    return error


@pytest.mark.parametrize("body, status, param", [
    ({"model": MODEL, "prompt": "hi", "temperature": -1}, 400, "temperature"),        # SamplingParams
    ({"model": MODEL, "prompt": "hi", "temperature": 0, "n": 2}, 400, None),          # greedy with n > 1
    ({"model": MODEL, "prompt": "hi", "top_p": 0}, 400, "top_p"),
    ({"model": MODEL, "prompt": "hi", "max_tokens": 0}, 400, "max_tokens"),
    ({"model": MODEL, "prompt": [5] * 300}, 400, "max_tokens"),                       # prompt too long
    ({"model": MODEL, "prompt": "hi", "max_tokens": 255}, 400, "max_tokens"),         # prompt + output too long
    ({"model": MODEL, "prompt": [[1, 2, 100000]]}, 400, None),                        # not in the vocabulary
    ({"model": MODEL, "prompt": [[1, 2, 3], [4, 100000]]}, 400, None),                # one bad prompt of two
    ({"model": MODEL, "prompt": []}, 400, "prompt"),
    ({"model": MODEL}, 400, "prompt"),                                                # missing field
    ({"model": MODEL, "prompt": "hi", "max_tokens": "many"}, 400, "max_tokens"),      # wrong type
    ('{"model": "tiny", "prompt": ', 400, None),                                      # malformed JSON
    ({"model": "gpt-4", "prompt": "hi"}, 404, "model"),                               # unknown model
])
def test_errors_are_openai_json_and_the_server_still_serves(url, engine, client, body, status, param):
    error = _raw_error(url, status, body)
    assert error["param"] == param or param is None
    stats = wait_idle(engine)          # nothing was left queued: every block is free
    assert stats.num_free_blocks == stats.num_blocks
    assert client.completions.create(model=MODEL, prompt="hi", max_tokens=2).usage.completion_tokens == 2


def test_errors_through_the_openai_client(client):
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=MODEL, messages=CHAT, temperature=3)
    assert "temperature" in e.value.body["message"]
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="nope", messages=CHAT)
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=1000)


def test_api_key(engine):
    with serving(build_app(engine, [MODEL], api_key="secret")) as url:
        for headers in (None, {"Authorization": "Bearer wrong"}):
            error = _raw_error(url, 401, {"model": MODEL, "prompt": "hi"}, headers)
            assert error["code"] == "invalid_api_key"
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=f"{url}/v1", api_key="wrong", max_retries=0).models.list()
        good = openai.OpenAI(base_url=f"{url}/v1", api_key="secret", max_retries=0)
        assert good.completions.create(model=MODEL, prompt="hi", max_tokens=2).usage.completion_tokens == 2
        assert httpx.get(f"{url}/health").status_code == 200      # health needs no key


def test_sse_wire_format(url):
    body = {"model": MODEL, "prompt": "hi", "max_tokens": 3, "stream": True}
    with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=30) as resp:
        assert resp.headers["content-type"].startswith("text/event-stream")
        events = [line for line in resp.iter_lines() if line]
    assert all(e.startswith("data: ") for e in events) and events[-1] == "data: [DONE]"
    chunks = [json.loads(e[len("data: "):]) for e in events[:-1]]
    assert {c["object"] for c in chunks} == {"text_completion"} and len({c["id"] for c in chunks}) == 1
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"


@pytest.mark.parametrize("max_num_seqs, expected", [(None, 2048), (4096, 4096)])
def test_server_step_budget_default(tiny_qwen3, monkeypatch, max_num_seqs, expected):
    """`nanovllm serve` on a CPU defaults to vllm serve's 2048 tokens a step, raised to
    max_num_seqs when that is larger (every running sequence needs its token)."""
    from nanovllm.config import EngineConfig
    from nanovllm.entrypoints import openai_server

    class Built(Exception):
        pass

    def build_config_only(model, **kwargs):
        raise Built(EngineConfig.from_kwargs(model, **kwargs))

    monkeypatch.setattr(openai_server, "AsyncLLM", build_config_only)
    kwargs = dict(device="cpu") if max_num_seqs is None else dict(device="cpu", max_num_seqs=max_num_seqs)
    with pytest.raises(Built) as built:
        openai_server.run_server(tiny_qwen3, **kwargs)
    assert built.value.args[0].max_num_batched_tokens == expected


def test_nanovllm_serve_stops_its_engine_on_sigterm(tiny_qwen3):
    """`nanovllm serve` as a process manager stops it: the engine process leaves in order
    (its closing log line), and nothing is left running."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    server = subprocess.Popen([sys.executable, "-m", "nanovllm", "serve", tiny_qwen3, "--device", "cpu",
                               "--port", str(port), "--host", "127.0.0.1", "--max-model-len", "256",
                               "--uvicorn-log-level", "warning"], stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while True:
            assert server.poll() is None and time.monotonic() < deadline, "the server did not start"
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health").status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.2)
        with open(f"/proc/{server.pid}/task/{server.pid}/children") as f:
            children = [int(pid) for pid in f.read().split()]
        assert children, "no engine process"
        server.send_signal(signal.SIGTERM)
        _, err = server.communicate(timeout=60)
        assert "engine loop:" in err, err          # logged by the engine process as it stops
        assert wait_gone(children, 10) == []
    finally:
        server.kill()
        server.wait()
