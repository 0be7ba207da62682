"""An OpenAI-compatible HTTP server: `nanovllm serve MODEL` (FastAPI + uvicorn).

    GET  /health, /v1/models, /metrics
    POST /v1/completions, /v1/chat/completions   (stream=true: server-sent events)
    POST /tokenize, /detokenize

This module wires the app: routes, the optional API key, the request-size limit, errors as
OpenAI's JSON, clients that leave before their answer, and the server's life: it exits (code
1) when its engine fails, and a signal at any moment, model loading included, ends it and
its engine process. The requests themselves are answered by `openai_handlers.OpenAIHandlers`.
"""
import asyncio
import gc
import logging
import os
import signal
import threading
import time

import uvicorn
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from starlette.exceptions import HTTPException

from nanovllm.entrypoints.async_llm import AsyncLLM, EngineDeadError
from nanovllm.entrypoints.engine_process import summarize
from nanovllm.entrypoints.errors import (ErrorResponse, check_encodable, deepest_field, may_hold_lone_surrogate,
                                         validation_error_field)
from nanovllm.entrypoints.metrics import CONTENT_TYPE, ServingMetrics
from nanovllm.entrypoints.openai_handlers import OpenAIHandlers
from nanovllm.entrypoints.protocol import (ChatCompletionRequest, CompletionRequest, DetokenizeRequest,
                                           OpenAIError, TokenizeRequest)

logger = logging.getLogger(__name__)

DEFAULT_MAX_REQUEST_BYTES = 16 * 2**20
SHUTDOWN_GRACE_S = 3.0          # how long a connection may stay open once the server stops (its requests end at once)


def build_app(engine: AsyncLLM, served_model_names: list[str] | None = None, api_key: str | None = None,
              chat_template: str | None = None, lifespan=None,
              max_request_bytes: int | None = DEFAULT_MAX_REQUEST_BYTES,
              chat_template_content_format: str = "auto") -> FastAPI:
    """The FastAPI app serving `engine` under the first of `served_model_names` (default: the
    model path). `lifespan`: FastAPI's, e.g. to shut the engine down with the server.
    `max_request_bytes`: larger bodies get a 413 (None: no limit). `chat_template_content_format`:
    as LLM.chat's (chat_messages.py)."""
    from nanovllm.tokenizer import load_tokenizer
    config = engine.config
    names = served_model_names or [config.model]
    server = OpenAIHandlers(engine, names, load_tokenizer(config), config.max_model_len, chat_template,
                            chat_template_content_format)
    metrics = ServingMetrics(names[0])
    engine.add_request_listener(metrics.observe)
    app = FastAPI(title="nanovllm OpenAI-compatible server", lifespan=lifespan)
    app.state.server, app.state.metrics = server, metrics

    if api_key is not None:
        app.add_middleware(_APIKeyMiddleware, api_key=api_key)
    if max_request_bytes is not None:
        app.add_middleware(_RequestSizeLimit, max_bytes=max_request_bytes)

    @app.exception_handler(OpenAIError)
    async def on_openai_error(request: Request, e: OpenAIError):
        return ErrorResponse(e)

    @app.exception_handler(RequestValidationError)
    async def on_validation_error(request: Request, e: RequestValidationError):
        # FastAPI answers 422; OpenAI (and vLLM) answer 400. Malformed JSON lands here too, and
        # so does a body FastAPI did not read as JSON because of its content type: 415 then.
        if not _is_json(request.headers.get("content-type", "application/json")):
            return ErrorResponse(OpenAIError("Unsupported Media Type: Only 'application/json' is allowed",
                                             415, code="unsupported_media_type"))
        messages, params = [], []
        for err in e.errors():
            params.append(validation_error_field(tuple(err.get("loc", ())), e.body, err.get("type") == "missing"))
            detail = err.get("ctx", {}).get("error") if err.get("type") == "json_invalid" else None
            messages.append(f"{params[-1] or 'body'}: {err.get('msg')}" + (f" ({detail})" if detail else ""))
        return ErrorResponse(OpenAIError("; ".join(dict.fromkeys(messages)) or "Invalid request",
                                         param=deepest_field(params)))

    @app.exception_handler(HTTPException)
    async def on_http_error(request: Request, e: HTTPException):      # an unknown path or method
        response = ErrorResponse(OpenAIError(str(e.detail), e.status_code, code=_code(e.status_code)))
        response.headers.update(e.headers or {})            # e.g. 405's Allow
        return response

    # The client gets one line. A handler for Exception runs in Starlette's outermost
    # middleware, which raises the error again once answered, so that the server (uvicorn) logs
    # its traceback; an engine failure's was logged once already, when the engine stopped, so
    # its handler is registered by class (those answer and stop there).
    @app.exception_handler(EngineDeadError)
    async def on_engine_dead(request: Request, e: EngineDeadError):
        return ErrorResponse(OpenAIError(summarize(e), 500, "internal_server_error"))

    @app.exception_handler(Exception)
    async def on_internal_error(request: Request, e: Exception):
        return ErrorResponse(OpenAIError(summarize(e), 500, "internal_server_error"))

    @app.get("/health")
    async def health():
        if not engine.is_running:
            message = "The engine is not running" + (f": {engine.error}" if engine.error else ".")
            return ErrorResponse(OpenAIError(message, 503, "service_unavailable"))
        return Response(status_code=200)

    @app.get("/v1/models")
    async def models():
        created = int(time.time())
        return {"object": "list", "data": [
            {"id": name, "object": "model", "created": created, "owned_by": "nanovllm", "root": config.model,
             "max_model_len": config.max_model_len} for name in names]}

    @app.get("/metrics")
    async def prometheus_metrics():
        try:
            stats = await asyncio.get_running_loop().run_in_executor(None, engine.stats)
        except EngineDeadError:
            stats = None
        return Response(metrics.render(stats), media_type=CONTENT_TYPE)

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request):
        await _check_encodable(request)
        return await _unless_client_leaves(request, server.completions(body))

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request):
        await _check_encodable(request)
        return await _unless_client_leaves(request, server.chat_completions(body))

    @app.post("/tokenize")
    async def tokenize(body: TokenizeRequest, request: Request):
        await _check_encodable(request)
        return await server.tokenize(body)

    @app.post("/detokenize")
    async def detokenize(body: DetokenizeRequest, request: Request):
        await _check_encodable(request)
        return await server.detokenize(body)

    return app


async def _check_encodable(request: Request) -> None:
    """400 if the body holds text that UTF-8 cannot encode (its JSON is walked only when its
    bytes may hold such text)."""
    if may_hold_lone_surrogate(await request.body()):
        check_encodable(await request.json())


async def _unless_client_leaves(request: Request, answer):
    """Await `answer`, unless the client disconnects first: then it is cancelled, which closes
    its request streams and so aborts its engine requests (their KV blocks are freed at the
    next step). A streamed answer returns at once; from then on Starlette watches for the
    disconnect itself and closes the stream."""
    work = asyncio.ensure_future(answer)
    left = asyncio.ensure_future(_disconnected(request))
    try:
        done, _ = await asyncio.wait({work, left}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        left.cancel()
        if not work.done():
            work.cancel()
    if work not in done:
        return Response(status_code=499)        # nginx's "client closed request": nobody reads it
    return work.result()


async def _disconnected(request: Request) -> None:
    """Returns when the client has gone (the body was read already: what is left to receive
    from the server is the disconnect)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


def _is_json(content_type: str) -> bool:
    """application/json, or a +json type (what FastAPI parses as JSON)."""
    media_type = content_type.split(";")[0].strip().lower()
    return media_type == "application/json" or media_type.endswith("+json")


def _code(status: int) -> str | None:
    return {404: "not_found", 405: "method_not_allowed"}.get(status)


class _APIKeyMiddleware:
    """401 for /v1 requests without `Authorization: Bearer <api_key>` (plain ASGI, so streams
    and their disconnects pass through untouched)."""

    def __init__(self, app, api_key: str):
        self.app, self.expected = app, f"Bearer {api_key}".encode()

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope["path"].startswith("/v1"):
            if dict(scope["headers"]).get(b"authorization") != self.expected:
                error = OpenAIError("Incorrect or missing API key.", 401, code="invalid_api_key")
                return await ErrorResponse(error)(scope, receive, send)
        await self.app(scope, receive, send)


class _RequestSizeLimit:
    """413 for a body over `max_bytes`: at once when its Content-Length says so, else as soon
    as that much has arrived. The body is read here and handed on whole (the app would read it
    whole anyway)."""

    def __init__(self, app, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope["headers"]).get(b"content-length", b"")
        if length.isdigit() and int(length) > self.max_bytes:
            return await self._too_large(scope, receive, send)
        body, first = bytearray(), None
        while first is None:
            message = await receive()
            if message["type"] != "http.request":         # the client left: the app sees it next
                first = message
            else:
                body += message.get("body", b"")
                if len(body) > self.max_bytes:
                    return await self._too_large(scope, receive, send)
                if not message.get("more_body", False):
                    first = {"type": "http.request", "body": bytes(body), "more_body": False}
        pending = [first]

        async def replay():
            return pending.pop() if pending else await receive()
        await self.app(scope, replay, send)

    async def _too_large(self, scope, receive, send):
        error = OpenAIError(f"The request body is larger than the server's limit of {self.max_bytes} bytes "
                            f"(--max-request-bytes)", 413, code="request_too_large")
        await ErrorResponse(error)(scope, receive, send)


def load_chat_template(value: str | None) -> str | None:
    """--chat-template: a file's path, or the Jinja template itself."""
    if value is not None and os.path.isfile(value):
        with open(value) as f:
            return f.read()
    return value


class _Signalled(BaseException):
    """A SIGTERM while the server starts (before uvicorn handles signals)."""


def _raise_signalled(signum, frame):
    raise _Signalled(signum)


def run_server(model: str, host: str | None = None, port: int = 8000, api_key: str | None = None,
               served_model_name: list[str] | None = None, chat_template: str | None = None,
               chat_template_content_format: str = "auto", log_level: str = "info",
               max_request_bytes: int | None = DEFAULT_MAX_REQUEST_BYTES,
               **engine_kwargs) -> None:
    """Load the model, then serve it until a signal, or until the engine fails: then it
    raises SystemExit(1) within a few seconds (what `nanovllm serve` runs)."""
    from nanovllm.config import EngineConfig, default_max_num_batched_tokens, resolve_device
    if engine_kwargs.get("max_num_batched_tokens") is None and engine_kwargs.get("enable_chunked_prefill", True):
        device = resolve_device(engine_kwargs.get("device", "auto"))     # vllm serve's smaller budget
        max_num_seqs = engine_kwargs.get("max_num_seqs") or EngineConfig.max_num_seqs
        engine_kwargs["max_num_batched_tokens"] = default_max_num_batched_tokens(device, max_num_seqs, server=True)

    # Until uvicorn takes over the signals, a SIGTERM becomes an exception, so that loading
    # stops and the engine process is ended (Ctrl-C's KeyboardInterrupt does the same).
    in_main_thread = threading.current_thread() is threading.main_thread()
    if in_main_thread:
        previous = signal.signal(signal.SIGTERM, _raise_signalled)
    engine = None
    try:
        engine = AsyncLLM(model, **engine_kwargs)
        app = build_app(engine, served_model_name, api_key, load_chat_template(chat_template),
                        max_request_bytes=max_request_bytes,
                        chat_template_content_format=chat_template_content_format)
        server = _Server(engine, uvicorn.Config(app, host=host or "0.0.0.0", port=port, log_level=log_level,
                                                timeout_graceful_shutdown=SHUTDOWN_GRACE_S))

        def on_engine_stopped(error: str | None) -> None:
            if error is not None:
                logger.error("The engine has stopped: shutting the server down (exit code 1)")
                server.should_exit = True           # uvicorn's loop checks it every 0.1 s
        engine.on_stopped(on_engine_stopped)
    except BaseException as e:
        if engine is not None:
            engine.shutdown_sync()
        if isinstance(e, _Signalled):
            _die_by(e.args[0])
        raise
    finally:
        if in_main_thread:
            signal.signal(signal.SIGTERM, previous)
    # What loading left (torch, transformers, the tokenizer: ~250k objects) goes out of the
    # garbage collector's reach while serving, as in the engine process: each full collection
    # walked it all, ~150 ms of CPU (2-core CPU machine) during which no stream moved and no
    # request was admitted.
    gc.collect()
    gc.freeze()
    try:
        server.run()
    finally:
        gc.unfreeze()
        engine.shutdown_sync()
    if engine.error is not None:
        raise SystemExit(1)


class _Server(uvicorn.Server):
    """uvicorn's server, which stops the engine first when told to stop (a signal, or the
    engine's failure): open requests then end at once (a one-line error, an error event)
    instead of being cut off, with a traceback in the log, when the grace period is over.
    (After a signal, uvicorn ends the process with it once the server has shut down: code
    after run() may never run, so the engine must stop here.)"""

    def __init__(self, engine: AsyncLLM, config: uvicorn.Config):
        super().__init__(config)
        self.engine = engine

    async def shutdown(self, *args, **kwargs):
        await self.engine.shutdown()
        await super().shutdown(*args, **kwargs)


def _die_by(signum: int) -> None:
    """End the process by `signum`'s default action (as uvicorn does after a signal), so the
    parent sees how it ended."""
    signal.signal(signum, signal.SIG_DFL)
    signal.raise_signal(signum)
    raise SystemExit(128 + signum)      # (not reached for SIGTERM)
