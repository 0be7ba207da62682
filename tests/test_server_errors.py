"""The server's errors (OpenAI's JSON, each with its status and field), the API key, clients
that leave before their answer, and the serving benchmark against a running server."""
import argparse
import asyncio
import json
import os
import subprocess
import sys
import threading
import time

import httpx
import openai
import pytest

from nanovllm.bench_workload import add_workload_args, make_workload
from nanovllm.entrypoints.openai_server import build_app
from tests.conftest import wait_idle
from tests.server_helpers import CHAT, MODEL, PROMPTS, client, engine, raw_error, serving, url  # noqa: F401

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


def test_client_leaving_while_its_prompts_are_being_added_aborts_them(url, engine, monkeypatch):
    """Of a request's two prompts the first is accepted, the second's add is still pending
    when the client leaves: both are aborted (none runs on, holding its blocks)."""
    add_request = engine.add_request

    async def slow_second_add(request_id, prompt, params):
        if request_id.endswith("-1"):
            await asyncio.sleep(0.5)
        return await add_request(request_id, prompt, params)

    monkeypatch.setattr(engine, "add_request", slow_second_add)
    body = {"model": MODEL, "prompt": PROMPTS[:2], "max_tokens": 230, "ignore_eos": True}
    start = engine.stats().num_steps
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{url}/v1/completions", json=body, timeout=0.05)
    time.sleep(0.5)                                 # the second add's time is over
    stats = wait_idle(engine)
    assert stats.num_steps - start < 200, "the accepted prompt ran on after its client left"
    assert stats.num_free_blocks == stats.num_blocks


def test_client_leaving_a_non_streamed_request_aborts_it(url, engine):
    body = {"model": MODEL, "prompt": PROMPTS, "max_tokens": 230, "ignore_eos": True}
    start = engine.stats().num_steps
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{url}/v1/completions", json=body, timeout=0.1)     # the client gives up: disconnects
    stats = wait_idle(engine)
    assert 0 < stats.num_steps - start < 200, "the abandoned request ran to the end"
    assert stats.num_free_blocks == stats.num_blocks


@pytest.mark.parametrize("body, status, param", [
    ({"model": MODEL, "prompt": "hi", "temperature": -1}, 400, "temperature"),        # SamplingParams
    ({"model": MODEL, "prompt": "hi", "temperature": 0, "n": 2}, 400, "n"),           # greedy with n > 1
    ({"model": MODEL, "prompt": "hi", "n": 0}, 400, "n"),
    ({"model": MODEL, "prompt": "hi", "top_k": -5}, 400, "top_k"),
    ({"model": MODEL, "prompt": "hi", "min_p": 2}, 400, "min_p"),
    ({"model": MODEL, "prompt": "hi", "presence_penalty": 3}, 400, "presence_penalty"),
    ({"model": MODEL, "prompt": "hi", "min_tokens": 20, "max_tokens": 4}, 400, "min_tokens"),
    ({"model": MODEL, "prompt": "hi", "min_tokens": 10**6}, 400, "min_tokens"),      # beyond the context left
    ({"model": MODEL, "prompt": "hi", "logprobs": 100}, 400, "logprobs"),              # above the maximum
    ({"model": MODEL, "prompt": "hi", "prompt_logprobs": 100}, 400, "prompt_logprobs"),
    ({"model": MODEL, "prompt": "hi", "stop": ["a", ""]}, 400, "stop"),
    ({"model": MODEL, "prompt": "hi", "top_p": 0}, 400, "top_p"),
    ({"model": MODEL, "prompt": "hi", "max_tokens": 0}, 400, "max_tokens"),
    ({"model": MODEL, "prompt": [5] * 300}, 400, "max_tokens"),                       # prompt too long
    ({"model": MODEL, "prompt": "hi", "max_tokens": 255}, 400, "max_tokens"),         # prompt + output too long
    ({"model": MODEL, "prompt": [[1, 2, 100000]]}, 400, "prompt"),                    # not in the vocabulary
    ({"model": MODEL, "prompt": [[1, 2, 3], [4, 100000]]}, 400, "prompt"),            # one bad prompt of two
    ({"model": MODEL, "prompt": []}, 400, "prompt"),
    ({"model": MODEL}, 400, "prompt"),                                                # missing field
    ({"model": MODEL, "prompt": "hi", "max_tokens": "many"}, 400, "max_tokens"),      # wrong type
    ({"model": MODEL, "prompt": 5}, 400, "prompt"),             # no union branch fits: not "prompt.str"
    ({"model": MODEL, "prompt": [[1, "a"]]}, 400, "prompt[0][1]"),
    ({"model": MODEL, "prompt": "hi", "stop": ["a", 5]}, 400, "stop[1]"),
    ('{"model": "tiny", "prompt": ', 400, None),                                      # malformed JSON
    ({"model": "gpt-4", "prompt": "hi"}, 404, "model"),                               # unknown model
    ({"model": MODEL, "prompt": "hi", "seed": 2**70}, 400, "seed"),                   # beyond torch's seeds
    ({"model": MODEL, "prompt": "hi", "stop_token_ids": [10**6]}, 400, "stop_token_ids"),  # not in the vocabulary
    ({"model": MODEL, "prompt": "hi", "stream_options": {"include_usage": True}}, 400, "stream_options"),
    ({"model": MODEL, "prompt": "hi", "prompt_logprobs": 1, "stream": True}, 400, "prompt_logprobs"),
    # Refused rather than ignored: each would quietly change the answer.
    ({"model": MODEL, "prompt": "hi", "logit_bias": {"5": 100}}, 400, "logit_bias"),
    ({"model": MODEL, "prompt": "hi", "response_format": {"type": "json_object"}}, 400, "response_format"),
    ({"model": MODEL, "prompt": "hi", "best_of": 3}, 400, "best_of"),
])
def test_errors_are_openai_json_and_the_server_still_serves(url, engine, client, body, status, param):
    error = raw_error(url, status, body)
    assert error["param"] == param
    stats = wait_idle(engine)          # nothing was left queued: every block is free
    assert stats.num_free_blocks == stats.num_blocks
    assert client.completions.create(model=MODEL, prompt="hi", max_tokens=2, extra_body={"ignore_eos": True}).usage.completion_tokens == 2


@pytest.mark.parametrize("extra, param", [
    ({"temperature": 3}, "temperature"),
    ({"max_completion_tokens": 1000}, "max_completion_tokens"),
    ({"max_completion_tokens": 0}, "max_completion_tokens"),
    ({"max_tokens": 1000}, "max_tokens"),
    ({"top_logprobs": 2}, "top_logprobs"),                                  # without logprobs
    ({"tools": [{"type": "function", "function": {"name": "f"}}]}, "tool_choice"),
    ({"messages": []}, "messages"),
])
def test_chat_errors_name_their_field(url, extra, param):
    error = raw_error(url, 400, {"model": MODEL, "messages": CHAT, **extra}, path="/v1/chat/completions")
    assert error["param"] == param and error["type"] == "invalid_request_error"


def test_non_json_unknown_paths_and_methods_get_openai_errors(url, client):
    resp = httpx.post(f"{url}/v1/completions", content='{"model": "tiny", "prompt": "hi"}',
                      headers={"Content-Type": "text/plain"}, timeout=30)
    assert resp.status_code == 415 and "application/json" in resp.json()["error"]["message"]
    for content_type in ("Application/JSON", "application/vnd.api+json"):      # JSON: the field is named
        resp = httpx.post(f"{url}/v1/completions", content='{"model": "tiny"}', timeout=30,
                          headers={"Content-Type": content_type})
        assert resp.status_code == 400 and resp.json()["error"]["param"] == "prompt"
    for resp, status in ((httpx.get(f"{url}/v1/nothing"), 404), (httpx.get(f"{url}/v1/completions"), 405)):
        assert resp.status_code == status and set(resp.json()["error"]) == {"message", "type", "param", "code"}
    assert httpx.get(f"{url}/v1/completions").headers["allow"] == "POST"
    assert client.completions.create(model=MODEL, prompt="hi", max_tokens=2, extra_body={"ignore_eos": True}).usage.completion_tokens == 2


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
            error = raw_error(url, 401, {"model": MODEL, "prompt": "hi"}, headers)
            assert error["code"] == "invalid_api_key"
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=f"{url}/v1", api_key="wrong", max_retries=0).models.list()
        good = openai.OpenAI(base_url=f"{url}/v1", api_key="secret", max_retries=0)
        assert good.completions.create(model=MODEL, prompt="hi", max_tokens=2, extra_body={"ignore_eos": True}).usage.completion_tokens == 2
        assert httpx.get(f"{url}/health").status_code == 200      # health needs no key


def test_the_serving_benchmark_against_a_server_with_a_key(engine, tmp_path):
    """benchmarks/bench_serve.py on a small workload: every request answered, every token counted."""
    with serving(build_app(engine, [MODEL], api_key="secret")) as url:
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
        assert result["num_requests"] == 6 and result["failed_requests"] == 0
        assert result["output_tokens"] == sum(make_workload(parser.parse_args(workload)).output_lens)
        assert result["ttft_ms_p50"] > 0 and result["tpot_ms_p50"] > 0


@pytest.mark.parametrize("path, body, param", [
    ("/v1/completions", {"model": MODEL, "prompt": "a\ud800b"}, "prompt"),
    ("/v1/completions", {"model": MODEL, "prompt": ["fine", "\udfff"]}, "prompt[1]"),
    ("/v1/completions", {"model": "\ud800", "prompt": "hi"}, "model"),
    ("/v1/completions", {"model": MODEL, "prompt": "hi", "stop": ["ok", "x\ud83d"]}, "stop[1]"),
    ("/v1/completions", {"model": MODEL, "prompt": "hi", "user": "\ud800"}, "user"),
    ("/v1/chat/completions", {"model": MODEL, "messages": [*CHAT, {"role": "user", "content": "\ud800"}]},
     "messages[1].content"),
    ("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "\ud800", "content": "hi"}]}, "messages[0].role"),
    ("/v1/chat/completions", {"model": MODEL, "messages": CHAT, "chat_template_kwargs": {"x": ["\ud800"]}},
     "chat_template_kwargs.x[0]"),
    ("/tokenize", {"model": MODEL, "prompt": "\ud800"}, "prompt"),
])
def test_a_lone_surrogate_is_a_400_naming_its_field_and_the_connection_stays_usable(url, path, body, param):
    """JSON can carry a lone UTF-16 surrogate ("\\ud800"), which no tokenizer (nor the UTF-8
    of an error message quoting it) can encode: it was a 500, and the client's keep-alive
    connection was reset."""
    with httpx.Client(base_url=url, timeout=30) as http:       # one connection for both requests
        resp = http.post(path, content=json.dumps(body), headers={"Content-Type": "application/json"})
        assert resp.status_code == 400, resp.text
        assert resp.json()["error"]["param"] == param
        ok = http.post("/v1/completions", json={"model": MODEL, "prompt": "hi", "max_tokens": 2})
        assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] == 2


def test_a_lone_surrogate_sent_as_raw_bytes_is_a_400_too(url):
    """Not only as an escape: json reads bytes with "surrogatepass", so a surrogate's own
    (invalid) UTF-8 bytes become one too."""
    body = '{"model": "tiny", "prompt": ["fine", "a\ud800"]}'.encode("utf-8", "surrogatepass")
    assert raw_error(url, 400, body, headers={"Content-Type": "application/json"})["param"] == "prompt[1]"


def test_only_a_body_that_may_hold_a_lone_surrogate_is_walked():
    """The walk of the JSON (slow on hundreds of token ids) is skipped for an ASCII body
    without a \\uD800-\\uDFFF escape; any other body is walked."""
    from nanovllm.entrypoints.errors import may_hold_lone_surrogate
    assert not may_hold_lone_surrogate(json.dumps({"prompt": list(range(500)), "stop": ["\u00e9"]}).encode())
    assert not may_hold_lone_surrogate(b'{"prompt": "\\u00e9\\uE000"}')       # escapes outside the range
    for raw in (b'{"prompt": "\\ud800"}', b'{"prompt": "\\uDFFF"}', b'{"p": "\\ud83d\\ude00"}',
                json.dumps({"prompt": "caf\u00e9"}, ensure_ascii=False).encode()):
        assert may_hold_lone_surrogate(raw), raw


def test_a_body_that_is_not_utf8_is_a_400(url):
    body = b'{"model": "tiny", "prompt": "\xff\xfe"}'
    raw_error(url, 400, body, headers={"Content-Type": "application/json"})


@pytest.mark.parametrize("messages, param", [
    ([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}, {"role": "user"}],
     "messages[2].content"),
    ([{"role": "user", "content": None}], "messages[0].content"),
    ([{"role": "user", "content": 5}], "messages[0].content"),                 # neither a string nor parts
    ([{"role": "user", "content": [{"type": "text"}]}], "messages[0].content[0].text"),
    ([{"content": "no role"}], "messages[0].role"),
])
def test_chat_message_errors_name_the_message(url, messages, param):
    """A message without content was rendered anyway, and the template's jinja UndefinedError
    came back naming only `messages`."""
    error = raw_error(url, 400, {"model": MODEL, "messages": messages}, path="/v1/chat/completions")
    assert error["param"] == param, error
    assert "Undefined" not in error["message"]


def test_request_size_limit(engine):
    """Bodies over --max-request-bytes get a 413 in OpenAI's shape, whether their
    Content-Length says so or they arrive in chunks; smaller ones are served."""
    with serving(build_app(engine, [MODEL], max_request_bytes=2000)) as url:
        big = {"model": MODEL, "prompt": "x" * 3000, "max_tokens": 2}
        error = raw_error(url, 413, big)
        assert error["code"] == "request_too_large" and "2000" in error["message"]

        def chunks():                               # no Content-Length: chunked transfer encoding
            data = json.dumps(big).encode()
            for i in range(0, len(data), 500):
                yield data[i:i + 500]
        resp = httpx.post(f"{url}/v1/completions", content=chunks(), timeout=30,
                          headers={"Content-Type": "application/json"})
        assert resp.status_code == 413 and resp.json()["error"]["code"] == "request_too_large"
        small = httpx.post(f"{url}/v1/completions", json={**big, "prompt": "x" * 100}, timeout=30)
        assert small.status_code == 200
    from nanovllm.__main__ import _parser
    assert _parser().parse_args(["serve", "m"]).max_request_bytes == 16 * 2**20      # the default: 16 MiB
