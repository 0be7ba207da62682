"""A failing engine: what the server's clients see (one line, no traceback), /health, the
log (the traceback once), and `nanovllm serve` exiting so that a supervisor restarts it.
Each test kills its own engine."""
import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time

import httpx

from nanovllm.entrypoints.async_llm import AsyncLLM
from nanovllm.entrypoints.openai_server import build_app
from nanovllm.sampling_params import SamplingParams
from tests.conftest import wait_gone
from tests.server_helpers import ENGINE_KWARGS, MODEL, PROMPTS, serving
from tests.test_server_cli import SCRIPT, engine_process_of, free_port, wait_healthy

LONG = {"model": MODEL, "prompt": PROMPTS[0], "max_tokens": 200, "ignore_eos": True}


class FailsInAStep(SamplingParams):
    """Params that pass every check (when made and when added), then fail where a step reads
    them to sample: standing for any failure inside a step."""
    @property
    def is_greedy(self) -> bool:
        if sys._getframe(1).f_code.co_filename.endswith("sampling_metadata.py"):
            raise TypeError("a failure inside the step")
        return super().is_greedy


def one_line(message: str) -> bool:
    return "\n" not in message and "Traceback" not in message and 'File "' not in message


def test_a_failing_step_ends_every_request_with_one_line(tiny_qwen3, caplog):
    """A step raises (here: a request whose params fail only inside a step, FailsInAStep): the
    requests in flight, streamed or not, and the one that caused it get a one-line 500; /health
    answers 503; the traceback is logged once."""
    engine = AsyncLLM(tiny_qwen3, **ENGINE_KWARGS)
    server_log = []                     # what uvicorn logs (its loggers do not reach caplog's)
    collect = logging.Handler()
    collect.emit = server_log.append
    try:
        app = build_app(engine, [MODEL])
        handlers = app.state.server
        validated = handlers._params

        def spoiled(body):
            params = validated(body)
            if body.user == "spoiler":
                params.__class__ = FailsInAStep
            return params
        handlers._params = spoiled
        with serving(app) as url, httpx.Client(base_url=url, timeout=30) as http:
            logging.getLogger("uvicorn.error").addHandler(collect)      # after uvicorn set its logging up
            plain = {}
            waiting = threading.Thread(target=lambda: plain.update(r=http.post("/v1/completions", json=LONG)))
            with http.stream("POST", "/v1/completions", json={**LONG, "stream": True}) as stream:
                lines = stream.iter_lines()
                assert next(lines).startswith("data: {")
                waiting.start()
                deadline = time.monotonic() + 20
                while engine.stats().num_unfinished_requests < 2:     # both are in flight
                    assert time.monotonic() < deadline
                    time.sleep(0.01)
                spoiler = http.post("/v1/completions", json={**LONG, "max_tokens": 4, "user": "spoiler"})
                events = [json.loads(line[len("data: "):]) for line in lines if line.startswith("data: {")]
            waiting.join(timeout=30)
            errors = [spoiler.json()["error"], plain["r"].json()["error"], events[-1]["error"]]
            assert spoiler.status_code == plain["r"].status_code == 500
            for error in errors:
                assert one_line(error["message"]) and "TypeError" in error["message"], error
            health = http.get("/health")
            assert health.status_code == 503 and "TypeError" in health.json()["error"]["message"]
            after = http.post("/v1/completions", json={**LONG, "max_tokens": 2})
            assert after.status_code == 500 and one_line(after.json()["error"]["message"])
    finally:
        engine.shutdown_sync()
        logging.getLogger("uvicorn.error").removeHandler(collect)
    # no traceback from the server for the 500s: they answer the engine's failure, logged once below
    assert not [r for r in server_log if r.exc_info], [r.getMessage() for r in server_log]
    logged = [r for r in caplog.records if "Traceback" in (r.getMessage() + (r.exc_text or ""))
              or r.exc_info is not None]
    assert len(logged) == 1 and "a failure inside the step" in logged[0].getMessage(), \
        [r.getMessage()[:200] for r in logged]
    assert logged[0].levelno == logging.ERROR


def test_serve_exits_when_its_engine_dies(tiny_qwen3):
    """The engine process is killed: `nanovllm serve` ends the open stream with an error
    event, then exits with code 1 within seconds, having logged the cause once (it used to
    run on, answering 500 forever)."""
    port = free_port()
    server = subprocess.Popen([SCRIPT, "serve", tiny_qwen3, "--device", "cpu", "--port", str(port),
                               "--host", "127.0.0.1", "--max-model-len", "256", "--served-model-name", MODEL,
                               "--uvicorn-log-level", "warning"], stderr=subprocess.PIPE, text=True)
    base = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(server, base)
        engine = engine_process_of(server.pid)
        with httpx.stream("POST", f"{base}/v1/completions", json={**LONG, "stream": True}, timeout=30) as stream:
            lines = stream.iter_lines()
            assert next(lines).startswith("data: {")
            signal_sent = time.monotonic()
            os.kill(engine, signal.SIGKILL)
            events = [line for line in lines if line.startswith("data: ")]
        assert '"error"' in events[-2] and events[-1] == "data: [DONE]"
        _, err = server.communicate(timeout=20)
        assert server.returncode == 1, err
        assert time.monotonic() - signal_sent < 10
        assert err.count("The engine failed") == 1 and "killed by signal 9" in err, err
        assert "Traceback" not in err, err
        assert wait_gone([engine], 5) == []
    finally:
        server.kill()
        server.wait()
