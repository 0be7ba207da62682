"""The server's streams: engine outputs gathered or merged as they come, sent as server-sent
events, and a streamed choice's tokens held back until they spell text."""
import asyncio
import dataclasses
import json
import logging
from collections.abc import AsyncIterator

from nanovllm.entrypoints.async_llm import EngineDeadError, RequestStream
from nanovllm.entrypoints.engine_process import summarize
from nanovllm.entrypoints.protocol import OpenAIError
from nanovllm.outputs import CompletionOutput, RequestOutput

logger = logging.getLogger(__name__)


def sse(data: dict) -> str:
    return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"


async def final_outputs(streams: list[RequestStream]) -> list[RequestOutput]:
    async def last(stream: RequestStream) -> RequestOutput:
        final = None
        async for final in stream:
            pass
        if final is None:
            raise OpenAIError("The request was aborted.", 500, "internal_server_error")
        return final
    try:
        return await asyncio.gather(*(last(s) for s in streams))
    finally:
        for stream in streams:
            stream.close()


async def merged(streams: list[RequestStream]) -> AsyncIterator[tuple[int, RequestOutput]]:
    """(prompt index, output) from several streams, as they come."""
    if len(streams) == 1:
        try:
            async for out in streams[0]:
                yield 0, out
        finally:
            streams[0].close()
        return
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(i: int, stream: RequestStream):
        try:
            async for out in stream:
                queue.put_nowait((i, out))
            queue.put_nowait((i, None))
        except Exception as e:
            queue.put_nowait((i, e))
    tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(streams)]
    try:
        remaining = len(streams)
        while remaining:
            i, item = await queue.get()
            if isinstance(item, Exception):
                raise item
            if item is None:
                remaining -= 1
            else:
                yield i, item
    finally:
        for task in tasks:
            task.cancel()
        for stream in streams:
            stream.close()


async def sse_events(chunks: AsyncIterator[dict]) -> AsyncIterator[str]:
    """SSE lines; an engine failure mid-stream is sent as an error event (one line: the
    traceback goes to the log, once)."""
    try:
        async for chunk in chunks:
            yield sse(chunk)
    except Exception as e:
        if not isinstance(e, EngineDeadError):      # (the engine's failure was logged when it stopped)
            logger.exception("stream failed")
        yield sse(OpenAIError(summarize(e), 500, "internal_server_error").to_dict())
    yield "data: [DONE]\n\n"


class HeldBack:
    """A streamed choice's tokens that spell no text yet (they end inside a multi-byte
    character): sent with the choice's next text, or with its finish."""

    def __init__(self):
        self.held: dict[int, CompletionOutput] = {}

    def ready(self, index: int, c: CompletionOutput, text_already: bool = False) -> CompletionOutput | None:
        """What to send for choice `index` now that `c` came (None: nothing yet)."""
        if index in self.held:
            c = _joined(self.held.pop(index), c)
        if c.text or c.finish_reason or text_already:
            return c
        if c.token_ids:
            self.held[index] = c
        return None


def _joined(older: CompletionOutput, newer: CompletionOutput) -> CompletionOutput:
    """Two DELTA outputs of one choice as one."""
    logprobs = older.logprobs + newer.logprobs if older.logprobs is not None and newer.logprobs is not None \
        else newer.logprobs
    return dataclasses.replace(newer, text=older.text + newer.text, token_ids=older.token_ids + newer.token_ids,
                               logprobs=logprobs)
