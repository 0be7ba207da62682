"""Which model class serves a checkpoint, chosen by its config's `architectures`."""
from torch import nn

from nanovllm.models.llama import LlamaForCausalLM
from nanovllm.models.mistral import MistralForCausalLM
from nanovllm.models.qwen2 import Qwen2ForCausalLM
from nanovllm.models.qwen3 import Qwen3ForCausalLM

MODELS: dict[str, type[nn.Module]] = {
    "Qwen3ForCausalLM": Qwen3ForCausalLM,
    "Qwen2ForCausalLM": Qwen2ForCausalLM,
    "LlamaForCausalLM": LlamaForCausalLM,
    "MistralForCausalLM": MistralForCausalLM,
}


def model_class(hf_config, max_model_len: int) -> type[nn.Module]:
    names = getattr(hf_config, "architectures", None) or []
    for name in names:
        if name in MODELS:
            cls = MODELS[name]
            if hasattr(cls, "check_supported"):
                cls.check_supported(hf_config, max_model_len)
            return cls
    raise ValueError(f"Model architecture(s) {names or '(none given)'} not supported. "
                     f"Supported architectures: {', '.join(MODELS)}.")
