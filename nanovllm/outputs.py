"""What `generate` returns: vLLM's RequestOutput / CompletionOutput / Logprob.

Both output classes also answer `output["text"]` and `output["token_ids"]`, as nano-vllm's
plain dicts did, so scripts written for either project run unchanged.
"""
from collections.abc import Sequence
from dataclasses import dataclass, field


@dataclass
class Logprob:
    logprob: float
    rank: int | None = None            # 1 = the most likely token
    decoded_token: str | None = None


# One dict per generated token: a list, or the engine's FlatLogprobs (engine/logprob_rows.py), which reads as one.
SampleLogprobs = Sequence[dict[int, Logprob]]
PromptLogprobs = list[dict[int, Logprob] | None]   # one per prompt token; the first is None


class _ItemAccess:
    """`obj["text"]` reads `obj.text` (nano-vllm returned dicts)."""

    def __getitem__(self, key: str):
        if not isinstance(key, str) or not hasattr(self, key):
            raise KeyError(key)
        return getattr(self, key)


@dataclass
class CompletionOutput(_ItemAccess):
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
class RequestOutput(_ItemAccess):
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    prompt_logprobs: PromptLogprobs | None
    outputs: list[CompletionOutput]
    finished: bool
    num_cached_tokens: int = 0
    metrics: object = field(default=None, repr=False)

    # nano-vllm's dict had the first completion's text and ids at the top level.
    @property
    def text(self) -> str:
        return self.outputs[0].text

    @property
    def token_ids(self) -> list[int]:
        return self.outputs[0].token_ids
