"""What `generate` returns: vLLM's RequestOutput / CompletionOutput / Logprob.

Both output classes also answer `output["text"]` and `output["token_ids"]`, as nano-vllm's
plain dicts did (nano_vllm_compat.py), so scripts written for either project run unchanged.
"""
from collections.abc import Sequence
from dataclasses import dataclass, field

from nanovllm.nano_vllm_compat import FirstCompletionItems, ItemAccess


@dataclass
class Logprob:
    logprob: float
    rank: int | None = None            # 1 = the most likely token
    decoded_token: str | None = None


# One dict per generated token: a list, or the engine's FlatLogprobs (engine/logprob_rows.py), which reads as one.
SampleLogprobs = Sequence[dict[int, Logprob]]
PromptLogprobs = list[dict[int, Logprob] | None]   # one per prompt token; the first is None


@dataclass
class CompletionOutput(ItemAccess):
    index: int
    text: str
    token_ids: list[int]
    cumulative_logprob: float | None = None     # None unless logprobs were asked for
    logprobs: SampleLogprobs | None = None
    finish_reason: str | None = None            # "stop" | "length" | "abort"
    stop_reason: int | str | None = None        # None (EOS or length), a stop token id, or a stop string

    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class RequestOutput(FirstCompletionItems):
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    prompt_logprobs: PromptLogprobs | None
    outputs: list[CompletionOutput]
    finished: bool
    num_cached_tokens: int = 0
    metrics: object = field(default=None, repr=False)

