"""Tensor parallelism on the CPU: two gloo ranks (this process and one spawned worker).

TP=2 must give TP=1's greedy tokens, and the engine must never hang, leak a process, or
meet another engine: one after another in this process, two at once in two processes,
a worker killed mid-generation, Ctrl-C mid-generation, a parent killed outright.
"""
import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time

import pytest
import torch.distributed as dist

import nanovllm
from nanovllm import LLM, SamplingParams
from nanovllm.demo_model import build_tiny_checkpoint
from tests.conftest import assert_greedy_parts_only_at_near_ties, process_alive, wait_gone

PROMPTS = ["Hello, my name is", "The capital of France is",
           "List all prime numbers within 100: 2, 3, 5, 7, 11, 13, 17, 19, 23, 29, 31, 37, 41, 43, 47",
           "Paged attention"]
GREEDY = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)
ENGINE_ARGS = dict(device="cpu", dtype="float32", max_model_len=1024)
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(nanovllm.__file__)))


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("tp")
    return {
        # 2 KV heads over 2 ranks: split; vocab 512 splits evenly; LM head tied to the embedding.
        "tied": build_tiny_checkpoint(str(root / "tied")),
        # 1 KV head over 2 ranks: replicated; vocab 511: padded; separate LM head.
        "untied-mqa-vocab511": build_tiny_checkpoint(str(root / "untied"), seed=1, tie_word_embeddings=False,
                                                     num_key_value_heads=1, vocab_size=511),
        # Llama with biases on q/k/v/o and the MLP: each rank's bias slice goes with its weight slice.
        "llama-biases": build_tiny_checkpoint(str(root / "llama"), model_type="llama", attention_bias=True,
                                              mlp_bias=True),
    }


@pytest.fixture(scope="module")
def tp1_tokens(checkpoints):
    tokens = {}
    for name, path in checkpoints.items():
        llm = LLM(path, **ENGINE_ARGS)
        tokens[name] = _tokens(llm.generate(PROMPTS, GREEDY, use_tqdm=False))
        llm.llm_engine.shutdown()
    return tokens


def _tokens(outputs) -> list[list[int]]:
    return [list(o.outputs[0].token_ids) for o in outputs]


def _assert_clean(pids):
    """After shutdown: workers gone, process group destroyed, no watchdog thread, no shared memory."""
    assert wait_gone(pids, 10) == []
    assert not dist.is_initialized()
    assert not [t.name for t in threading.enumerate() if t.name.startswith("nanovllm-tp")]
    fds = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            fds.append(os.readlink(f"/proc/self/fd/{fd}"))
        except OSError:
            pass
    assert not [f for f in fds if f.startswith("/dev/shm")]


@pytest.mark.parametrize("name", [pytest.param("tied", marks=pytest.mark.slow), "untied-mqa-vocab511", "llama-biases"])
def test_tp2_matches_tp1(checkpoints, tp1_tokens, name):
    # A small batch budget makes chunked prefills, and steps that sample nothing.
    llm = LLM(checkpoints[name], tensor_parallel_size=2, max_num_batched_tokens=16, max_num_seqs=4,
              **ENGINE_ARGS)
    pids = llm.llm_engine.runner.worker_pids
    assert len(pids) == 1 and all(process_alive(p) for p in pids)
    assert _tokens(llm.generate(PROMPTS, GREEDY, use_tqdm=False)) == tp1_tokens[name]
    del llm
    _assert_clean(pids)


def test_logprobs_match_tp1(checkpoints):
    params = SamplingParams(temperature=0.0, max_tokens=6, logprobs=3, prompt_logprobs=2)
    ref = LLM(checkpoints["untied-mqa-vocab511"], **ENGINE_ARGS).generate(PROMPTS[:2], params, use_tqdm=False)
    llm = LLM(checkpoints["untied-mqa-vocab511"], tensor_parallel_size=2, **ENGINE_ARGS)
    out = llm.generate(PROMPTS[:2], params, use_tqdm=False)
    llm.llm_engine.shutdown()
    for a, b in zip(ref, out):
        for lp_a, lp_b in zip(a.outputs[0].logprobs + a.prompt_logprobs[1:],
                              b.outputs[0].logprobs + b.prompt_logprobs[1:]):
            assert lp_a.keys() == lp_b.keys()
            for t in lp_a:
                assert abs(lp_a[t].logprob - lp_b[t].logprob) < 1e-4


@pytest.mark.slow
def test_tp2_in_bf16_parts_from_tp1_only_at_near_ties(checkpoints):
    """The check the two-GPU test makes (tests/gpu/test_tp_gpu.py), here on gloo: in bf16
    the shards' sums round differently, so greedy runs may part, but only at near-ties."""
    args = {**ENGINE_ARGS, "dtype": "bfloat16"}
    params = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True, logprobs=5)
    ref = LLM(checkpoints["llama-biases"], **args).generate(PROMPTS, params, use_tqdm=False)
    llm = LLM(checkpoints["llama-biases"], tensor_parallel_size=2, **args)
    out = llm.generate(PROMPTS, params, use_tqdm=False)
    llm.llm_engine.shutdown()
    assert_greedy_parts_only_at_near_ties(ref, out, max_gap=0.25, max_logprob_diff=0.25)


@pytest.mark.slow
def test_engines_one_after_another(checkpoints, tp1_tokens):
    path = checkpoints["tied"]
    first = LLM(path, tensor_parallel_size=2, **ENGINE_ARGS)
    with pytest.raises(RuntimeError, match="already initialised"):     # one live TP engine per process
        LLM(path, tensor_parallel_size=2, **ENGINE_ARGS)
    assert _tokens(first.generate(PROMPTS, GREEDY, use_tqdm=False)) == tp1_tokens["tied"]
    first_pids = first.llm_engine.runner.worker_pids
    first.llm_engine.shutdown()
    first.llm_engine.shutdown()          # idempotent
    _assert_clean(first_pids)
    second = LLM(path, tensor_parallel_size=2, **ENGINE_ARGS)
    assert second.llm_engine.runner.worker_pids != first_pids
    assert _tokens(second.generate(PROMPTS, GREEDY, use_tqdm=False)) == tp1_tokens["tied"]
    second_pids = second.llm_engine.runner.worker_pids
    del second
    _assert_clean(second_pids)
    del first


def test_killed_worker_raises_instead_of_hanging(checkpoints):
    llm = LLM(checkpoints["tied"], tensor_parallel_size=2, **ENGINE_ARGS)
    pid = llm.llm_engine.runner.worker_pids[0]
    long = SamplingParams(temperature=0.0, max_tokens=900, ignore_eos=True)
    result = {}

    def generate():
        try:
            llm.generate(PROMPTS, long, use_tqdm=False)
            result["error"] = None
        except BaseException as e:
            result["error"] = e

    thread = threading.Thread(target=generate, daemon=True)
    thread.start()
    time.sleep(1.0)                        # well inside the generation
    os.kill(pid, signal.SIGKILL)
    thread.join(timeout=60)
    assert not thread.is_alive(), "generate hung after a worker died"
    error = result["error"]
    assert isinstance(error, RuntimeError) and "worker rank 1" in str(error) and "signal 9" in str(error)
    start = time.monotonic()
    with pytest.raises(RuntimeError, match="cannot run"):        # and at once on the next call
        llm.generate(PROMPTS[:1], GREEDY, use_tqdm=False)
    assert time.monotonic() - start < 5
    llm.llm_engine.shutdown()
    _assert_clean([pid])


_CHILD = textwrap.dedent("""
    import json, os, sys, time
    from nanovllm import LLM, SamplingParams

    def main():
        path, mode = sys.argv[1], sys.argv[2]
        llm = LLM(path, tensor_parallel_size=2, device="cpu", dtype="float32", max_model_len=1024)
        prompts = json.loads(sys.argv[3])
        greedy = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)
        tokens = [list(o.outputs[0].token_ids) for o in llm.generate(prompts, greedy, use_tqdm=False)]
        print(json.dumps({"pids": llm.llm_engine.runner.worker_pids, "tokens": tokens}), flush=True)
        if mode == "orphan":
            time.sleep(120)             # until the test kills this process
            return
        sys.stdin.readline()            # the test says go once both engines are up
        print("generating", flush=True)
        try:
            llm.generate(prompts, SamplingParams(max_tokens=900, ignore_eos=True), use_tqdm=False)
            print("not interrupted", flush=True)
        except KeyboardInterrupt:
            print("interrupted", flush=True)
        again = [list(o.outputs[0].token_ids) for o in llm.generate(prompts, greedy, use_tqdm=False)]
        print(json.dumps({"again": again}), flush=True)
        # no shutdown: interpreter exit must stop the worker

    if __name__ == "__main__":
        main()
""")


@pytest.mark.slow
def test_two_processes_at_once_ctrl_c_and_parent_death(checkpoints, tp1_tokens, tmp_path):
    script = tmp_path / "child.py"
    script.write_text(_CHILD)
    env = {**os.environ, "PYTHONPATH": REPO_ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    children = {mode: subprocess.Popen(
        [sys.executable, str(script), checkpoints["tied"], mode, json.dumps(PROMPTS)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
        start_new_session=True) for mode in ("ctrl-c", "orphan")}
    try:
        first = {}
        for mode, child in children.items():
            line = child.stdout.readline()
            assert line, f"{mode} child failed:\n{child.stderr.read()}"
            first[mode] = json.loads(line)
            assert first[mode]["tokens"] == tp1_tokens["tied"]
            assert all(process_alive(p) for p in first[mode]["pids"])
        # Both engines are up at once. Kill the orphan's parent outright: its worker must notice.
        children["orphan"].kill()
        children["orphan"].wait(timeout=10)
        assert wait_gone(first["orphan"]["pids"], 20) == [], "worker outlived its killed parent"

        # Ctrl-C as a terminal sends it: to the whole process group (the worker ignores it).
        child = children["ctrl-c"]
        child.stdin.write("go\n")
        child.stdin.flush()
        assert child.stdout.readline().strip() == "generating"
        time.sleep(1.0)
        os.killpg(child.pid, signal.SIGINT)
        out, err = child.communicate(timeout=60)
        lines = out.splitlines()
        assert lines[0] == "interrupted", err
        assert json.loads(lines[1])["again"] == tp1_tokens["tied"]      # the engine survived Ctrl-C
        assert child.returncode == 0, err
        assert wait_gone(first["ctrl-c"]["pids"], 10) == [], "worker outlived interpreter exit"
    finally:
        for child in children.values():
            if child.poll() is None:
                child.kill()
                child.wait()
