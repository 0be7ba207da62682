"""nanovllm: a small, fast, readable offline LLM inference engine with vLLM's API."""
import importlib

from nanovllm.logger import configure_logging

configure_logging()

# The public names, imported on first use: `nanovllm --help` and `import nanovllm.config`-style
# uses then do not pay for torch and transformers.
_EXPORTS = {
    "LLM": "nanovllm.llm",
    "LLMEngine": "nanovllm.engine.llm_engine",
    "SamplingParams": "nanovllm.sampling_params",
    "RequestOutputKind": "nanovllm.sampling_params",
    "RequestOutput": "nanovllm.outputs",
    "CompletionOutput": "nanovllm.outputs",
    "Logprob": "nanovllm.outputs",
}
__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
        globals()[name] = value        # later look-ups skip this hook
        return value
    raise AttributeError(f"module 'nanovllm' has no attribute {name!r}")
