"""What SamplingParams and BeamSearchParams accept: their normalisation, type and range checks,
with vLLM's messages (nanovllm/sampling_params.py says where nanovllm's choices differ from
vLLM's). Every refusal is a ValueError naming the parameter."""
import logging
import math
import numbers
import operator
import os
from collections.abc import Collection

import numpy as np

# Temperatures below this mean greedy sampling (vLLM's _SAMPLING_EPS).
SAMPLING_EPS = 1e-5
# Most logprobs a request may ask for (vLLM's default `max_logprobs`).
max_logprobs = 20
# Most outputs per prompt (vLLM's VLLM_MAX_N_SEQUENCES).
_MAX_N = int(os.environ.get("VLLM_MAX_N_SEQUENCES", "16384"))
# The seeds a request may give: a signed 64-bit integer.
_MIN_SEED, _MAX_SEED = -2**63, 2**63 - 1
# Temperatures in (0, this) are raised to it: dividing logits by a tiny number overflows.
_MIN_TEMPERATURE = 1e-2

logger = logging.getLogger(__name__)


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


def normalize_and_check(params) -> None:
    """SamplingParams.__post_init__: types checked, values normalised (vLLM's order), then ranges."""
    # vLLM reads True as 1 and False as 0 (the sampled token's logprob only); bools are
    # refused everywhere else.
    if isinstance(params.logprobs, bool):
        params.logprobs = int(params.logprobs)
    if isinstance(params.prompt_logprobs, bool):
        params.prompt_logprobs = int(params.prompt_logprobs)
    # Types first: the normalisation below compares and iterates the values.
    check_types(params)
    if 0 < params.temperature < _MIN_TEMPERATURE:
        logger.warning("temperature %s is less than %s, which may cause numerical errors "
                       "nan or inf in tensors. We have maxed it out to %s.",
                       params.temperature, _MIN_TEMPERATURE, _MIN_TEMPERATURE)
        params.temperature = _MIN_TEMPERATURE
    if params.seed == -1:
        params.seed = None
    if params.stop is None:
        params.stop = []
    elif isinstance(params.stop, str):
        params.stop = [params.stop]
    else:
        params.stop = list(params.stop)
    params.stop_token_ids = [] if params.stop_token_ids is None else list(dict.fromkeys(params.stop_token_ids))
    if params.top_k == -1:
        params.top_k = 0
    check_ranges(params)
    if params.is_greedy:
        # Greedy sampling takes the argmax; these filters cannot change it.
        params.top_p, params.top_k, params.min_p = 1.0, 0, 0.0
        if params.n > 1:
            raise ValueError(f"n must be 1 when using greedy sampling, got {params.n}.")


def check_types(params) -> None:
    """Refuse values of the wrong type here, as ValueErrors naming the parameter: let
    through, a float `logprobs` or a non-string stop would only fail inside an engine
    step (where, in the server's engine process, it ends every running request). Numpy
    scalars become Python ints and floats (later arithmetic on a seed would overflow)."""
    if not _is_int(params.n):
        raise ValidationError(f"n must be an int, but is of type {type(params.n)}", "n", params.n)
    if not _is_int(params.top_k):
        raise ValidationError(f"top_k must be an integer, got {type(params.top_k).__name__}",
                              "top_k", params.top_k)
    params.n, params.top_k = operator.index(params.n), operator.index(params.top_k)
    for name in ("max_tokens", "min_tokens", "seed", "logprobs", "prompt_logprobs"):
        value = getattr(params, name)
        if not (_is_int(value) or (value is None and name != "min_tokens")):
            raise ValidationError(f"{name} must be an integer, got {value!r}.", name, value)
        setattr(params, name, None if value is None else operator.index(value))
    for name in ("presence_penalty", "frequency_penalty", "repetition_penalty", "temperature",
                 "top_p", "min_p"):
        value = getattr(params, name)
        if not _is_number(value):
            raise ValidationError(f"{name} must be a number, got {value!r}.", name, value)
        if not isinstance(value, (int, float)):
            setattr(params, name, float(value))
    for name in ("ignore_eos", "detokenize", "skip_special_tokens", "spaces_between_special_tokens",
                 "include_stop_str_in_output"):
        value = getattr(params, name)
        if not _is_bool(value):
            raise ValidationError(f"{name} must be a boolean, got {value!r}.", name, value)
        setattr(params, name, bool(value))
    from nanovllm.sampling_params import RequestOutputKind     # here: that module imports this one
    kind = params.output_kind
    if not isinstance(kind, RequestOutputKind):
        if not _is_int(kind) or kind not in set(RequestOutputKind):
            names = ", ".join(f"{k.name} ({k.value})" for k in RequestOutputKind)
            raise ValidationError(f"output_kind must be a RequestOutputKind: {names}; got {kind!r}.",
                                  "output_kind", kind)
        params.output_kind = RequestOutputKind(operator.index(kind))
    # stop and stop_token_ids: any collection (vLLM takes list() of them, as __post_init__
    # does), of the right items.
    stop = params.stop
    if stop is not None and not isinstance(stop, str):
        if not _is_collection(stop) or not all(isinstance(x, str) for x in stop):
            raise ValidationError(f"stop must be a string or a list of strings, got {stop!r}.", "stop", stop)
    ids = params.stop_token_ids
    if ids is not None:
        if not _is_collection(ids) or not all(_is_int(t) for t in ids):
            raise ValidationError(f"stop_token_ids must be a list of integers, got {ids!r}.",
                                  "stop_token_ids", ids)
        params.stop_token_ids = [operator.index(t) for t in ids]


def check_ranges(params) -> None:
    if params.n < 1:
        raise ValueError(f"n must be at least 1, got {params.n}.")
    if params.n > _MAX_N:
        raise ValueError(f"n must be at most {_MAX_N}, got {params.n}. To increase this limit, "
                         "set the VLLM_MAX_N_SEQUENCES environment variable.")
    if not -2.0 <= params.presence_penalty <= 2.0:
        raise ValueError(f"presence_penalty must be in [-2, 2], got {params.presence_penalty}.")
    if not -2.0 <= params.frequency_penalty <= 2.0:
        raise ValueError(f"frequency_penalty must be in [-2, 2], got {params.frequency_penalty}.")
    repetition_penalty = _float32(params.repetition_penalty)
    if not math.isfinite(repetition_penalty):
        raise ValueError(f"repetition_penalty must be a finite number, got {params.repetition_penalty}."
                         + _in_float32(params.repetition_penalty))
    if repetition_penalty <= 0.0:
        raise ValueError(f"repetition_penalty must be greater than zero, got {params.repetition_penalty}."
                         + _in_float32(params.repetition_penalty))
    if not _is_finite(params.temperature):
        raise ValidationError(f"temperature must be a finite number, got {params.temperature}.",
                              "temperature", params.temperature)
    if params.temperature < 0.0:
        raise ValidationError(f"temperature must be non-negative, got {params.temperature}.",
                              "temperature", params.temperature)
    if params.temperature > 2.0:
        raise ValidationError(f"temperature must be in [0, 2], got {params.temperature}.",
                              "temperature", params.temperature)
    if not (0.0 < params.top_p <= 1.0 and _float32(params.top_p) > 0.0):
        raise ValidationError(f"top_p must be in (0, 1], got {params.top_p}." + _in_float32(params.top_p),
                              "top_p", params.top_p)
    if params.top_k < -1:
        raise ValueError(f"top_k must be 0 (disable), or at least 1, got {params.top_k}.")
    if params.seed is not None and not _MIN_SEED <= params.seed <= _MAX_SEED:
        # vLLM's range: a signed 64-bit seed (the engine mixes seed + child index and the
        # token's position into a 64-bit key: engine/sampling_inputs.py).
        raise ValidationError(f"seed must be in [{_MIN_SEED}, {_MAX_SEED}], got {params.seed}.",
                              "seed", params.seed)
    if not 0.0 <= params.min_p <= 1.0:
        raise ValueError(f"min_p must be in [0, 1], got {params.min_p}.")
    if params.max_tokens is not None and params.max_tokens < 1:
        raise ValidationError(f"max_tokens must be at least 1, got {params.max_tokens}.",
                              "max_tokens", params.max_tokens)
    if params.min_tokens < 0:
        raise ValueError(f"min_tokens must be greater than or equal to 0, got {params.min_tokens}.")
    if params.max_tokens is not None and params.min_tokens > params.max_tokens:
        raise ValueError(f"min_tokens must be less than or equal to "
                         f"max_tokens={params.max_tokens}, got {params.min_tokens}.")
    for name, kind in (("logprobs", "sample"), ("prompt_logprobs", "prompt")):
        k = getattr(params, name)
        if k is None:
            continue
        if k < -1:
            raise ValidationError(f"{name} must be non-negative or -1, got {k}.", name, k)
        if k == -1 or k > max_logprobs:
            shown = "-1 (the whole vocabulary)" if k == -1 else k
            raise ValueError(f"Requested {kind} logprobs of {shown}, "
                             f"which is greater than max allowed: {max_logprobs}")
    if any(not s for s in params.stop):
        raise ValueError("stop cannot contain an empty string.")
    if params.stop and not params.detokenize:
        raise ValueError("stop strings are only supported when detokenize is True. "
                         "Set detokenize=True to use stop.")


def at_least_one(value, name: str) -> int:
    """(at_least_one, flag, finite: BeamSearchParams' checks, each returning the value converted.)"""
    if not _is_int(value):
        raise ValidationError(f"{name} must be an integer, got {value!r}.", name, value)
    if value < 1:
        raise ValidationError(f"{name} must be at least 1, got {value}.", name, value)
    return operator.index(value)


def flag(value, name: str) -> bool:
    if not _is_bool(value):
        raise ValidationError(f"{name} must be a boolean, got {value!r}.", name, value)
    return bool(value)


def finite(value, name: str) -> float:
    if not _is_number(value):
        raise ValidationError(f"{name} must be a number, got {value!r}.", name, value)
    try:
        number = float(value)
    except OverflowError:               # an int beyond a float64
        number = math.inf
    if not math.isfinite(number):
        raise ValidationError(f"{name} must be a finite number, got {value!r}.", name, value)
    return number
