"""Which model class serves a checkpoint, chosen by its config's `architectures`."""
import functools
from collections.abc import Callable

from torch import nn

from nanovllm.models.gemma3 import Gemma3ForCausalLM
from nanovllm.models.gpt_neox import GPTNeoXForCausalLM
from nanovllm.models.llama import LlamaForCausalLM
from nanovllm.models.mistral import MistralForCausalLM
from nanovllm.models.phi3 import Phi3ForCausalLM
from nanovllm.models.qwen2 import Qwen2ForCausalLM
from nanovllm.models.qwen3 import Qwen3ForCausalLM
from nanovllm.models.qwen3_moe import Qwen3MoeForCausalLM

MODELS: dict[str, type[nn.Module]] = {
    "Qwen3ForCausalLM": Qwen3ForCausalLM,
    "Qwen3MoeForCausalLM": Qwen3MoeForCausalLM,
    "Qwen2ForCausalLM": Qwen2ForCausalLM,
    "LlamaForCausalLM": LlamaForCausalLM,
    "MistralForCausalLM": MistralForCausalLM,
    "Gemma3ForCausalLM": Gemma3ForCausalLM,
    "Phi3ForCausalLM": Phi3ForCausalLM,
    "GPTNeoXForCausalLM": GPTNeoXForCausalLM,
}


def model_class(hf_config, max_model_len: int) -> Callable[[object], nn.Module]:
    """The constructor of the model that serves hf_config: `model_class(cfg, n)(cfg)`.
    It builds the model for contexts of up to max_model_len tokens (which decides, e.g., when
    a sliding window hides nothing, and Phi-3's LongRoPE factors). A class's
    `check_supported(config)` refuses, with a ValueError, what it cannot run."""
    names = getattr(hf_config, "architectures", None) or []
    for name in names:
        if name in MODELS:
            cls = MODELS[name]
            if hasattr(cls, "check_supported"):
                cls.check_supported(hf_config)
            return functools.partial(cls, max_model_len=max_model_len)
    raise ValueError(f"Model architecture(s) {names or '(none given)'} not supported. "
                     f"Supported architectures: {', '.join(MODELS)}.")
