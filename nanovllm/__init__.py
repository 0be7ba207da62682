"""nanovllm: a small, fast, readable offline LLM inference engine with vLLM's API."""
from nanovllm.logger import configure_logging

configure_logging()

from nanovllm.engine.llm_engine import LLMEngine  # noqa: E402
from nanovllm.llm import LLM
from nanovllm.outputs import CompletionOutput, Logprob, RequestOutput
from nanovllm.sampling_params import RequestOutputKind, SamplingParams

__all__ = ["LLM", "LLMEngine", "SamplingParams", "RequestOutput", "CompletionOutput", "Logprob",
           "RequestOutputKind"]
