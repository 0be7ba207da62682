"""Mistral: the Llama architecture. Sliding-window attention is not implemented, so a
checkpoint whose window is shorter than the context we would serve is refused."""
from nanovllm.models.llama import LlamaForCausalLM


class MistralForCausalLM(LlamaForCausalLM):
    @staticmethod
    def check_supported(config, max_model_len: int) -> None:
        window = getattr(config, "sliding_window", None)
        if window is not None and window < max_model_len:
            raise ValueError(
                f"sliding-window attention is not supported yet: this Mistral checkpoint has "
                f"sliding_window={window} < max_model_len={max_model_len}. Pass max_model_len={window} "
                f"(or smaller) to run it with full attention inside the window.")
