"""The OpenAI-compatible server, started for real (uvicorn on a free loopback port) and driven
with the `openai` client: results, streaming, usage, batching, disconnects, errors."""
import argparse
import asyncio
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import sysconfig
import threading
import time

import httpx
import openai
import pytest
import uvicorn
from transformers import AutoTokenizer

from nanovllm import LLM, SamplingParams
from nanovllm.bench_workload import add_workload_args, make_workload
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


def test_chat_top_logprobs_0_and_tools_shown_to_the_template(client):
    resp = client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=2, top_logprobs=0)
    assert resp.choices[0].logprobs is None
    tools = [{"type": "function", "function": {"name": "get_time", "parameters": {"type": "object"}}}]
    resp = client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=2, tools=tools, tool_choice="none")
    assert resp.usage.completion_tokens == 2


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


def test_client_leaving_a_non_streamed_request_aborts_it(url, engine):
    body = {"model": MODEL, "prompt": PROMPTS, "max_tokens": 230, "ignore_eos": True}
    start = engine.stats().num_steps
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{url}/v1/completions", json=body, timeout=0.1)     # the client gives up: disconnects
    stats = wait_idle(engine)
    assert 0 < stats.num_steps - start < 200, "the abandoned request ran to the end"
    assert stats.num_free_blocks == stats.num_blocks


def _raw_error(url: str, status: int, body, headers=None, path: str = "/v1/completions") -> dict:
    kwargs = {"content": body} if isinstance(body, str) else {"json": body}
    resp = httpx.post(f"{url}{path}", headers=headers, timeout=30, **kwargs)
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
    ({"model": MODEL, "prompt": "hi", "seed": 2**70}, 400, "seed"),                   # beyond torch's seeds
    ({"model": MODEL, "prompt": "hi", "stream_options": {"include_usage": True}}, 400, "stream_options"),
    ({"model": MODEL, "prompt": "hi", "prompt_logprobs": 1, "stream": True}, 400, "prompt_logprobs"),
    # Refused rather than ignored: each would quietly change the answer.
    ({"model": MODEL, "prompt": "hi", "logit_bias": {"5": 100}}, 400, "logit_bias"),
    ({"model": MODEL, "prompt": "hi", "response_format": {"type": "json_object"}}, 400, "response_format"),
    ({"model": MODEL, "prompt": "hi", "best_of": 3}, 400, "best_of"),
])
def test_errors_are_openai_json_and_the_server_still_serves(url, engine, client, body, status, param):
    error = _raw_error(url, status, body)
    assert error["param"] == param
    stats = wait_idle(engine)          # nothing was left queued: every block is free
    assert stats.num_free_blocks == stats.num_blocks
    assert client.completions.create(model=MODEL, prompt="hi", max_tokens=2).usage.completion_tokens == 2


@pytest.mark.parametrize("extra, param", [
    ({"temperature": 3}, "temperature"),
    ({"max_completion_tokens": 1000}, "max_completion_tokens"),
    ({"max_tokens": 1000}, "max_tokens"),
    ({"top_logprobs": 2}, "top_logprobs"),                                  # without logprobs
    ({"tools": [{"type": "function", "function": {"name": "f"}}]}, "tool_choice"),
    ({"messages": []}, "messages"),
])
def test_chat_errors_name_their_field(url, extra, param):
    error = _raw_error(url, 400, {"model": MODEL, "messages": CHAT, **extra}, path="/v1/chat/completions")
    assert error["param"] == param and error["type"] == "invalid_request_error"


def test_non_json_unknown_paths_and_methods_get_openai_errors(url, client):
    resp = httpx.post(f"{url}/v1/completions", content='{"model": "tiny", "prompt": "hi"}',
                      headers={"Content-Type": "text/plain"}, timeout=30)
    assert resp.status_code == 415 and "application/json" in resp.json()["error"]["message"]
    for resp, status in ((httpx.get(f"{url}/v1/nothing"), 404), (httpx.get(f"{url}/v1/completions"), 405)):
        assert resp.status_code == status and set(resp.json()["error"]) == {"message", "type", "param", "code"}
    assert client.completions.create(model=MODEL, prompt="hi", max_tokens=2).usage.completion_tokens == 2


def test_errors_through_the_openai_client(client):
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=MODEL, messages=CHAT, temperature=3)
    assert "temperature" in e.value.body["message"]
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="nope", messages=CHAT)
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=1000)


def test_api_key_and_the_serving_benchmark(engine, tmp_path):
    with serving(build_app(engine, [MODEL], api_key="secret")) as url:
        for headers in (None, {"Authorization": "Bearer wrong"}):
            error = _raw_error(url, 401, {"model": MODEL, "prompt": "hi"}, headers)
            assert error["code"] == "invalid_api_key"
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=f"{url}/v1", api_key="wrong", max_retries=0).models.list()
        good = openai.OpenAI(base_url=f"{url}/v1", api_key="secret", max_retries=0)
        assert good.completions.create(model=MODEL, prompt="hi", max_tokens=2).usage.completion_tokens == 2
        assert httpx.get(f"{url}/health").status_code == 200      # health needs no key
        # The serving benchmark, against this server (with its key), on a small workload.
        out = str(tmp_path / "bench_serve.jsonl")
        workload = ["--num-seqs", "6", "--min-input", "4", "--max-input", "12", "--min-output", "3",
                    "--max-output", "9", "--max-token-id", "100"]
        subprocess.run([sys.executable, "benchmarks/bench_serve.py", "--url", url, "--api-key", "secret",
                        "--concurrency", "3", "--json", out, *workload], check=True, timeout=120,
                       cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        with open(out) as f:
            result = json.loads(f.read().splitlines()[-1])
        parser = argparse.ArgumentParser()
        add_workload_args(parser)
        assert result["num_requests"] == 6
        assert result["output_tokens"] == sum(make_workload(parser.parse_args(workload)).output_lens)
        assert result["ttft_ms_p50"] > 0 and result["tpot_ms_p50"] > 0


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


def test_nanovllm_serve_flags_and_sigterm(tiny_qwen3, tmp_path):
    """The `nanovllm` console script with vllm serve's flags (API key, served names, a chat
    template file); a process manager's SIGTERM stops it: the engine process leaves in order
    (its closing log line), and nothing is left running."""
    script = os.path.join(sysconfig.get_path("scripts"), "nanovllm")
    assert os.path.exists(script), "the console script is not installed (pip install -e .)"
    template = tmp_path / "template.jinja"
    template.write_text("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}")
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    server = subprocess.Popen([script, "serve", tiny_qwen3, "--device", "cpu", "--port", str(port),
                               "--host", "127.0.0.1", "--max-model-len", "256", "--api-key", "secret",
                               "--served-model-name", "first", "second", "--chat-template", str(template),
                               "--uvicorn-log-level", "warning"], stderr=subprocess.PIPE, text=True)
    base, key = f"http://127.0.0.1:{port}", {"Authorization": "Bearer secret"}
    try:
        deadline = time.monotonic() + 60
        while True:
            assert server.poll() is None and time.monotonic() < deadline, "the server did not start"
            try:
                if httpx.get(f"{base}/health").status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.2)
        assert httpx.get(f"{base}/v1/models").status_code == 401
        assert [m["id"] for m in httpx.get(f"{base}/v1/models", headers=key).json()["data"]] == ["first", "second"]
        messages = [{"role": "user", "content": "Hello there"}]
        resp = httpx.post(f"{base}/v1/chat/completions", headers=key, timeout=30,
                          json={"model": "second", "messages": messages, "max_tokens": 2}).json()
        rendered = "<user>Hello there"                 # what the template file makes of the messages
        tokenizer = AutoTokenizer.from_pretrained(tiny_qwen3)
        assert resp["usage"]["prompt_tokens"] == len(tokenizer.encode(rendered, add_special_tokens=False))
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
