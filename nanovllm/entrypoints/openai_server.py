"""An OpenAI-compatible HTTP server: `nanovllm serve MODEL` (FastAPI + uvicorn).

    GET  /health, /v1/models
    POST /v1/completions, /v1/chat/completions   (stream=true: server-sent events)

This module wires the app: routes, the optional API key, errors as OpenAI's JSON, and
clients that leave before their answer. The requests themselves are answered by
`openai_handlers.OpenAIHandlers`.
"""
import asyncio
import contextlib
import logging
import os
import time

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException

from nanovllm.config import EngineConfig, default_max_num_batched_tokens, resolve_device
from nanovllm.entrypoints.async_llm import AsyncLLM
from nanovllm.entrypoints.openai_handlers import OpenAIHandlers
from nanovllm.entrypoints.protocol import ChatCompletionRequest, CompletionRequest, OpenAIError
from nanovllm.tokenizer import load_tokenizer

logger = logging.getLogger(__name__)


def build_app(engine: AsyncLLM, served_model_names: list[str] | None = None, api_key: str | None = None,
              chat_template: str | None = None, lifespan=None) -> FastAPI:
    """The FastAPI app serving `engine` under the first of `served_model_names` (default: the
    model path). `lifespan`: FastAPI's, e.g. to shut the engine down with the server."""
    config = engine.config
    names = served_model_names or [config.model]
    server = OpenAIHandlers(engine, names, load_tokenizer(config), config.max_model_len, chat_template)
    app = FastAPI(title="nanovllm OpenAI-compatible server", lifespan=lifespan)
    app.state.server = server

    if api_key is not None:
        app.add_middleware(_APIKeyMiddleware, api_key=api_key)

    @app.exception_handler(OpenAIError)
    async def on_openai_error(request: Request, e: OpenAIError):
        return _error_response(e)

    @app.exception_handler(RequestValidationError)
    async def on_validation_error(request: Request, e: RequestValidationError):
        # FastAPI answers 422; OpenAI (and vLLM) answer 400. Malformed JSON lands here too, and
        # so does a body FastAPI did not read as JSON because of its content type: 415 then.
        if not _is_json(request.headers.get("content-type", "application/json")):
            return _error_response(OpenAIError("Unsupported Media Type: Only 'application/json' is allowed",
                                               415, code="unsupported_media_type"))
        messages, params = [], []
        for err in e.errors():
            loc = [str(x) for x in err.get("loc", ()) if x != "body" and not isinstance(x, int)]
            params.append(".".join(loc) or None)
            detail = err.get("ctx", {}).get("error") if err.get("type") == "json_invalid" else None
            messages.append(f"{params[-1] or 'body'}: {err.get('msg')}" + (f" ({detail})" if detail else ""))
        param = next(filter(None, params), None)
        return _error_response(OpenAIError("; ".join(messages) or "Invalid request", param=param))

    @app.exception_handler(HTTPException)
    async def on_http_error(request: Request, e: HTTPException):      # an unknown path or method
        response = _error_response(OpenAIError(str(e.detail), e.status_code, code=_code(e.status_code)))
        response.headers.update(e.headers or {})            # e.g. 405's Allow
        return response

    @app.exception_handler(Exception)
    async def on_internal_error(request: Request, e: Exception):
        logger.exception("request failed")
        return _error_response(OpenAIError(f"{type(e).__name__}: {e}", 500, "internal_server_error"))

    @app.get("/health")
    async def health():
        if not engine.is_running:
            return _error_response(OpenAIError("The engine is not running.", 500, "internal_server_error"))
        return Response(status_code=200)

    @app.get("/v1/models")
    async def models():
        created = int(time.time())
        return {"object": "list", "data": [
            {"id": name, "object": "model", "created": created, "owned_by": "nanovllm", "root": config.model,
             "max_model_len": config.max_model_len} for name in names]}

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request):
        return await _unless_client_leaves(request, server.completions(body))

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request):
        return await _unless_client_leaves(request, server.chat_completions(body))

    return app


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
                return await _error_response(error)(scope, receive, send)
        await self.app(scope, receive, send)


def _error_response(e: OpenAIError) -> JSONResponse:
    return JSONResponse(e.to_dict(), status_code=e.status_code)


def load_chat_template(value: str | None) -> str | None:
    """--chat-template: a file's path, or the Jinja template itself."""
    if value is not None and os.path.isfile(value):
        with open(value) as f:
            return f.read()
    return value


def run_server(model: str, host: str | None = None, port: int = 8000, api_key: str | None = None,
               served_model_name: list[str] | None = None, chat_template: str | None = None,
               log_level: str = "info", **engine_kwargs) -> None:
    """Load the model, then serve it until interrupted (what `nanovllm serve` runs)."""
    import uvicorn
    if engine_kwargs.get("max_num_batched_tokens") is None and engine_kwargs.get("enable_chunked_prefill", True):
        device = resolve_device(engine_kwargs.get("device", "auto"))     # vllm serve's smaller budget
        max_num_seqs = engine_kwargs.get("max_num_seqs") or EngineConfig.max_num_seqs
        engine_kwargs["max_num_batched_tokens"] = default_max_num_batched_tokens(device, max_num_seqs, server=True)
    engine = AsyncLLM(model, **engine_kwargs)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        # The engine stops with the server, whatever stopped it: uvicorn ends the process with
        # the SIGTERM it caught once the server has shut down, so code after run() never runs.
        yield
        await engine.shutdown()

    try:
        app = build_app(engine, served_model_name, api_key, load_chat_template(chat_template), lifespan)
        uvicorn.run(app, host=host or "0.0.0.0", port=port, log_level=log_level)
    finally:
        engine.shutdown_sync()
