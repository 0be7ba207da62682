"""Greedy token-for-token parity with transformers on tiny random checkpoints."""
import pytest

from nanovllm import LLM, SamplingParams
from tests.conftest import hf_greedy, random_prompts

LLAMA3_ROPE = {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 64}

SHAPES = {
    "qwen3-gqa-tied": ("qwen3", {}),
    "qwen3-mqa": ("qwen3", {"num_key_value_heads": 1}),
    "qwen3-untied": ("qwen3", {"tie_word_embeddings": False}),
    "qwen3-mha-headdim32": ("qwen3", {"num_key_value_heads": 4, "head_dim": 32}),
    "llama-llama3-rope-biases": ("llama", {"rope_parameters": LLAMA3_ROPE, "attention_bias": True,
                                           "mlp_bias": True, "tie_word_embeddings": False}),
    "llama-linear-rope": ("llama", {"rope_parameters": {"rope_type": "linear", "rope_theta": 10000.0,
                                                        "factor": 2.0}}),
    "qwen2-biases": ("qwen2", {}),
    "mistral": ("mistral", {"sliding_window": None}),
    # every layer attends to its last 8 keys only; the prompts are far longer
    "mistral-sliding-window": ("mistral", {"sliding_window": 8}),
}


@pytest.mark.parametrize("name", list(SHAPES))
def test_greedy_parity_with_transformers(name, checkpoint_factory):
    model_type, overrides = SHAPES[name]
    path = checkpoint_factory(model_type, **overrides)
    prompts = random_prompts(5, 3, 150, seed=1)      # up to ~10 blocks of 16 tokens
    expected = hf_greedy(path, prompts, max_new_tokens=12)
    llm = LLM(path, device="cpu", block_size=16)
    outputs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=12), use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outputs] == expected


def test_text_prompts_and_chat_match_transformers(tiny_qwen3):
    llm = LLM(tiny_qwen3, device="cpu")
    tok = llm.get_tokenizer()
    prompt = "The capital of France is"
    out = llm.generate(prompt, SamplingParams(temperature=0, max_tokens=10), use_tqdm=False)[0]
    assert out.prompt == prompt and out.prompt_token_ids == tok.encode(prompt)
    assert out.outputs[0].token_ids == hf_greedy(tiny_qwen3, [tok.encode(prompt)], 10)[0]
    messages = [{"role": "user", "content": "Hello, my name is"}]
    chat = llm.chat(messages, SamplingParams(temperature=0, max_tokens=10), use_tqdm=False)[0]
    ids = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)
    assert chat.prompt_token_ids == list(ids)
    assert chat.outputs[0].token_ids == hf_greedy(tiny_qwen3, [list(ids)], 10)[0]
