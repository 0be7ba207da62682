"""Qwen3: the Llama architecture plus an RMSNorm on each query and key head before RoPE."""
from nanovllm.models.llama import LlamaForCausalLM


class Qwen3ForCausalLM(LlamaForCausalLM):
    @staticmethod
    def attention_options(config) -> dict:
        bias = getattr(config, "attention_bias", False)
        return dict(qkv_bias=bias, o_bias=bias, qk_norm=True)
