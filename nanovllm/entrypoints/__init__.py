"""Online entry points: the async engine (`AsyncLLM`) and the OpenAI-compatible HTTP server."""
from nanovllm.entrypoints.async_llm import AsyncLLM

__all__ = ["AsyncLLM"]
