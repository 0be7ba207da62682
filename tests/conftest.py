"""Shared fixtures: tiny random checkpoints (built once per session) and a transformers
reference for greedy generation on the same files."""
import os
import random
import time

import pytest
import torch

# Without a GPU, Triton kernels run in Triton's CPU interpreter. The mode is fixed when triton
# is imported, so set it before anything can import triton.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from nanovllm.demo_model import build_tiny_checkpoint


@pytest.fixture(scope="session")
def tiny_qwen3(tmp_path_factory) -> str:
    """Qwen3 with GQA (4 query heads, 2 KV heads) and a tied LM head."""
    return build_tiny_checkpoint(str(tmp_path_factory.mktemp("qwen3-gqa")))


@pytest.fixture(scope="session")
def checkpoint_factory(tmp_path_factory):
    """Build (and cache) a tiny checkpoint per (model_type, config overrides)."""
    built = {}

    def make(model_type: str = "qwen3", **overrides) -> str:
        key = (model_type, repr(sorted(overrides.items(), key=str)))
        if key not in built:
            path = tmp_path_factory.mktemp(model_type)
            built[key] = build_tiny_checkpoint(str(path), model_type=model_type, **overrides)
        return built[key]
    return make


def random_prompts(count: int, min_len: int, max_len: int, vocab: int = 400, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(3, vocab) for _ in range(rng.randint(min_len, max_len))] for _ in range(count)]


def hf_greedy(path: str, prompts: list[list[int]], max_new_tokens: int, ignore_eos: bool = False) -> list[list[int]]:
    """transformers' greedy continuation of each prompt, one prompt at a time (no padding)."""
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    outs = []
    for ids in prompts:
        kwargs = dict(max_new_tokens=max_new_tokens, do_sample=False)
        if ignore_eos:
            kwargs.update(eos_token_id=None, min_new_tokens=max_new_tokens)
        with torch.no_grad():
            out = model.generate(torch.tensor([ids]), **kwargs)
        outs.append(out[0, len(ids):].tolist())
    return outs


def assert_greedy_parts_only_at_near_ties(ref_outputs, outputs, max_gap: float, max_logprob_diff: float) -> None:
    """Greedy runs of one model computed two ways in bf16 (graphs vs eager, sharded vs not)
    round differently, so a sequence may part from the reference where the reference's
    top tokens are nearly tied; a real bug shifts the distribution by far more. Checks, per
    sequence: up to the parting, each chosen token's logprob agrees within max_logprob_diff;
    at the parting, the other run's token is in the reference's top logprobs, within max_gap
    of the reference's choice. Both runs need SamplingParams(logprobs=k)."""
    assert len(ref_outputs) == len(outputs)
    for ref, out in zip(ref_outputs, outputs):
        ref, out = ref.outputs[0], out.outputs[0]
        assert len(ref.token_ids) == len(out.token_ids), "the runs generated different numbers of tokens"
        split = next((i for i, (x, y) in enumerate(zip(ref.token_ids, out.token_ids)) if x != y), None)
        for i in range(len(ref.token_ids) if split is None else split):
            token = ref.token_ids[i]
            diff = abs(ref.logprobs[i][token].logprob - out.logprobs[i][token].logprob)
            assert diff < max_logprob_diff, f"token {i}: logprob differs by {diff}"
        if split is not None:
            x, y = ref.token_ids[split], out.token_ids[split]
            other = ref.logprobs[split].get(y)
            assert other is not None, f"parted at token {split} to a token outside the reference's top logprobs"
            gap = ref.logprobs[split][x].logprob - other.logprob
            assert gap < max_gap, f"parted at token {split} with a logprob gap of {gap}"


def wait_idle(engine, timeout: float = 10):
    """Until an AsyncLLM's engine has applied every command sent so far and has no request
    left; returns its last EngineStats."""
    deadline = time.monotonic() + timeout
    while (stats := engine.stats()).num_unfinished_requests:
        assert time.monotonic() < deadline, "engine did not become idle"
        time.sleep(0.01)
    return stats


def process_alive(pid: int) -> bool:
    """Running (a zombie nobody reaped counts as gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def wait_gone(pids, timeout: float) -> list[int]:
    """Wait up to `timeout` s for the processes to end; returns those still running."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and any(process_alive(p) for p in pids):
        time.sleep(0.1)
    return [p for p in pids if process_alive(p)]


# Where the Triton kernels run in the engine tests: on the GPU when there is one, else on the
# CPU in Triton's interpreter (a CPU engine on a GPU machine would hand them host tensors).
KERNEL_DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def fused_sampler_llm(model: str, **kwargs):
    """An LLM whose sampler is the CUDA path (Triton kernels): on the GPU when there is one
    (where it is the default), else a CPU engine with the kernels in Triton's interpreter."""
    from nanovllm import LLM
    from nanovllm.layers.sampler import Sampler
    if torch.cuda.is_available():
        return LLM(model, device="cuda", dtype="float32", enforce_eager=True, **kwargs)
    llm = LLM(model, device="cpu", **kwargs)
    llm.llm_engine.runner.sampler = Sampler(fused=True)
    return llm
