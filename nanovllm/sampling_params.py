"""`SamplingParams`: how to sample one request, with vLLM's fields, defaults and errors.

Scripts written for vLLM construct these with keywords and catch `ValueError`, so the
fields, their defaults, the normalisation in `__post_init__` and the wording of every
validation message follow vLLM's main branch (see shared/reference/vllm-api.md, section 5).

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
import logging
import math
import numbers
import operator
import os
from collections.abc import Collection
from dataclasses import dataclass

import numpy as np

logger = logging.getLogger(__name__)

# Temperatures below this mean greedy sampling (vLLM's _SAMPLING_EPS).
_SAMPLING_EPS = 1e-5
# Temperatures in (0, this) are raised to it: dividing logits by a tiny number overflows.
_MIN_TEMPERATURE = 1e-2
# Most logprobs a request may ask for (vLLM's default `max_logprobs`).
max_logprobs = 20
# Most outputs per prompt (vLLM's VLLM_MAX_N_SEQUENCES).
_MAX_N = int(os.environ.get("VLLM_MAX_N_SEQUENCES", "16384"))
# The seeds a request may give: a signed 64-bit integer.
_MIN_SEED, _MAX_SEED = -2**63, 2**63 - 1


def _is_int(value) -> bool:
    # numpy's integers are Integral too (scripts draw lengths with numpy); bool is a subclass
    # of int, but True as a count or a seed is a mistake, not a number.
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _is_bool(value) -> bool:
    return isinstance(value, (bool, np.bool_))


def _is_finite(value) -> bool:
    """math.isfinite, also for ints too large for a float."""
    return value == value and abs(value) != math.inf


def _float32(value) -> float:
    """`value` as the sampler holds it: rounded to float32, where tiny values become 0 and
    values beyond its range (about 3.4e38) infinite."""
    try:
        value = float(value)
    except OverflowError:           # an int too large for a float64 too
        return math.inf if value > 0 else -math.inf
    with np.errstate(over="ignore"):
        return float(np.float32(value))


def _is_collection(value) -> bool:
    """A list, tuple, set, numpy array ...: something to take list() of (not a string or a
    lone number)."""
    return isinstance(value, Collection) and not isinstance(value, (str, bytes))


def _in_float32(value) -> str:
    """For an error message: a note where float32 makes a nonzero finite `value` 0 or infinite."""
    rounded = _float32(value)
    if value == 0 or not _is_finite(value) or (rounded != 0 and math.isfinite(rounded)):
        return ""
    return f" The sampler computes in float32, where it is {rounded}."


class RequestOutputKind(enum.IntEnum):
    CUMULATIVE = 0  # every output carries everything generated so far
    DELTA = 1       # every output carries only what is new since the last one
    FINAL_ONLY = 2  # one output, when the request finishes


class ValidationError(ValueError):
    """A `ValueError` naming the offending parameter, like vLLM main's VLLMValidationError:
    for the checks that vLLM tags, `str()` appends " (parameter=X, value=Y)"."""

    def __init__(self, message: str, parameter: str | None = None, value=None):
        super().__init__(message)
        self.parameter = parameter
        self.value = value

    def __str__(self) -> str:
        message = super().__str__()
        if self.parameter is None:
            return message
        return f"{message} (parameter={self.parameter}, value={self.value})"


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
        # vLLM reads True as 1 and False as 0 (the sampled token's logprob only); bools are
        # refused everywhere else.
        if isinstance(self.logprobs, bool):
            self.logprobs = int(self.logprobs)
        if isinstance(self.prompt_logprobs, bool):
            self.prompt_logprobs = int(self.prompt_logprobs)
        # Types first: the normalisation below compares and iterates the values.
        self._verify_types()
        # Normalise (vLLM's order), so the range checks see the final values.
        if 0 < self.temperature < _MIN_TEMPERATURE:
            logger.warning("temperature %s is less than %s, which may cause numerical errors "
                           "nan or inf in tensors. We have maxed it out to %s.",
                           self.temperature, _MIN_TEMPERATURE, _MIN_TEMPERATURE)
            self.temperature = max(self.temperature, _MIN_TEMPERATURE)
        if self.seed == -1:
            self.seed = None
        if self.stop is None:
            self.stop = []
        elif isinstance(self.stop, str):
            self.stop = [self.stop]
        else:
            self.stop = list(self.stop)
        self.stop_token_ids = [] if self.stop_token_ids is None else list(dict.fromkeys(self.stop_token_ids))
        if self.top_k == -1:
            self.top_k = 0

        self._verify_args()

        if self.is_greedy:
            # Greedy sampling takes the argmax; these filters cannot change it.
            self.top_p, self.top_k, self.min_p = 1.0, 0, 0.0
            if self.n > 1:
                raise ValueError(f"n must be 1 when using greedy sampling, got {self.n}.")

    def _verify_types(self) -> None:
        """Refuse values of the wrong type here, as ValueErrors naming the parameter: let
        through, a float `logprobs` or a non-string stop would only fail inside an engine
        step (where, in the server's engine process, it ends every running request). Numpy
        scalars become Python ints and floats (later arithmetic on a seed would overflow)."""
        if not _is_int(self.n):
            raise ValidationError(f"n must be an int, but is of type {type(self.n)}", "n", self.n)
        if not _is_int(self.top_k):
            raise ValidationError(f"top_k must be an integer, got {type(self.top_k).__name__}",
                                  "top_k", self.top_k)
        self.n, self.top_k = operator.index(self.n), operator.index(self.top_k)
        for name in ("max_tokens", "min_tokens", "seed", "logprobs", "prompt_logprobs"):
            value = getattr(self, name)
            if not (_is_int(value) or (value is None and name != "min_tokens")):
                raise ValidationError(f"{name} must be an integer, got {value!r}.", name, value)
            setattr(self, name, None if value is None else operator.index(value))
        for name in ("presence_penalty", "frequency_penalty", "repetition_penalty", "temperature",
                     "top_p", "min_p"):
            value = getattr(self, name)
            if not _is_number(value):
                raise ValidationError(f"{name} must be a number, got {value!r}.", name, value)
            if not isinstance(value, (int, float)):
                setattr(self, name, float(value))
        for name in ("ignore_eos", "detokenize", "skip_special_tokens", "spaces_between_special_tokens",
                     "include_stop_str_in_output"):
            value = getattr(self, name)
            if not _is_bool(value):
                raise ValidationError(f"{name} must be a boolean, got {value!r}.", name, value)
            setattr(self, name, bool(value))
        kind = self.output_kind
        if not isinstance(kind, RequestOutputKind):
            if not _is_int(kind) or kind not in set(RequestOutputKind):
                names = ", ".join(f"{k.name} ({k.value})" for k in RequestOutputKind)
                raise ValidationError(f"output_kind must be a RequestOutputKind: {names}; got {kind!r}.",
                                      "output_kind", kind)
            self.output_kind = RequestOutputKind(operator.index(kind))
        # stop and stop_token_ids: any collection (vLLM takes list() of them, as __post_init__
        # does), of the right items.
        stop = self.stop
        if stop is not None and not isinstance(stop, str):
            if not _is_collection(stop) or not all(isinstance(x, str) for x in stop):
                raise ValidationError(f"stop must be a string or a list of strings, got {stop!r}.", "stop", stop)
        ids = self.stop_token_ids
        if ids is not None:
            if not _is_collection(ids) or not all(_is_int(t) for t in ids):
                raise ValidationError(f"stop_token_ids must be a list of integers, got {ids!r}.",
                                      "stop_token_ids", ids)
            self.stop_token_ids = [operator.index(t) for t in ids]

    def _verify_args(self) -> None:
        if self.n < 1:
            raise ValueError(f"n must be at least 1, got {self.n}.")
        if self.n > _MAX_N:
            raise ValueError(f"n must be at most {_MAX_N}, got {self.n}. To increase this limit, "
                             "set the VLLM_MAX_N_SEQUENCES environment variable.")
        if not -2.0 <= self.presence_penalty <= 2.0:
            raise ValueError(f"presence_penalty must be in [-2, 2], got {self.presence_penalty}.")
        if not -2.0 <= self.frequency_penalty <= 2.0:
            raise ValueError(f"frequency_penalty must be in [-2, 2], got {self.frequency_penalty}.")
        repetition_penalty = _float32(self.repetition_penalty)
        if not math.isfinite(repetition_penalty):
            raise ValueError(f"repetition_penalty must be a finite number, got {self.repetition_penalty}."
                             + _in_float32(self.repetition_penalty))
        if repetition_penalty <= 0.0:
            raise ValueError(f"repetition_penalty must be greater than zero, got {self.repetition_penalty}."
                             + _in_float32(self.repetition_penalty))
        if not _is_finite(self.temperature):
            raise ValidationError(f"temperature must be a finite number, got {self.temperature}.",
                                  "temperature", self.temperature)
        if self.temperature < 0.0:
            raise ValidationError(f"temperature must be non-negative, got {self.temperature}.",
                                  "temperature", self.temperature)
        if self.temperature > 2.0:
            raise ValidationError(f"temperature must be in [0, 2], got {self.temperature}.",
                                  "temperature", self.temperature)
        if not (0.0 < self.top_p <= 1.0 and _float32(self.top_p) > 0.0):
            raise ValidationError(f"top_p must be in (0, 1], got {self.top_p}." + _in_float32(self.top_p),
                                  "top_p", self.top_p)
        if self.top_k < -1:
            raise ValueError(f"top_k must be 0 (disable), or at least 1, got {self.top_k}.")
        if self.seed is not None and not _MIN_SEED <= self.seed <= _MAX_SEED:
            # torch's generators take a signed 64-bit seed (child i of n adds i, which they
            # still take: they also accept unsigned 64-bit values).
            raise ValidationError(f"seed must be in [{_MIN_SEED}, {_MAX_SEED}], got {self.seed}.",
                                  "seed", self.seed)
        if not 0.0 <= self.min_p <= 1.0:
            raise ValueError(f"min_p must be in [0, 1], got {self.min_p}.")
        if self.max_tokens is not None and self.max_tokens < 1:
            raise ValidationError(f"max_tokens must be at least 1, got {self.max_tokens}.",
                                  "max_tokens", self.max_tokens)
        if self.min_tokens < 0:
            raise ValueError(f"min_tokens must be greater than or equal to 0, got {self.min_tokens}.")
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            raise ValueError(f"min_tokens must be less than or equal to "
                             f"max_tokens={self.max_tokens}, got {self.min_tokens}.")
        for name, kind in (("logprobs", "sample"), ("prompt_logprobs", "prompt")):
            k = getattr(self, name)
            if k is None:
                continue
            if k < -1:
                raise ValidationError(f"{name} must be non-negative or -1, got {k}.", name, k)
            if k == -1 or k > max_logprobs:
                shown = "-1 (the whole vocabulary)" if k == -1 else k
                raise ValueError(f"Requested {kind} logprobs of {shown}, "
                                 f"which is greater than max allowed: {max_logprobs}")
        if any(not s for s in self.stop):
            raise ValueError("stop cannot contain an empty string.")
        if self.stop and not self.detokenize:
            raise ValueError("stop strings are only supported when detokenize is True. "
                             "Set detokenize=True to use stop.")

    @property
    def is_greedy(self) -> bool:
        return self.temperature < _SAMPLING_EPS

    @property
    def output_text_buffer_length(self) -> int:
        """Characters to hold back while streaming: the start of a stop string must not be
        sent out before we know whether the rest follows (it would be cut from the text)."""
        if self.stop and not self.include_stop_str_in_output:
            return max(len(s) for s in self.stop) - 1
        return 0

    def clone(self) -> "SamplingParams":
        return copy.deepcopy(self)


@dataclass
class BeamSearchParams:
    """How `LLM.beam_search` searches (vLLM's fields and defaults; see nanovllm/beam_search.py).
    Each beam asks the engine for the logprobs of its best 2 x beam_width continuations, so
    beam_width is at most max_logprobs / 2 (vLLM refuses more through the same limit, later)."""
    beam_width: int
    max_tokens: int
    ignore_eos: bool = False
    temperature: float = 0.0
    length_penalty: float = 1.0
    include_stop_str_in_output: bool = False

    def __post_init__(self) -> None:
        self.beam_width = self._at_least_one("beam_width")
        self.max_tokens = self._at_least_one("max_tokens")
        if self.beam_width > max_logprobs // 2:
            raise ValidationError(
                f"beam_width must be at most {max_logprobs // 2}, got {self.beam_width}: each beam asks for the "
                f"logprobs of its best 2 x beam_width continuations, and at most {max_logprobs} are served.",
                "beam_width", self.beam_width)
        self.ignore_eos = self._flag("ignore_eos")
        self.include_stop_str_in_output = self._flag("include_stop_str_in_output")
        self.temperature = self._finite("temperature")
        self.length_penalty = self._finite("length_penalty")
        if not 0.0 <= self.temperature <= 2.0:
            raise ValidationError(f"temperature must be in [0, 2], got {self.temperature}.",
                                  "temperature", self.temperature)

    def _at_least_one(self, name: str) -> int:
        value = getattr(self, name)
        if not _is_int(value):
            raise ValidationError(f"{name} must be an integer, got {value!r}.", name, value)
        if value < 1:
            raise ValidationError(f"{name} must be at least 1, got {value}.", name, value)
        return operator.index(value)

    def _flag(self, name: str) -> bool:
        value = getattr(self, name)
        if not _is_bool(value):
            raise ValidationError(f"{name} must be a boolean, got {value!r}.", name, value)
        return bool(value)

    def _finite(self, name: str) -> float:
        value = getattr(self, name)
        if not _is_number(value):
            raise ValidationError(f"{name} must be a number, got {value!r}.", name, value)
        try:
            number = float(value)
        except OverflowError:               # an int beyond a float64
            number = math.inf
        if not math.isfinite(number):
            raise ValidationError(f"{name} must be a finite number, got {value!r}.", name, value)
        return number
