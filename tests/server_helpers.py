"""The server under test: a tiny model's AsyncLLM, served by uvicorn on a free loopback port
in a background thread, and the clients and references the server tests share. Test modules
import the fixtures they use (each module starts its own engine)."""
import contextlib
import socket
import threading
import time

import httpx
import openai
import pytest
import uvicorn

from nanovllm import LLM, SamplingParams
from nanovllm.entrypoints.async_llm import AsyncLLM
from nanovllm.entrypoints.openai_server import build_app

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


def raw_error(url: str, status: int, body, headers=None, path: str = "/v1/completions") -> dict:
    kwargs = {"content": body} if isinstance(body, (str, bytes)) else {"json": body}
    resp = httpx.post(f"{url}{path}", headers=headers, timeout=30, **kwargs)
    assert resp.status_code == status, resp.text
    error = resp.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    return error
