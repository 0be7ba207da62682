"""The benchmarks: bench.py's workloads, its floor and CPU preset, and step_timeline's per-step record."""
import argparse
import importlib.util
import json
import math
import os
import subprocess
import sys
import time
from types import SimpleNamespace

import pytest

from nanovllm import LLM, SamplingParams
from nanovllm.bench_workload import (CPU_MAX_NUM_SEQS, CPU_WORKLOADS, WORKLOADS, Workload, WorkloadSpec,
                                     add_workload_args, make_workload)
from nanovllm.models.shapes import SHAPES
from nanovllm.sampling_params import RequestOutputKind

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _load(relative_path: str):
    spec = importlib.util.spec_from_file_location(os.path.basename(relative_path)[:-3],
                                                  os.path.join(ROOT, relative_path))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


bench = _load("bench.py")


def workload(*flags: str, cpu: bool = False) -> Workload:
    parser = argparse.ArgumentParser()
    add_workload_args(parser)
    return make_workload(parser.parse_args(list(flags)), cpu=cpu)


def test_nano_is_nano_vllms_workload():
    w = workload()
    assert (len(w.prompts), w.output_tokens, w.max_model_len, w.shared_prefix) == (256, 133966, 4096, 0)
    assert all(100 <= len(p) <= 1024 for p in w.prompts) and all(100 <= n <= 1024 for n in w.output_lens)
    assert workload("--workload", "nano").prompts == w.prompts                   # seeded
    assert workload("--seed", "1").prompts != w.prompts


@pytest.mark.parametrize("cpu", [False, True], ids=["full", "cpu"])
def test_workloads_have_their_shape(cpu):
    specs = CPU_WORKLOADS if cpu else WORKLOADS
    for name, spec in specs.items():
        w = workload("--workload", name, cpu=cpu)
        assert w == workload("--workload", name, cpu=cpu), name               # deterministic
        assert len(w.prompts) == len(w.output_lens) == spec.num_seqs, name
        own = [len(p) - spec.shared_prefix for p in w.prompts]
        assert all(spec.min_input <= n <= spec.max_input for n in own), name
        assert all(spec.min_output <= n <= spec.max_output for n in w.output_lens), name
        assert max(len(p) + n for p, n in zip(w.prompts, w.output_lens)) <= w.max_model_len, name
    # chat: more requests than the engine runs at once, so they join as others finish.
    assert specs["chat"].num_seqs > (CPU_MAX_NUM_SEQS if cpu else 256)
    # prefix: every prompt starts with the same system prompt, then its own tokens.
    w = workload("--workload", "prefix", cpu=cpu)
    prefix = w.prompts[0][:w.shared_prefix]
    assert w.shared_prefix == specs["prefix"].shared_prefix > 0
    assert all(p[:w.shared_prefix] == prefix for p in w.prompts)
    assert len({tuple(p[w.shared_prefix:w.shared_prefix + 8]) for p in w.prompts}) == len(w.prompts)
    if not cpu:
        assert min(map(len, workload("--workload", "long").prompts)) >= 16000
        assert WORKLOADS["chat"] == WorkloadSpec(1024, 200, 600, 20, 200, max_model_len=1024)     # issue 16's


def test_flags_override_the_preset():
    w = workload("--workload", "chat", "--num-seqs", "5", "--max-input", "3000", "--min-input", "2990")
    assert len(w.prompts) == 5 and all(len(p) >= 2990 for p in w.prompts)
    assert w.max_model_len == 4096                     # grown to hold the longer prompts
    with pytest.raises(ValueError, match=r"--min-output \(100\) must not exceed --max-output \(10\)"):
        workload("--max-output", "10")


def test_a_shape_checkpoints_tokenizer_spells_every_id_of_its_vocabulary(tmp_path):
    """Random weights sample from the whole vocabulary: every id must spell text, or a server
    streams nothing until the end (a token that spells nothing is held back)."""
    import random

    from transformers import AutoTokenizer

    from nanovllm.models.shapes import shape_checkpoint_dir
    tokenizer = AutoTokenizer.from_pretrained(shape_checkpoint_dir("smollm2-135m", root=str(tmp_path)))
    assert len(tokenizer) == SHAPES["smollm2-135m"]["vocab_size"]
    special = set(tokenizer.all_special_ids)
    ids = [i for i in random.Random(0).sample(range(len(tokenizer)), 2000) if i not in special]
    assert all(tokenizer.decode([i]) for i in ids)
    assert tokenizer.decode(tokenizer.encode("The capital of France is Paris.")) == "The capital of France is Paris."
    assert tokenizer.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False).startswith("<|im_start|>")


def _config(shape: str) -> SimpleNamespace:
    return SimpleNamespace(**SHAPES[shape])


def test_floor():
    qwen3 = _config("qwen3-0.6b")
    nano = workload()
    seconds = bench.floor_seconds(nano, qwen3, 3.0e12, 790e12, max_num_seqs=256)
    assert 25_400 < nano.output_tokens / seconds < 25_540          # docs/benchmarks.md: 25,538 before attention FLOPs
    assert bench.floor_seconds(nano, qwen3, 3.0e12, 790e12, 256, tp=2) == pytest.approx(seconds / 2)

    # The shared prefix is computed once: the same prompts without the prefix cache cost more.
    shared = workload("--workload", "prefix")
    unshared = Workload(shared.prompts, shared.output_lens)
    assert bench.floor_seconds(shared, qwen3, 3e12, 790e12, 256) < bench.floor_seconds(unshared, qwen3, 3e12, 790e12, 256)
    # More requests than max_num_seqs: at least (output tokens) / max_num_seqs decode steps, each
    # reading Qwen3-0.6B's 595,984,384 bf16 parameters once.
    chat = workload("--workload", "chat")
    assert max(chat.output_lens) < math.ceil(chat.output_tokens / 256)
    extra_steps = math.ceil(chat.output_tokens / 16) - math.ceil(chat.output_tokens / 256)
    assert (bench.floor_seconds(chat, qwen3, 3e12, 790e12, 16) - bench.floor_seconds(chat, qwen3, 3e12, 790e12, 256)
            == pytest.approx(2 * 595_984_384 * extra_steps / 3e12))


def test_floor_only_where_the_rates_are_known():
    def rates(*flags):
        return bench.peak_rates(bench.parse_args(list(flags)), "cpu")
    assert rates() is None
    assert rates("--bandwidth", "1e11") is None                    # FLOP/s still unknown
    assert rates("--bandwidth", "1e11", "--flops", "2e12") == (1e11, 2e12, "--bandwidth/--flops")


def test_help_lists_the_shapes_and_what_runs_where():
    result = subprocess.run([sys.executable, "bench.py", "--help"], cwd=ROOT, capture_output=True, text=True,
                            timeout=60, check=True)
    for name in [*SHAPES, *WORKLOADS, "on a CUDA GPU", "CPU preset", "--bandwidth", "--preset"]:
        assert name in result.stdout, name


@pytest.mark.slow
def test_cpu_preset_finishes(tmp_path):
    """bench.py on a CPU picks its CPU preset by itself, prints no floor, and then the decode speed
    and the peak memory (here cut to 3 requests and a few decoded tokens)."""
    out = tmp_path / "bench.jsonl"
    flags = ["--num-seqs", "3", "--min-output", "8", "--max-output", "12"]
    env = {**os.environ, "NANOVLLM_CACHE": str(tmp_path / "cache")}
    result = subprocess.run([sys.executable, "bench.py", "--device", "cpu", "--enforce-eager", "--quiet",
                             "--decode-tokens", "3", "--json", str(out), *flags],
                            cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "CPU preset (the engine runs on the CPU)" in result.stdout
    assert "floor" not in result.stdout
    for batch in (1, 16):
        assert f"nanovllm decode, {batch} sequence(s): " in result.stdout
    assert "peak memory (RSS) of this process: " in result.stdout
    row = json.loads(out.read_text())
    assert (row["preset"], row["shape"], row["device"]) == ("cpu", "smollm2-135m", "cpu")
    assert row["output_tokens"] == workload(*flags, cpu=True).output_tokens and row["tok_per_s"] > 0


def test_step_timeline_records_each_step_and_plots(tiny_qwen3, tmp_path):
    timeline = _load("benchmarks/step_timeline.py")
    llm = LLM(tiny_qwen3, device="cpu", max_num_seqs=2, enforce_eager=True)
    engine = llm.llm_engine
    prompts, max_tokens = [[5] * 20, [6] * 30, [7] * 40], [3, 6, 9]
    for i, (prompt, n) in enumerate(zip(prompts, max_tokens)):
        engine.add_request(str(i), prompt, SamplingParams(max_tokens=n, ignore_eos=True,
                                                          output_kind=RequestOutputKind.FINAL_ONLY))
    steps = timeline.run_steps(engine)
    # Every prompt token computed once, and every token after each request's first decoded once.
    assert sum(s.prefill_tokens for s in steps) == sum(map(len, prompts))
    assert sum(s.decode_tokens for s in steps) == sum(n - 1 for n in max_tokens)
    assert max(s.decode_tokens for s in steps) <= 2                # max_num_seqs
    assert all(s.seconds >= s.waiting >= 0 for s in steps)
    assert {"prefill", "decode"} <= {s.kind for s in steps}
    assert "decode   1-64" in timeline.summary(steps)
    path = tmp_path / "steps.png"
    timeline.plot(steps, str(path), "tiny")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bench_serve_sends_again_only_what_the_server_never_answered():
    """A connection that breaks before any response (a kept-alive connection the server had
    closed) is retried, up to MAX_RETRIES times, with the time lost counted; one that breaks
    mid-stream is a failure, not retried."""
    import asyncio
    import httpx
    bench_serve = _load("benchmarks/bench_serve.py")
    calls = []
    stream = ('data: {"choices": [{"text": "a"}]}\n\n'
              'data: {"choices": [], "usage": {"completion_tokens": 1}}\n\ndata: [DONE]\n\n')

    def handler(request):
        calls.append(request.url.path)
        behaviour = plan.pop(0)
        if behaviour == "closed":
            raise httpx.ReadError("connection closed", request=request)
        if behaviour == "cut":
            async def cut():
                yield b'data: {"choices": [{"text": "a"}]}\n\n'
                raise httpx.ReadError("connection reset", request=request)
            return httpx.Response(200, content=cut())
        return httpx.Response(200, text=stream)

    async def send():
        async with httpx.AsyncClient(transport=httpx.MockTransport(handler)) as client:
            return await bench_serve.request_with_retries(client, "http://x", "m", [1, 2], 1, 0.0)

    plan = ["closed", "closed", "ok"]
    result = asyncio.run(send())
    assert result.error is None and result.retries == 2 and result.output_tokens == 1 and len(calls) == 3
    plan, calls[:] = ["closed"] * (bench_serve.MAX_RETRIES + 1), []
    result = asyncio.run(send())
    assert result.error.startswith("NoResponse") and len(calls) == bench_serve.MAX_RETRIES + 1
    plan, calls[:] = ["cut", "ok"], []
    result = asyncio.run(send())
    assert "after HTTP 200 and 1 chunks" in result.error and len(calls) == 1


def test_bench_serve_against_the_stub_model_server(tiny_qwen3, tmp_path):
    """The serving benchmark end to end on a CPU: serve_stub_model.py (the real server and
    engine process, a stub forward pass) answers every request of bench_serve.py with the
    tokens it asked for."""
    import urllib.request
    port, flags = 8391, ["--workload", "chat", "--preset", "full", "--num-seqs", "24", "--min-input", "10",
                         "--max-input", "40", "--min-output", "5", "--max-output", "20", "--max-token-id", "300"]
    server = subprocess.Popen([sys.executable, os.path.join(ROOT, "benchmarks/serve_stub_model.py"), tiny_qwen3,
                               "--step-ms", "1", "--port", str(port), "--device", "cpu", "--max-model-len", "512",
                               "--uvicorn-log-level", "warning"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        for _ in range(240):
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1)
                break
            except OSError:
                assert server.poll() is None, "the stub server exited"
                time.sleep(0.5)
        out = tmp_path / "serve.jsonl"
        client = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks/bench_serve.py"), "--url",
                                 f"http://127.0.0.1:{port}", "--concurrency", "8", "--json", str(out), *flags],
                                capture_output=True, text=True, timeout=240)
        assert client.returncode == 0, client.stdout + client.stderr
        summary = json.loads(out.read_text().splitlines()[-1])
        assert summary["num_requests"] == 24 and summary["failed_requests"] == 0, summary
        assert summary["output_tokens"] == workload(*flags[:2], *flags[4:]).output_tokens
    finally:
        server.terminate()
        server.wait(timeout=60)
