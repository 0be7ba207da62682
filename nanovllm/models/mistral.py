"""Mistral: the Llama architecture with sliding-window attention in every layer (its config's
`sliding_window`; see sliding_window.sliding_windows)."""
from nanovllm.models.llama import LlamaForCausalLM


class MistralForCausalLM(LlamaForCausalLM):
    pass
