"""nanovllm: a small, fast, readable offline LLM inference engine with vLLM's API."""
from nanovllm.engine.llm_engine import LLMEngine
from nanovllm.llm import LLM
from nanovllm.outputs import CompletionOutput, Logprob, RequestOutput
from nanovllm.sampling_params import RequestOutputKind, SamplingParams

__all__ = ["LLM", "LLMEngine", "SamplingParams", "RequestOutput", "CompletionOutput", "Logprob",
           "RequestOutputKind"]
