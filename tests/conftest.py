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


def wait_idle(engine, timeout: float = 10) -> None:
    """Until an AsyncLLM's engine thread has applied every command (all requests gone)."""
    deadline = time.monotonic() + timeout
    while engine.engine.has_unfinished_requests() or engine._commands:
        assert time.monotonic() < deadline, "engine did not become idle"
        time.sleep(0.01)
