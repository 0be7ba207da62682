"""The server's error answers: OpenAI's JSON, with `param` naming the request field at fault.

Three sources of a 400 and how each finds its field:
- pydantic's validation (a wrong type, a missing field): the error's location, walked along
  the request's JSON, so that a union's branch names ("prompt.str") never show;
- SamplingParams' and the engine's ValueErrors: the parameter they carry, else the field
  their message starts with ("n must be ...");
- text that cannot be encoded (a lone UTF-16 surrogate, "\\ud800"): found by walking the JSON.
"""
import json
import re

from starlette.responses import Response

from nanovllm.entrypoints.protocol import OpenAIError

# SamplingParams' fields that a request sets under the same name.
SAMPLING_FIELDS = frozenset({
    "n", "temperature", "top_p", "top_k", "min_p", "presence_penalty", "frequency_penalty",
    "repetition_penalty", "seed", "stop", "stop_token_ids", "max_tokens", "min_tokens", "logprobs",
    "prompt_logprobs", "ignore_eos", "skip_special_tokens", "include_stop_str_in_output"})


class ErrorResponse(Response):
    """OpenAI's error JSON. Rendered ASCII-only, so that a message quoting the client's text
    can always be encoded (a lone surrogate would make the usual UTF-8 rendering fail and
    the connection drop)."""
    media_type = "application/json"

    def __init__(self, error: OpenAIError):
        super().__init__(json.dumps(error.to_dict()), status_code=error.status_code)


def lone_surrogate_path(value, path: str = "") -> str | None:
    """The path (`messages[2].content`, `stop[1]`, `model`) of the first string in a parsed
    JSON value, key or value, that UTF-8 cannot encode; None if there is none."""
    if isinstance(value, str):
        return None if _encodable(value) else path
    if isinstance(value, dict):
        for key, item in value.items():
            item_path = f"{path}.{key}" if path else str(key)
            if isinstance(key, str) and not _encodable(key):
                return path or "body"
            if (found := lone_surrogate_path(item, item_path)) is not None:
                return found
    elif isinstance(value, list):
        for i, item in enumerate(value):
            if (found := lone_surrogate_path(item, f"{path}[{i}]")) is not None:
                return found
    return None


def _encodable(text: str) -> bool:
    try:
        text.encode("utf-8")
        return True
    except UnicodeEncodeError:
        return False


# JSON carries a lone surrogate as a \uD800-\uDFFF escape, or as raw bytes outside ASCII (json
# decodes bytes with "surrogatepass").
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")


def may_hold_lone_surrogate(raw: bytes) -> bool:
    """False when a request's raw JSON cannot hold a lone surrogate: it is ASCII without a
    surrogate escape (the usual request: check_encodable's walk, 90 us of Python for a prompt
    of 400 token ids, is then skipped)."""
    return not raw.isascii() or _SURROGATE_ESCAPE.search(raw) is not None


def check_encodable(body) -> None:
    """400 naming the field if the request holds text that cannot be encoded."""
    path = lone_surrogate_path(body)
    if path is not None:
        shown = path.encode("ascii", "backslashreplace").decode()
        raise OpenAIError(f"{shown}: the text holds a lone surrogate (invalid Unicode), which cannot be "
                          f"encoded as UTF-8", param=shown)


def validation_error_field(loc: tuple, body, missing: bool) -> str | None:
    """The request field of a pydantic error at `loc` (("body", "messages", 2, "content",
    "str")): its parts that exist in the JSON `body`, as `messages[2].content`. A part that
    is not there is a union branch's name, left out, unless it is the missing field itself."""
    parts = list(loc[1:]) if loc and loc[0] == "body" else list(loc)
    path, value = "", body
    for i, part in enumerate(parts):
        if isinstance(part, int) and isinstance(value, list) and 0 <= part < len(value):
            path, value = f"{path}[{part}]", value[part]
        elif isinstance(part, str) and isinstance(value, dict) and part in value:
            path, value = f"{path}.{part}" if path else part, value[part]
        elif missing and i == len(parts) - 1 and isinstance(part, str) and isinstance(value, dict):
            path = f"{path}.{part}" if path else part
    return path or None


def deepest_field(paths: list[str | None]) -> str | None:
    """Of the fields of a request's validation errors, the one to name: the first field at
    fault, as deep as any error went into it (of a union's branches, the one that fit best:
    `stop[1]`, not `stop`)."""
    named = [p for p in paths if p]
    if not named:
        return None
    top = re.match(r"[^.\[]+", named[0]).group(0)
    return max((p for p in named if re.match(r"[^.\[]+", p).group(0) == top), key=len)


def sampling_param(error: Exception) -> str | None:
    """The SamplingParams field a ValueError is about: the one it carries (ValidationError),
    else the one its message starts with."""
    name = getattr(error, "parameter", None)
    if name:
        return name
    message = str(error)
    logprobs = re.match(r"Requested (sample|prompt) logprobs", message)
    if logprobs:
        return "logprobs" if logprobs.group(1) == "sample" else "prompt_logprobs"
    first = re.match(r"\w+", message)
    return first.group(0) if first and first.group(0) in SAMPLING_FIELDS else None
