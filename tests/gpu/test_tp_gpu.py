"""Tensor parallelism on two GPUs (NCCL): TP=2 gives TP=1's greedy tokens in bf16 with CUDA
graphs, and a killed worker makes the engine raise instead of hanging."""
import json
import os
import signal
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.distributed as dist

from nanovllm import LLM, SamplingParams
from nanovllm.demo_model import build_tiny_checkpoint
from tests.conftest import assert_greedy_parts_only_at_near_ties, random_prompts

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA GPUs")]

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# Small enough to start fast, large enough that the shards do real work; vocab 1001 is padded
# over two ranks, and 2 KV heads split one per rank.
SHAPE = dict(vocab_size=1001, hidden_size=256, intermediate_size=768, num_hidden_layers=4,
             num_attention_heads=8, num_key_value_heads=2, head_dim=32, tie_word_embeddings=False)
ENGINE_ARGS = dict(device="cuda", dtype="bfloat16", max_model_len=1024, max_num_seqs=16,
                   num_gpu_blocks_override=512)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return build_tiny_checkpoint(str(tmp_path_factory.mktemp("tp-gpu")), dtype=torch.bfloat16, **SHAPE)


@pytest.fixture(scope="module")
def prompts():
    return random_prompts(12, 5, 200, seed=11)


def _generate(path, prompts, **kwargs):
    llm = LLM(path, **ENGINE_ARGS, **kwargs)
    params = SamplingParams(temperature=0, max_tokens=48, ignore_eos=True, logprobs=5)
    outputs = llm.generate(prompts, params, use_tqdm=False)
    runner = llm.llm_engine.runner
    used_graphs = runner.graphs is not None
    pids = getattr(runner, "worker_pids", [])
    llm.llm_engine.shutdown()
    del llm, runner
    torch.cuda.empty_cache()
    return outputs, used_graphs, pids


def test_tp2_matches_tp1_bf16_cuda_graphs(checkpoint, prompts):
    ref, ref_graphs, _ = _generate(checkpoint, prompts)
    out, out_graphs, pids = _generate(checkpoint, prompts, tensor_parallel_size=2)
    assert ref_graphs and out_graphs
    assert not dist.is_initialized()
    # Sums over two shards round differently in bf16 (this flat random model's top logits
    # are often within one bf16 step), so a sequence may part at a near-tie, even early; a
    # sharding bug moves logprobs by whole units. The bounds are ~2x what a CPU run of this
    # test in bf16 shows (logprobs within 0.12, gaps at most 0.0625).
    assert_greedy_parts_only_at_near_ties(ref, out, max_gap=0.25, max_logprob_diff=0.25)
    for pid in pids:
        assert not os.path.exists(f"/proc/{pid}")


_CHILD = textwrap.dedent("""
    import faulthandler, json, os, signal, sys, threading, time
    from nanovllm import LLM, SamplingParams

    def main():
        faulthandler.dump_traceback_later(100, exit=True)     # a hang shows its stacks
        llm = LLM(sys.argv[1], tensor_parallel_size=2, **json.loads(sys.argv[2]))
        pid = llm.llm_engine.runner.worker_pids[0]
        threading.Timer(1.0, lambda: os.kill(pid, signal.SIGKILL)).start()
        start = time.monotonic()
        try:
            for _ in range(100):
                llm.generate([[5] * 50] * 8, SamplingParams(max_tokens=500, ignore_eos=True), use_tqdm=False)
            print("no error")
        except RuntimeError as e:
            print(json.dumps({"error": str(e), "after_s": time.monotonic() - start}), flush=True)
        llm.llm_engine.shutdown()
        import torch.distributed as dist
        print(json.dumps({"shut_down_s": time.monotonic() - start, "dist_initialized": dist.is_initialized()}),
              flush=True)

    if __name__ == "__main__":
        main()
""")


def test_killed_worker_raises_on_gpu(checkpoint, tmp_path):
    """The NCCL path: the watchdog aborts the communicator so rank 0 does not wait forever.
    Run in a subprocess so that a hang fails the test instead of the test session."""
    script = tmp_path / "child.py"
    script.write_text(_CHILD)
    env = {**os.environ, "PYTHONPATH": REPO_ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    child = subprocess.Popen([sys.executable, str(script), checkpoint, json.dumps(ENGINE_ARGS)],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                             start_new_session=True)
    try:
        out, err = child.communicate(timeout=150)
    except subprocess.TimeoutExpired:
        os.killpg(child.pid, signal.SIGKILL)
        out, err = child.communicate()
        pytest.fail(f"the engine hung after a worker was killed:\n{err[-3000:]}")
    results = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    assert len(results) == 2, f"the child did not fail and shut down:\n{out}\n{err[-4000:]}"
    assert "worker rank 1" in results[0]["error"], results
    assert results[0]["after_s"] < 60 and results[1]["shut_down_s"] < 90, results
    # Torn down, so another engine could start in this process; or, where NCCL's abort of a
    # communicator whose all-reduce (inside a CUDA graph) waits for the killed peer does not
    # return within the shutdown's grace (seen on 2 x H200, 2026-11-27), left as it is, and
    # the engine says so: another tensor-parallel engine then needs a new process.
    assert not results[1]["dist_initialized"] or "could not be aborted" in err, results
