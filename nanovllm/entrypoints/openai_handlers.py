"""The OpenAI request handlers behind `openai_server`: /v1/completions and /v1/chat/completions.

Every request becomes one engine request per prompt (each fanning out to `n` choices), added
to the shared `AsyncLLM`, so concurrent clients are batched together step by step. Prompts are
tokenized here, with the server's own tokenizer (the engine's lives in its process), so the
context-length check can answer 400 before anything is queued. A large prompt (20,000
characters or more) is templated and tokenized in a worker thread (the tokenizer releases the
GIL for batch calls): a multi-megabyte prompt takes seconds, and on the event loop it would
stall every other client's stream.
Streams use DELTA outputs; non-streamed requests use FINAL_ONLY. A streamed choice sends
nothing until it has text (a token that ends inside a multi-byte character waits for the next),
and chat sends each choice's role with its first text, as vLLM does. Closing a stream early
(the client went away: Starlette cancels the response) aborts its requests, which frees their
KV blocks at the next step. /tokenize and /detokenize are answered here too.
"""
import asyncio
import concurrent.futures
import dataclasses
import logging
import time
import uuid
from collections.abc import AsyncIterator

from fastapi.responses import StreamingResponse

from nanovllm.beam_search import beam_search_async
from nanovllm.chat_messages import resolve_content_format
from nanovllm.entrypoints.async_llm import AsyncLLM, RequestStream
from nanovllm.entrypoints.engine_process import summarize
from nanovllm.entrypoints.errors import sampling_param
from nanovllm.entrypoints.logprobs_json import chat_logprobs, completion_logprobs, prompt_logprobs_json
from nanovllm.entrypoints.protocol import (ChatCompletionRequest, ChatMessage, CompletionRequest,
                                           DetokenizeRequest, OpenAIError, TokenizeRequest)
from nanovllm.entrypoints.streams import HeldBack, final_outputs, merged, sse_events
from nanovllm.outputs import CompletionOutput, RequestOutput
from nanovllm.sampling_params import BeamSearchParams, SamplingParams

logger = logging.getLogger(__name__)


OFF_LOOP_CHARS = 20_000     # text at least this long is tokenized in the tokenizer thread


def _usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


class OpenAIHandlers:
    """Answers completions and chat completions with `engine`, for the model served as `names`."""

    def __init__(self, engine: AsyncLLM, names: list[str], tokenizer, max_model_len: int,
                 chat_template: str | None, content_format: str = "auto"):
        self.engine, self.names, self.tokenizer = engine, names, tokenizer
        self.max_model_len, self.chat_template = max_model_len, chat_template
        self.content_format = resolve_content_format(content_format, tokenizer, chat_template)
        # One thread: calls into one tokenizer are not made concurrently (as vLLM's server).
        self._tokenizer_thread = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="nanovllm-tokenizer")

    async def _off_loop(self, size: int, fn, *args):
        """fn(*args), in the tokenizer thread if `size` (characters of text) is large: a small
        prompt takes well under a millisecond, and waiting behind a large one in the thread
        would only delay it."""
        if size < OFF_LOOP_CHARS:
            return fn(*args)
        return await asyncio.get_running_loop().run_in_executor(self._tokenizer_thread, fn, *args)

    def _encode(self, texts: list[str], add_special_tokens: bool = True) -> list[list[int]]:
        """Token ids of each text. (The batch call: the one that releases the GIL.)"""
        if not texts:
            return []
        return list(self.tokenizer(texts, add_special_tokens=add_special_tokens, return_attention_mask=False,
                                   return_token_type_ids=False)["input_ids"])

    def _render_chat(self, messages: list[ChatMessage], options: dict) -> str:
        """The chat template applied to `messages` (a 400 naming what it could not render)."""
        for i, m in enumerate(messages):
            if m.content is None and not (m.role == "assistant" and getattr(m, "tool_calls", None)):
                raise OpenAIError(f"messages[{i}].content is required for a {m.role!r} message",
                                  param=f"messages[{i}].content")
        try:
            conversation = [m.to_template(self.content_format) for m in messages]
            return self.tokenizer.apply_chat_template(conversation, tokenize=False, chat_template=self.chat_template,
                                                      **options)
        except Exception as e:      # a template error (jinja) or no template at all
            raise OpenAIError(f"Could not apply the chat template: {summarize(e)}", param="messages") from None

    def _chat_prompt(self, body) -> tuple[str, list[int]]:
        """Chat messages rendered and tokenized."""
        options = {"add_generation_prompt": body.add_generation_prompt, "tools": body.tools,
                   "continue_final_message": body.continue_final_message,
                   **(body.chat_template_kwargs or {})}           # these win, as in vLLM
        text = self._render_chat(body.messages, options)
        # The template holds the special tokens already: do not add them again (as LLM.chat).
        add_special_tokens = getattr(body, "add_special_tokens", None) or False
        return text, self._encode([text], add_special_tokens)[0]

    # -- shared steps --------------------------------------------------------------------
    def _check_model(self, model: str | None) -> str:
        if model is not None and model not in self.names:
            raise OpenAIError(f"The model `{model}` does not exist.", 404, param="model", code="model_not_found")
        return model or self.names[0]

    def _check_length(self, prompt_ids: list[int], max_tokens: int | None, param: str = "max_tokens") -> None:
        n = len(prompt_ids)
        if n >= self.max_model_len or (max_tokens is not None and n + max_tokens > self.max_model_len):
            raise OpenAIError(
                f"This model's maximum context length is {self.max_model_len} tokens. However, you requested "
                f"{n + (max_tokens or 1)} tokens ({n} in the prompt, {max_tokens or 1} in the completion). "
                f"Please reduce the length of the prompt or completion.", param=param)

    @staticmethod
    def _params(body) -> SamplingParams:
        try:
            return body.to_sampling_params()
        except ValueError as e:
            raise OpenAIError(str(e), param=_request_field(body, sampling_param(e))) from None

    async def _add(self, request_id: str, prompts: list[dict], params: SamplingParams,
                   prompt_field: str) -> list[RequestStream]:
        """Queue one engine request per prompt (all in the same step); all or none: if one is
        refused, or the client leaves meanwhile (this is cancelled), the accepted ones are
        aborted."""
        adds = [asyncio.ensure_future(self.engine.add_request(f"{request_id}-{i}", prompt, params))
                for i, prompt in enumerate(prompts)]
        try:
            await asyncio.wait(adds)
        except asyncio.CancelledError:
            _abandon(adds)
            raise
        errors = [add.exception() for add in adds if add.exception() is not None]
        if errors:
            _abandon(adds)
            if isinstance(errors[0], ValueError):       # the engine refused it: the prompt, unless it names a field
                named = getattr(errors[0], "parameter", None)
                raise OpenAIError(str(errors[0]), param=named or prompt_field) from None
            raise errors[0]
        return [add.result() for add in adds]

    # -- /v1/completions ---------------------------------------------------------------------
    async def completions(self, body: CompletionRequest):
        model = self._check_model(body.model)
        if body.use_beam_search:
            params, beam_params = None, body.to_beam_search_params(self.max_model_len)
        else:
            params, beam_params = self._params(body), None
        prompts = body.prompt
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        if not prompts:
            raise OpenAIError("prompt must not be empty", param="prompt")
        texts = [p for p in prompts if isinstance(p, str)]
        encoded = iter(await self._off_loop(sum(map(len, texts)), self._encode, texts))
        inputs = []
        for p in prompts:
            ids = next(encoded) if isinstance(p, str) else p
            self._check_length(ids, body.max_tokens)
            inputs.append({"prompt": p if isinstance(p, str) else None, "prompt_token_ids": ids})
        request_id, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
        head = {"id": request_id, "object": "text_completion", "created": created, "model": model}
        if beam_params is not None:
            return await self._beam_search_completion(head, inputs, beam_params)
        streams = await self._add(request_id, inputs, params, "prompt")
        if body.stream:
            chunks = self._completion_chunks(body, head, inputs, streams)
            return StreamingResponse(sse_events(chunks), media_type="text/event-stream")
        choices, completion_tokens = [], 0
        for i, out in enumerate(await final_outputs(streams)):
            for c in out.outputs:
                c = _nothing_generated(c) if body.echo_only else c
                text, logprobs = c.text, None
                if body.echo:
                    text = self._prompt_text(inputs[i]) + text
                if body.logprobs is not None:
                    logprobs = completion_logprobs(body, out, c, 0, True, self.tokenizer)
                choices.append({"index": i * body.n + c.index, "text": text, "logprobs": logprobs,
                                "finish_reason": c.finish_reason, "stop_reason": c.stop_reason,
                                "prompt_logprobs": prompt_logprobs_json(out.prompt_logprobs)})
                completion_tokens += len(c.token_ids)
        prompt_tokens = sum(len(x["prompt_token_ids"]) for x in inputs)
        return {**head, "choices": choices, "usage": _usage(prompt_tokens, completion_tokens)}

    async def _beam_search_completion(self, head: dict, inputs: list[dict], params: BeamSearchParams) -> dict:
        """vLLM's use_beam_search: each step, every live beam is one engine request (their prompt
        blocks shared through the prefix cache); n = beam_width choices per prompt, best first.
        A completing EOS is the tokenizer's (as vLLM's server)."""
        async def run(prompts: list[dict], step_params) -> list[RequestOutput]:
            step_id = f"{head['id']}-{uuid.uuid4().hex[:8]}"
            return await final_outputs(await self._add(step_id, prompts, step_params, "prompt"))
        eos = self.tokenizer.eos_token_id
        outputs = await beam_search_async(run, inputs, params, set() if eos is None else {eos}, self.max_model_len,
                                          self.tokenizer)
        choices, completion_tokens = [], 0
        for i, (prompt, out) in enumerate(zip(inputs, outputs)):
            for j, beam in enumerate(out.sequences):
                generated = beam.tokens[len(prompt["prompt_token_ids"]):]
                shown = generated[:-1] if beam.finish_reason == "stop" and not params.include_stop_str_in_output \
                    else generated
                choices.append({"index": i * params.beam_width + j, "text": self.tokenizer.decode(shown),
                                "logprobs": None, "finish_reason": beam.finish_reason,
                                "stop_reason": beam.stop_reason})
                completion_tokens += len(generated)
        prompt_tokens = sum(len(x["prompt_token_ids"]) for x in inputs)
        return {**head, "choices": choices, "usage": _usage(prompt_tokens, completion_tokens)}

    async def _completion_chunks(self, body: CompletionRequest, head: dict, inputs: list[dict],
                                 streams: list[RequestStream]) -> AsyncIterator[dict]:
        sent: dict[int, int] = {}     # choice index -> characters sent (for logprobs' text_offset)
        done, completion_tokens, held = set(), 0, HeldBack()
        async for i, out in merged(streams):
            for c in out.outputs:
                c = _nothing_generated(c) if body.echo_only else c
                index = i * body.n + c.index
                completion_tokens += len(c.token_ids)
                first = index not in sent
                if index in done or (c := held.ready(index, c, text_already=body.echo and first)) is None:
                    continue      # nothing to send for this choice yet
                text = (self._prompt_text(inputs[i]) if body.echo and first else "") + c.text
                logprobs = None
                if body.logprobs is not None:
                    logprobs = completion_logprobs(body, out, c, sent.get(index, 0), first, self.tokenizer)
                sent[index] = sent.get(index, 0) + len(text)
                if c.finish_reason:
                    done.add(index)
                yield {**head, "choices": [{"index": index, "text": text, "logprobs": logprobs,
                                            "finish_reason": c.finish_reason, "stop_reason": c.stop_reason}]}
        if body.include_usage:
            prompt_tokens = sum(len(x["prompt_token_ids"]) for x in inputs)
            yield {**head, "choices": [], "usage": _usage(prompt_tokens, completion_tokens)}

    def _prompt_text(self, prompt: dict) -> str:
        if prompt["prompt"] is None:
            prompt["prompt"] = self.tokenizer.decode(prompt["prompt_token_ids"])
        return prompt["prompt"]

    # -- /v1/chat/completions ----------------------------------------------------------------
    async def chat_completions(self, body: ChatCompletionRequest):
        model = self._check_model(body.model)
        params = self._params(body)
        text, ids = await self._off_loop(_chat_size(body.messages), self._chat_prompt, body)
        self._check_length(ids, params.max_tokens, body.max_tokens_param)
        request_id, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        streams = await self._add(request_id, [{"prompt": text, "prompt_token_ids": ids}], params, "messages")
        head = {"id": request_id, "object": "chat.completion", "created": created, "model": model}
        if body.stream:
            head["object"] = "chat.completion.chunk"
            return StreamingResponse(sse_events(self._chat_chunks(body, head, len(ids), streams[0])),
                                     media_type="text/event-stream")
        (out,) = await final_outputs(streams)
        choices = [{"index": c.index, "message": {"role": "assistant", "content": c.text},
                    "logprobs": chat_logprobs(body, c), "finish_reason": c.finish_reason,
                    "stop_reason": c.stop_reason} for c in out.outputs]
        response = {**head, "choices": choices,
                    "usage": _usage(len(ids), sum(len(c.token_ids) for c in out.outputs))}
        if body.prompt_logprobs is not None:
            response["prompt_logprobs"] = prompt_logprobs_json(out.prompt_logprobs)
        return response

    async def _chat_chunks(self, body: ChatCompletionRequest, head: dict, prompt_tokens: int,
                           stream: RequestStream) -> AsyncIterator[dict]:
        done, started, completion_tokens, held = set(), set(), 0, HeldBack()
        async for _, out in merged([stream]):
            for c in out.outputs:
                completion_tokens += len(c.token_ids)
                if c.index in done or (c := held.ready(c.index, c)) is None:
                    continue
                if c.finish_reason:
                    done.add(c.index)
                delta = {"content": c.text}
                if c.index not in started:              # the role goes with the first text
                    started.add(c.index)
                    delta = {"role": "assistant", **delta}
                yield {**head, "choices": [{"index": c.index, "delta": delta,
                                            "logprobs": chat_logprobs(body, c),
                                            "finish_reason": c.finish_reason, "stop_reason": c.stop_reason}]}
        if body.include_usage:
            yield {**head, "choices": [], "usage": _usage(prompt_tokens, completion_tokens)}

    # -- /tokenize, /detokenize (vLLM's) ----------------------------------------------------
    async def tokenize(self, body: TokenizeRequest) -> dict:
        self._check_model(body.model)
        if (body.prompt is None) == (body.messages is None):
            raise OpenAIError("Give either `prompt` or `messages`", param="prompt" if body.prompt is None else "messages")
        if body.messages is not None:
            if not body.messages:
                raise OpenAIError("messages must not be empty", param="messages")
            _, ids = await self._off_loop(_chat_size(body.messages), self._chat_prompt, body)
        else:
            add = True if body.add_special_tokens is None else body.add_special_tokens
            (ids,) = await self._off_loop(len(body.prompt), self._encode, [body.prompt], add)
        ids = list(ids)
        strs = self.tokenizer.convert_ids_to_tokens(ids) if body.return_token_strs else None
        return {"count": len(ids), "max_model_len": self.max_model_len, "tokens": ids, "token_strs": strs}

    async def detokenize(self, body: DetokenizeRequest) -> dict:
        self._check_model(body.model)
        vocab_size = len(self.tokenizer)
        bad = next((t for t in body.tokens if not 0 <= t < vocab_size), None)
        if bad is not None:
            raise OpenAIError(f"Token id {bad} is out of the tokenizer's vocabulary ({vocab_size} tokens)",
                              param="tokens")
        return {"prompt": await self._off_loop(len(body.tokens), self.tokenizer.decode, body.tokens)}

def _chat_size(messages: list[ChatMessage]) -> int:
    return sum(len(m.content) if isinstance(m.content, str) else sum(len(p.text) for p in m.content or ())
               for m in messages)


def _request_field(body, name: str | None) -> str | None:
    """The request's field for a SamplingParams parameter (chat names them differently)."""
    if name == "max_tokens":
        return body.max_tokens_param            # chat's max_completion_tokens, if it was that
    if name == "logprobs" and isinstance(body, ChatCompletionRequest):
        return "top_logprobs"
    return name


def _abandon(adds: list[asyncio.Future]) -> None:
    """Abort the requests of these add_request tasks: a pending add is cancelled (it then
    closes its own stream), an accepted one's stream is closed."""
    for add in adds:
        if not add.done():
            add.cancel()
        elif not add.cancelled() and add.exception() is None:
            add.result().close()


def _nothing_generated(c: CompletionOutput) -> CompletionOutput:
    """The choice of an echo-only request (max_tokens 0): the engine's one token is dropped."""
    return dataclasses.replace(c, text="", token_ids=[], logprobs=[] if c.logprobs is not None else None,
                               finish_reason="length" if c.finish_reason else None, stop_reason=None)
