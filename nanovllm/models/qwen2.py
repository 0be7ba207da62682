"""Qwen2 / Qwen2.5: the Llama architecture with biases on the q, k and v projections (and,
with use_sliding_window, sliding-window attention from layer max_window_layers on)."""
from nanovllm.models.llama import LlamaForCausalLM


class Qwen2ForCausalLM(LlamaForCausalLM):
    @staticmethod
    def attention_options(config) -> dict:
        return dict(qkv_bias=True, o_bias=False, qk_norm=False)
