"""Request bodies of the OpenAI-compatible server (pydantic), and their SamplingParams.

Field names, types and defaults follow OpenAI's API; the extra sampling fields are the
ones vLLM's server accepts. Unknown fields are ignored, as OpenAI's server does.
"""
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from nanovllm.chat_messages import for_template
from nanovllm.sampling_params import BeamSearchParams, RequestOutputKind, SamplingParams


class OpenAIError(Exception):
    """An error to send back as OpenAI's {"error": {...}} JSON."""

    def __init__(self, message: str, status_code: int = 400, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.message, self.status_code, self.type, self.param, self.code = message, status_code, type, param, code

    def to_dict(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


class StreamOptions(BaseModel):
    include_usage: bool = False


class _SamplingRequest(BaseModel):
    """Fields shared by /v1/completions and /v1/chat/completions."""
    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    n: int = 1
    temperature: float | None = None
    top_p: float | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    seed: int | None = Field(None, ge=-2**63, le=2**63 - 1)      # a signed 64-bit seed, as SamplingParams
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    # vLLM's extra sampling fields
    top_k: int | None = None
    min_p: float | None = None
    min_tokens: int = 0
    ignore_eos: bool = False
    repetition_penalty: float | None = None
    stop_token_ids: list[int] | None = None
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True
    prompt_logprobs: int | None = None
    # Accepted so that they can be refused by name (an ignored logit_bias or JSON format would
    # quietly give a different answer than the client asked for).
    logit_bias: dict[str, float] | None = None
    response_format: dict[str, Any] | None = None

    @property
    def max_tokens_param(self) -> str:
        """The field that set the output length (for error messages)."""
        return "max_tokens"

    def check_fields(self) -> None:
        """The checks of fields SamplingParams does not see (OpenAIError)."""
        if self.logit_bias:
            raise OpenAIError("logit_bias is not supported", param="logit_bias")
        if self.response_format and self.response_format.get("type", "text") != "text":
            raise OpenAIError(f"response_format {self.response_format.get('type')!r} is not supported "
                              "(no guided decoding): only 'text'", param="response_format")
        if self.stream_options is not None and not self.stream:
            raise OpenAIError("Stream options can only be defined when `stream=True`.", param="stream_options")
        if self.stream and self.prompt_logprobs:      # 0 (the prompt's own tokens) is allowed, as vLLM
            raise OpenAIError("`prompt_logprobs` are not available when `stream=True`.", param="prompt_logprobs")

    def _sampling_params(self, max_tokens: int | None, logprobs: int | None,
                         prompt_logprobs: int | None) -> SamplingParams:
        """Raises ValueError (SamplingParams' checks) for out-of-range values."""
        def default(value, fallback):
            return fallback if value is None else value
        return SamplingParams(
            n=self.n, temperature=default(self.temperature, 1.0), top_p=default(self.top_p, 1.0),
            top_k=default(self.top_k, 0), min_p=default(self.min_p, 0.0),
            presence_penalty=default(self.presence_penalty, 0.0),
            frequency_penalty=default(self.frequency_penalty, 0.0),
            repetition_penalty=default(self.repetition_penalty, 1.0),
            seed=self.seed, stop=self.stop, stop_token_ids=self.stop_token_ids, ignore_eos=self.ignore_eos,
            max_tokens=max_tokens, min_tokens=self.min_tokens, logprobs=logprobs,
            prompt_logprobs=prompt_logprobs, skip_special_tokens=self.skip_special_tokens,
            include_stop_str_in_output=self.include_stop_str_in_output,
            output_kind=RequestOutputKind.DELTA if self.stream else RequestOutputKind.FINAL_ONLY)

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class CompletionRequest(_SamplingRequest):
    prompt: str | list[int] | list[list[int]] | list[str]
    max_tokens: int | None = 16
    logprobs: int | None = None
    echo: bool = False
    suffix: str | None = None
    best_of: int | None = None
    # vLLM's beam search: n beams, best first (see to_beam_search_params)
    use_beam_search: bool = False
    length_penalty: float = 1.0

    @property
    def echo_only(self) -> bool:
        """echo with max_tokens 0: the prompt alone comes back (with its logprobs, if asked:
        how a prompt is scored, e.g. by lm-evaluation-harness)."""
        return self.echo and self.max_tokens == 0

    def to_sampling_params(self) -> SamplingParams:
        self.check_fields()
        if self.suffix:
            raise OpenAIError("suffix is not supported", param="suffix")
        if self.best_of is not None and self.best_of != self.n:
            raise OpenAIError(f"best_of is not supported (got {self.best_of}, n={self.n})", param="best_of")
        # With echo, the prompt's logprobs are reported too (its first token has none).
        prompt_logprobs = self.prompt_logprobs
        if prompt_logprobs is None and self.echo:
            prompt_logprobs = self.logprobs
        # The engine always makes at least one token: echo_only discards it.
        max_tokens = 1 if self.echo_only else self.max_tokens
        return self._sampling_params(max_tokens, self.logprobs, prompt_logprobs)

    def to_beam_search_params(self, max_model_len: int) -> BeamSearchParams:
        """use_beam_search: n beams of at most max_tokens (None: up to max_model_len), with
        temperature (default 0), ignore_eos, length_penalty and include_stop_str_in_output."""
        self.check_fields()
        for name in ("stream", "echo", "logprobs", "prompt_logprobs", "suffix"):
            if getattr(self, name):
                raise OpenAIError(f"{name} is not supported with use_beam_search", param=name)
        max_tokens = max_model_len if self.max_tokens is None else self.max_tokens
        temperature = 0.0 if self.temperature is None else self.temperature
        try:
            return BeamSearchParams(beam_width=self.n, max_tokens=max_tokens, ignore_eos=self.ignore_eos,
                                    temperature=temperature, length_penalty=self.length_penalty,
                                    include_stop_str_in_output=self.include_stop_str_in_output)
        except ValueError as e:
            field = getattr(e, "parameter", None)
            raise OpenAIError(str(e), param="n" if field == "beam_width" else field) from None


class ContentPart(BaseModel):
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")    # name, tool_calls, ... go to the template as given

    role: str
    content: str | list[ContentPart] | None = None

    def to_template(self, content_format: str = "string") -> dict:
        """The message for the chat template, in `content_format` (as LLM.chat gives it)."""
        return for_template(self.model_dump(exclude_none=True), content_format)


class ChatCompletionRequest(_SamplingRequest):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = None
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    chat_template_kwargs: dict | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None

    @property
    def max_tokens_param(self) -> str:
        return "max_completion_tokens" if self.max_completion_tokens is not None else "max_tokens"

    def to_sampling_params(self) -> SamplingParams:
        self.check_fields()
        if self.top_logprobs and not self.logprobs:
            raise OpenAIError("when using `top_logprobs`, `logprobs` must be set to true.", param="top_logprobs")
        if self.tools and self.tool_choice != "none":
            # The tools could be shown to the model (the template takes them), but its tool
            # calls would come back as plain text: no tool-call parser.
            raise OpenAIError("tool calling is not supported: pass tool_choice 'none' to only show the "
                              "tools to the model", param="tool_choice")
        max_tokens = self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens
        return self._sampling_params(max_tokens, (self.top_logprobs or 0) if self.logprobs else None,
                                     self.prompt_logprobs)


class TokenizeRequest(BaseModel):
    """POST /tokenize, as vLLM's: a `prompt`, or chat `messages` rendered with the chat template."""
    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: bool | None = None      # default: true for a prompt, false for messages (the
                                                # template holds them), as vLLM
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    chat_template_kwargs: dict | None = None
    tools: list[dict[str, Any]] | None = None
    return_token_strs: bool = False


class DetokenizeRequest(BaseModel):
    """POST /detokenize, as vLLM's."""
    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    tokens: list[int]
