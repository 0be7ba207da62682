import logging
import math

import pytest

from nanovllm.param_checks import max_logprobs
from nanovllm.sampling_params import RequestOutputKind, SamplingParams


def test_defaults():
    p = SamplingParams()
    assert (p.n, p.temperature, p.top_p, p.top_k, p.min_p) == (1, 1.0, 1.0, 0, 0.0)
    assert (p.presence_penalty, p.frequency_penalty, p.repetition_penalty) == (0.0, 0.0, 1.0)
    assert p.max_tokens == 16 and p.min_tokens == 0
    assert p.seed is None and p.stop == [] and p.stop_token_ids == []
    assert p.logprobs is None and p.prompt_logprobs is None
    assert p.ignore_eos is False and p.include_stop_str_in_output is False
    assert p.detokenize and p.skip_special_tokens and p.spaces_between_special_tokens
    assert p.output_kind == RequestOutputKind.CUMULATIVE
    assert not p.is_greedy
    assert max_logprobs == 20
    assert [k.value for k in RequestOutputKind] == [0, 1, 2]
    assert [k.name for k in RequestOutputKind] == ["CUMULATIVE", "DELTA", "FINAL_ONLY"]


def test_unknown_keyword_is_type_error():
    with pytest.raises(TypeError):
        SamplingParams(best_of=2)


def test_normalisation(caplog):
    p = SamplingParams(stop="###", stop_token_ids=[5, 3, 5, 7, 3], seed=-1, logprobs=True,
                       prompt_logprobs=True, top_k=-1)
    assert p.stop == ["###"]
    assert p.stop_token_ids == [5, 3, 7]
    assert p.seed is None
    assert p.logprobs == 1 and p.prompt_logprobs == 1
    assert p.top_k == 0
    assert SamplingParams(stop=("a", "b")).stop == ["a", "b"]
    assert SamplingParams(max_tokens=None).max_tokens is None

    with caplog.at_level(logging.WARNING):
        p = SamplingParams(temperature=0.001)
    assert p.temperature == 0.01 and not p.is_greedy
    assert "temperature" in caplog.text


def test_greedy_forces_filters_off():
    p = SamplingParams(temperature=0.0, top_p=0.5, top_k=3, min_p=0.2)
    assert p.is_greedy
    assert (p.top_p, p.top_k, p.min_p) == (1.0, 0, 0.0)
    assert SamplingParams(temperature=0.0, n=1).n == 1
    # an int temperature is kept as given (vLLM does not coerce)
    assert SamplingParams(temperature=0).temperature == 0


def test_output_text_buffer_length():
    assert SamplingParams().output_text_buffer_length == 0
    assert SamplingParams(stop=["ab", "wxyz"]).output_text_buffer_length == 3
    assert SamplingParams(stop=["wxyz"], include_stop_str_in_output=True).output_text_buffer_length == 0


def test_clone_is_deep():
    p = SamplingParams(stop=["a"], stop_token_ids=[1])
    q = p.clone()
    assert q == p and q is not p
    q.stop.append("b")
    q.stop_token_ids.append(2)
    assert p.stop == ["a"] and p.stop_token_ids == [1]


def test_valid_edge_values():
    SamplingParams(temperature=2.0, top_p=1e-3, top_k=1, min_p=1.0, presence_penalty=-2.0,
                   frequency_penalty=2.0, repetition_penalty=1e-3, max_tokens=1, min_tokens=1,
                   logprobs=20, prompt_logprobs=0, n=3)
    SamplingParams(top_k=0, min_p=0.0, presence_penalty=2.0, frequency_penalty=-2.0, logprobs=0)
    SamplingParams(max_tokens=None, min_tokens=1000)


# (kwargs, exact message start, the value in the error's .value): wrong types, which would
# otherwise be accepted and fail later inside an engine step (or fail here with a TypeError).
WRONG_TYPES = [
    (dict(n=True), "n must be an int, but is of type <class 'bool'>", True),
    (dict(top_k=True), "top_k must be an integer, got bool", True),
    (dict(max_tokens=1.5), "max_tokens must be an integer, got 1.5.", 1.5),
    (dict(max_tokens="16"), "max_tokens must be an integer, got '16'.", "16"),
    (dict(min_tokens=1.5), "min_tokens must be an integer, got 1.5.", 1.5),
    (dict(min_tokens=None), "min_tokens must be an integer, got None.", None),
    (dict(seed="x"), "seed must be an integer, got 'x'.", "x"),
    (dict(seed=1.5), "seed must be an integer, got 1.5.", 1.5),
    (dict(seed=-1.0), "seed must be an integer, got -1.0.", -1.0),
    (dict(logprobs=1.5, max_tokens=3), "logprobs must be an integer, got 1.5.", 1.5),
    (dict(logprobs=1.0), "logprobs must be an integer, got 1.0.", 1.0),
    (dict(prompt_logprobs="2"), "prompt_logprobs must be an integer, got '2'.", "2"),
    (dict(presence_penalty=None), "presence_penalty must be a number, got None.", None),
    (dict(frequency_penalty="0.5"), "frequency_penalty must be a number, got '0.5'.", "0.5"),
    (dict(repetition_penalty=True), "repetition_penalty must be a number, got True.", True),
    (dict(temperature="1"), "temperature must be a number, got '1'.", "1"),
    (dict(temperature=None), "temperature must be a number, got None.", None),
    (dict(top_p=[0.5]), "top_p must be a number, got [0.5].", [0.5]),
    (dict(min_p=False), "min_p must be a number, got False.", False),
    (dict(stop=5), "stop must be a string or a list of strings, got 5.", 5),
    (dict(stop=[5]), "stop must be a string or a list of strings, got [5].", [5]),
    (dict(stop=["a", None]), "stop must be a string or a list of strings, got ['a', None].", ["a", None]),
    (dict(stop_token_ids=5), "stop_token_ids must be a list of integers, got 5.", 5),
    (dict(stop_token_ids="12"), "stop_token_ids must be a list of integers, got '12'.", "12"),
    (dict(stop_token_ids=[1, True]), "stop_token_ids must be a list of integers, got [1, True].", [1, True]),
    # The flags: a truthy string would have passed, and failed inside the detokenizer's step.
    (dict(skip_special_tokens="no"), "skip_special_tokens must be a boolean, got 'no'.", "no"),
    (dict(ignore_eos="yes"), "ignore_eos must be a boolean, got 'yes'.", "yes"),
    (dict(detokenize=1), "detokenize must be a boolean, got 1.", 1),
    (dict(spaces_between_special_tokens=None), "spaces_between_special_tokens must be a boolean, got None.", None),
    (dict(include_stop_str_in_output="false"), "include_stop_str_in_output must be a boolean, got 'false'.",
     "false"),
    (dict(output_kind=99), "output_kind must be a RequestOutputKind: CUMULATIVE (0), DELTA (1), FINAL_ONLY (2); "
                           "got 99.", 99),
    (dict(output_kind="DELTA"), "output_kind must be a RequestOutputKind: CUMULATIVE (0), DELTA (1), "
                                "FINAL_ONLY (2); got 'DELTA'.", "DELTA"),
    (dict(output_kind=True), "output_kind must be a RequestOutputKind: CUMULATIVE (0), DELTA (1), "
                             "FINAL_ONLY (2); got True.", True),
    (dict(seed="abc"), "seed must be an integer, got 'abc'.", "abc"),
]

# (kwargs, exact message start): every invalid value raises a ValueError naming the parameter
# and showing the value.
INVALID = [
    (dict(n=0), "n must be at least 1, got 0."),
    (dict(n=-3), "n must be at least 1, got -3."),
    (dict(n=1.5), "n must be an int, but is of type <class 'float'>"),
    (dict(n=2, temperature=0.0), "n must be 1 when using greedy sampling, got 2."),
    (dict(presence_penalty=2.5), "presence_penalty must be in [-2, 2], got 2.5."),
    (dict(presence_penalty=-2.01), "presence_penalty must be in [-2, 2], got -2.01."),
    (dict(presence_penalty=math.nan), "presence_penalty must be in [-2, 2], got nan."),
    (dict(frequency_penalty=-3), "frequency_penalty must be in [-2, 2], got -3."),
    (dict(frequency_penalty=2.1), "frequency_penalty must be in [-2, 2], got 2.1."),
    (dict(repetition_penalty=0.0), "repetition_penalty must be greater than zero, got 0.0."),
    (dict(repetition_penalty=-1), "repetition_penalty must be greater than zero, got -1."),
    (dict(repetition_penalty=math.inf), "repetition_penalty must be a finite number, got inf."),
    (dict(repetition_penalty=math.nan), "repetition_penalty must be a finite number, got nan."),
    (dict(temperature=-0.5), "temperature must be non-negative, got -0.5."),
    (dict(temperature=math.nan), "temperature must be a finite number, got nan."),
    (dict(temperature=math.inf), "temperature must be a finite number, got inf."),
    (dict(temperature=2.5), "temperature must be in [0, 2], got 2.5."),
    (dict(top_p=0.0), "top_p must be in (0, 1], got 0.0."),
    (dict(top_p=1.5), "top_p must be in (0, 1], got 1.5."),
    (dict(top_p=-0.1), "top_p must be in (0, 1], got -0.1."),
    (dict(top_k=-2), "top_k must be 0 (disable), or at least 1, got -2."),
    (dict(top_k=2.5), "top_k must be an integer, got float"),
    (dict(top_k="5"), "top_k must be an integer, got str"),
    (dict(min_p=-0.1), "min_p must be in [0, 1], got -0.1."),
    (dict(min_p=1.1), "min_p must be in [0, 1], got 1.1."),
    (dict(max_tokens=0), "max_tokens must be at least 1, got 0."),
    (dict(max_tokens=-5), "max_tokens must be at least 1, got -5."),
    (dict(min_tokens=-1), "min_tokens must be greater than or equal to 0, got -1."),
    (dict(min_tokens=10, max_tokens=5), "min_tokens must be less than or equal to max_tokens=5, got 10."),
    (dict(logprobs=-2), "logprobs must be non-negative or -1, got -2."),
    (dict(prompt_logprobs=-5), "prompt_logprobs must be non-negative or -1, got -5."),
    (dict(logprobs=21), "Requested sample logprobs of 21, which is greater than max allowed: 20"),
    (dict(logprobs=-1), "Requested sample logprobs of -1"),
    (dict(prompt_logprobs=100), "Requested prompt logprobs of 100, which is greater than max allowed: 20"),
    (dict(stop_token_ids=[1, "2"]), "stop_token_ids must be a list of integers, got [1, '2']."),
    (dict(stop_token_ids=[1.0]), "stop_token_ids must be a list of integers, got [1.0]."),
    (dict(stop_token_ids=[[1]]), "stop_token_ids must be a list of integers, got [[1]]."),
    (dict(stop=["a", ""]), "stop cannot contain an empty string."),
    (dict(stop=""), "stop cannot contain an empty string."),
    (dict(stop="x", detokenize=False),
     "stop strings are only supported when detokenize is True. Set detokenize=True to use stop."),
    (dict(seed=2**70), "seed must be in [-9223372036854775808, 9223372036854775807], got 1180591620717411303424."),
    (dict(seed=-2**63 - 1), "seed must be in [-9223372036854775808, 9223372036854775807], got -9223372036854775809."),
    # Checked as the sampler's float32 holds them: these are 0 or infinite there.
    (dict(top_p=1e-300), "top_p must be in (0, 1], got 1e-300. The sampler computes in float32, where it is 0.0."),
    (dict(top_p=1e-46), "top_p must be in (0, 1], got 1e-46. The sampler computes in float32, where it is 0.0."),
    (dict(top_p=1.00000001), "top_p must be in (0, 1], got 1.00000001."),
    (dict(repetition_penalty=1e-50),
     "repetition_penalty must be greater than zero, got 1e-50. The sampler computes in float32, where it is 0.0."),
    (dict(repetition_penalty=1e39),
     "repetition_penalty must be a finite number, got 1e+39. The sampler computes in float32, where it is inf."),
    # ints beyond a float64 (they raised OverflowError)
    (dict(repetition_penalty=10**400), "repetition_penalty must be a finite number, got 1000"),
    (dict(temperature=10**400), "temperature must be in [0, 2], got 1000"),
    (dict(top_p=-10**400), "top_p must be in (0, 1], got -1000"),
] + [(kwargs, message) for kwargs, message, _ in WRONG_TYPES]


@pytest.mark.parametrize("kwargs,message", INVALID, ids=[m[:40] for _, m in INVALID])
def test_invalid_values_raise_value_error(kwargs, message):
    with pytest.raises(ValueError) as info:
        SamplingParams(**kwargs)
    text = str(info.value)
    # The expected messages (vLLM main's wording) show the value; each also names the parameter.
    assert text.startswith(message), text
    name = next(iter(kwargs))
    assert name in text or name.replace("_", " ") in text


def test_tagged_errors_carry_parameter_and_value():
    # vLLM main appends "(parameter=X, value=Y)" to the checks it tags.
    with pytest.raises(ValueError) as info:
        SamplingParams(temperature=-1.0)
    assert str(info.value) == "temperature must be non-negative, got -1.0. (parameter=temperature, value=-1.0)"
    assert info.value.parameter == "temperature" and info.value.value == -1.0


@pytest.mark.parametrize("kwargs,message,value", WRONG_TYPES, ids=[m[:40] for _, m, _ in WRONG_TYPES])
def test_wrong_types_are_tagged_value_errors(kwargs, message, value):
    name = next(iter(kwargs))
    with pytest.raises(ValueError) as info:
        SamplingParams(**kwargs)
    assert str(info.value) == f"{message} (parameter={name}, value={value})"
    assert info.value.parameter == name and info.value.value == value


def test_seed_range_is_tagged():
    with pytest.raises(ValueError) as info:
        SamplingParams(seed=2**64)
    assert info.value.parameter == "seed" and info.value.value == 2**64


def test_valid_types():
    # float fields take ints (kept as given); seeds span the signed 64-bit range; stop and
    # stop_token_ids may be tuples
    p = SamplingParams(presence_penalty=1, frequency_penalty=-1, repetition_penalty=2, temperature=1,
                       top_p=1, min_p=0, seed=2**63 - 1, n=3)
    assert (p.presence_penalty, p.repetition_penalty, p.seed) == (1, 2, 2**63 - 1)
    assert SamplingParams(seed=-2**63).seed == -2**63
    assert SamplingParams(stop=("a",), stop_token_ids=(3, 3, 4)).stop_token_ids == [3, 4]
    assert SamplingParams(logprobs=True, prompt_logprobs=0).logprobs == 1
    assert SamplingParams(logprobs=False, prompt_logprobs=False).logprobs == 0     # as vLLM: 0
    # numpy scalars and arrays, sets (what scripts pass): Python numbers and lists afterwards.
    import numpy as np
    p = SamplingParams(max_tokens=np.int64(5), temperature=np.float32(0.5), seed=np.int64(3), n=np.int32(2),
                       top_k=np.int64(4), stop_token_ids=np.array([3, 4]), stop={"a"})
    assert (p.max_tokens, p.seed, p.n, p.top_k, p.stop_token_ids, p.stop) == (5, 3, 2, 4, [3, 4], ["a"])
    assert all(type(v) is int for v in (p.max_tokens, p.seed, p.n, p.top_k, *p.stop_token_ids))
    assert type(p.temperature) is float and p.temperature == 0.5


def test_smallest_float32_values_are_valid():
    # the smallest positive float32 (a subnormal) is still > 0 where the sampler computes
    p = SamplingParams(top_p=1.5e-45, repetition_penalty=1.5e-45, min_p=1e-300)
    assert (p.top_p, p.repetition_penalty, p.min_p) == (1.5e-45, 1.5e-45, 1e-300)
    assert SamplingParams(repetition_penalty=3.4e38).repetition_penalty == 3.4e38


def test_flags_and_output_kind_normalised():
    import numpy as np
    p = SamplingParams(ignore_eos=np.bool_(True), detokenize=np.True_, skip_special_tokens=False,
                       output_kind=1)
    assert p.ignore_eos is True and p.detokenize is True and p.skip_special_tokens is False
    assert p.output_kind is RequestOutputKind.DELTA
    assert SamplingParams(output_kind=np.int64(2)).output_kind is RequestOutputKind.FINAL_ONLY
    # a copy through dataclasses.replace is validated again and keeps the normalised values
    import dataclasses
    q = dataclasses.replace(p, output_kind=RequestOutputKind.FINAL_ONLY)
    assert q.ignore_eos is True and q.output_kind is RequestOutputKind.FINAL_ONLY


def test_clone_is_equal_and_owns_its_lists():
    """The engine clones a request's params and fills them in (max_tokens); the caller's stay as
    they were, lists included."""
    p = SamplingParams(stop=["x"], stop_token_ids=[3], max_tokens=None, seed=1, output_kind=1)
    q = p.clone()
    assert q == p and q is not p
    q.stop.append("y")
    q.stop_token_ids.append(4)
    q.max_tokens = 7
    assert (p.stop, p.stop_token_ids, p.max_tokens) == (["x"], [3], None)
