"""`SamplingParams`: how to sample one request, with vLLM's fields, defaults and errors.

Scripts written for vLLM construct these with keywords and catch `ValueError`, so the
fields, their defaults, the normalisation `__post_init__` runs (param_checks.py) and the
wording of every validation message follow vLLM's main branch.

Choices where vLLM versions differ:
- `temperature > 2` is rejected, as on vLLM main (the OpenAI range [0, 2]).
- `top_k` 0 and -1 both disable top-k; -1 is stored as 0.
- `logprobs` / `prompt_logprobs` above `max_logprobs` (20) are rejected here, at construction,
  because nanovllm has no per-model `max_logprobs` setting. vLLM main's -1 ("the whole
  vocabulary") is therefore rejected too, with the same "greater than max allowed" message.
- Types are checked too (vLLM's struct does not check them when built): integers (not bools;
  numpy's count) for the counts, the seed and the stop token ids, real numbers for the float
  fields, strings for `stop`, bools (Python's or numpy's) for the flags, a RequestOutputKind
  (or its int value) for `output_kind`; numpy scalars become Python numbers. A wrong type is a
  ValueError naming the parameter, not a crash inside a later step. Stop token ids outside
  the model's vocabulary are refused when the request is added.
- The sampler computes in float32, so the float fields are also checked as float32 holds
  them: a top_p of 1e-300 is 0 there and is refused like 0 (vLLM accepts it), and so is a
  repetition_penalty that float32 rounds to 0 or to infinity.
"""
import copy
import enum
from dataclasses import dataclass

from nanovllm.param_checks import SAMPLING_EPS, normalize_and_check


class RequestOutputKind(enum.IntEnum):
    CUMULATIVE = 0  # every output carries everything generated so far
    DELTA = 1       # every output carries only what is new since the last one
    FINAL_ONLY = 2  # one output, when the request finishes


@dataclass
class SamplingParams:
    n: int = 1
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0                       # 0 or -1: disabled
    min_p: float = 0.0
    seed: int | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    max_tokens: int | None = 16          # None: up to the model's context length
    min_tokens: int = 0
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    detokenize: bool = True
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    output_kind: RequestOutputKind = RequestOutputKind.CUMULATIVE

    def __post_init__(self) -> None:
        normalize_and_check(self)       # vLLM's normalisation and checks, in its order (param_checks.py)

    @property
    def is_greedy(self) -> bool:
        return self.temperature < SAMPLING_EPS

    @property
    def output_text_buffer_length(self) -> int:
        """Characters to hold back while streaming: the start of a stop string must not be
        sent out before we know whether the rest follows (it would be cut from the text)."""
        if self.stop and not self.include_stop_str_in_output:
            return max(len(s) for s in self.stop) - 1
        return 0

    def clone(self) -> "SamplingParams":
        """A copy the engine may change without touching the caller's: its lists (stop,
        stop_token_ids) copied too. (Not copy.deepcopy: that walks every field, a large part of
        the cost of adding a request.)"""
        twin = copy.copy(self)
        for name, value in vars(self).items():
            if isinstance(value, (list, dict, set)):
                setattr(twin, name, copy.copy(value))
        return twin


def __getattr__(name: str):
    # BeamSearchParams is beam search's (nanovllm/beam_search.py); vLLM's scripts import it from here.
    if name == "BeamSearchParams":
        from nanovllm.beam_search import BeamSearchParams
        return BeamSearchParams
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
