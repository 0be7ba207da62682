"""`AsyncLLM`: the engine behind an asyncio front, for servers and async scripts.

    engine = AsyncLLM("Qwen/Qwen3-0.6B")          # the same arguments as LLM(...)
    async for out in engine.generate("Hello", SamplingParams(max_tokens=32), "req-0"):
        print(out.outputs[0].text)
    await engine.shutdown()

The `LLMEngine` runs in its own process (engine_process.py says why and how): requests and
aborts go to it over a pipe, and each request's outputs come back into its `RequestStream`.
Coroutines never wait on the engine: adding a request waits only for the engine to accept
it. A rejected add (a ValueError from validation) is answered on that request's stream only,
so a bad request never disturbs the running ones. A consumer that stops iterating (it
breaks, is cancelled, or its HTTP client went away) aborts its request: the engine frees its
KV blocks before its next step.

If the engine fails (a step raises, or its process dies), every pending request ends with
`EngineDeadError` (a one-line message; the traceback is logged once, here) and the callbacks
given to `on_stopped` run: `nanovllm serve` exits then, so that a supervisor restarts it.
"""
import asyncio
import concurrent.futures
import itertools
import logging
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

from nanovllm.entrypoints.engine_handle import EngineProcess
from nanovllm.entrypoints.engine_process import ABORTED, EngineStats
from nanovllm.outputs import RequestOutput
from nanovllm.sampling_params import RequestOutputKind, SamplingParams

logger = logging.getLogger(__name__)


class EngineDeadError(RuntimeError):
    """The engine process has stopped (shut down, failed, or was killed)."""


@dataclass
class RequestRecord:
    """A request that has ended, for metrics (times are time.monotonic())."""
    arrival: float                  # add_request was called
    first_token: float | None       # its first token was made (None: none was)
    finished: float | None          # its final output arrived (None: aborted, or the engine failed)
    prompt_tokens: int
    output_tokens: list[int]        # per choice


class RequestStream:
    """The outputs of one request: `async for output in stream`. `close()` before the end
    aborts the request (the server calls it when its client goes away).

    Outputs that arrive while the consumer is busy are folded together (as vLLM's output
    collector does): DELTA outputs are concatenated, other kinds keep only the newest. A slow
    consumer thus gets fewer, larger outputs instead of a growing backlog."""

    def __init__(self, owner: "AsyncLLM", request_id: str, key: str, params: SamplingParams | None):
        self.owner, self.request_id = owner, request_id
        self.key = key      # the engine's id for it: unique, so a late reply never reaches a reused id's stream
        self.delta = params is not None and params.output_kind == RequestOutputKind.DELTA
        self.loop = asyncio.get_running_loop()
        self.finished = False
        self._items: deque = deque()
        self._waiter: asyncio.Future | None = None
        self._prompt: tuple | None = None      # prompt, its ids and logprobs, from the first output
        self.arrival = time.monotonic()
        self._output_tokens: dict[int, int] = {}    # per choice, so far
        self._recorded = False

    def _put(self, item) -> None:
        """Called in the event loop's thread."""
        if isinstance(item, RequestOutput):
            item.request_id = self.request_id
            if self._prompt is None:            # the engine sends the prompt with the first output only
                self._prompt = item.prompt, item.prompt_token_ids, item.prompt_logprobs
            else:
                item.prompt, item.prompt_token_ids, item.prompt_logprobs = self._prompt
            self._count(item)
        last = self._items[-1] if self._items else None
        if isinstance(item, RequestOutput) and isinstance(last, RequestOutput):
            self._items[-1] = fold_outputs(last, item, self.delta)
        else:
            self._items.append(item)
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    async def _get(self):
        while not self._items:
            self._waiter = self.loop.create_future()
            await self._waiter
        item = self._items.popleft()
        if isinstance(item, BaseException):
            self.finished = True
            raise item
        return item

    def _count(self, output: RequestOutput) -> None:
        """Tokens per choice (before outputs are folded); the record once it is final."""
        for c in output.outputs:
            done = self._output_tokens.get(c.index, 0) if self.delta else 0
            self._output_tokens[c.index] = done + len(c.token_ids)
        if output.finished:
            first = getattr(output.metrics, "first_token", None)
            self._record(first, time.monotonic())

    def _record(self, first_token: float | None, finished: float | None) -> None:
        if not self._recorded:
            self._recorded = True
            prompt_tokens = len(self._prompt[1] or ()) if self._prompt else 0
            self.owner._report(RequestRecord(self.arrival, first_token, finished, prompt_tokens,
                                             [self._output_tokens[i] for i in sorted(self._output_tokens)]))

    def __aiter__(self) -> "RequestStream":
        return self

    async def __anext__(self) -> RequestOutput:
        if self.finished:
            raise StopAsyncIteration
        item = await self._get()
        if item == ABORTED:
            self.finished = True
            raise StopAsyncIteration
        self.finished = item.finished
        return item

    def close(self) -> None:
        """Leave the stream: the request is aborted, and its id is free for reuse at once."""
        if not self.finished:
            self.finished = True
            self._record(None, None)
            self.owner._forget(self)
            self.owner._post(("abort", self.key))


class AsyncLLM:
    def __init__(self, model: str, stream_interval_per_request: float = 4e-4, **engine_kwargs):
        """Start the engine process and load `model` (the keyword arguments are `LLM`'s).
        `stream_interval_per_request`: seconds between hand-overs of intermediate outputs,
        per live request (engine_process.HandOver)."""
        self._streams: dict[str, RequestStream] = {}    # by engine key (RequestStream.key)
        self._live: dict[str, RequestStream] = {}       # by the caller's request_id, until it ends
        self._serial = itertools.count()
        self._stats: dict[int, concurrent.futures.Future] = {}
        self._tokens = itertools.count()
        self._lock = threading.Lock()
        self._stopping = False
        self.error: str | None = None       # the engine's failure (one line), if it stopped on one
        self._ended = False                 # the engine process said "stopped" (or died)
        self._stop_callbacks: list[Callable[[str | None], None]] = []
        self._request_listeners: list[Callable[[RequestRecord], None]] = []
        self._process = EngineProcess(model, engine_kwargs, stream_interval_per_request, self._on_message)
        self.config = self._process.config  # the engine's EngineConfig

    # -- the public, asyncio side -------------------------------------------------------
    @property
    def is_running(self) -> bool:
        return not self._stopping and self._process.alive()

    async def add_request(self, request_id: str, prompt, sampling_params: SamplingParams | None = None
                          ) -> RequestStream:
        """Queue a request; returns its output stream once the engine has accepted it.
        Raises the engine's ValueError (TypeError for a non-str id) if it is rejected."""
        if not isinstance(request_id, str):
            raise TypeError(f"request_id must be a string, got {type(request_id)}")
        stream = RequestStream(self, request_id, f"{request_id}#{next(self._serial)}", sampling_params)
        with self._lock:                    # (the reader thread fails every stream it knows at "stopped")
            if not self.is_running:
                raise self._dead()
            if request_id in self._live:
                raise ValueError(f"request_id {request_id!r} is already in use")
            self._streams[stream.key] = self._live[request_id] = stream
        try:
            self._post(("add", stream.key, prompt, sampling_params))
        except Exception as e:              # it cannot be sent (pickled) to the engine process
            self._forget(stream)
            raise ValueError(f"request {request_id!r} cannot be sent to the engine: {e}") from e
        try:
            if await stream._get() == ABORTED:     # an abort overtook the add
                stream.finished = True
        except asyncio.CancelledError:
            stream.close()
            raise
        return stream

    async def generate(self, prompt, sampling_params: SamplingParams | None = None,
                       request_id: str = "0") -> AsyncIterator[RequestOutput]:
        """Yield the request's RequestOutputs as its tokens arrive: cumulative, or only the new
        part when `sampling_params.output_kind` is DELTA, or one at the end with FINAL_ONLY.
        Leaving the loop early (break, cancellation) aborts the request."""
        stream = await self.add_request(request_id, prompt, sampling_params)
        try:
            async for output in stream:
                yield output
        finally:
            stream.close()

    async def abort(self, request_id: str | list[str]) -> None:
        """Abort requests; their streams end, and their KV blocks are freed before the next
        step. Unknown (or finished) ids are ignored; the ids are free for reuse at once."""
        for rid in [request_id] if isinstance(request_id, str) else request_id:
            with self._lock:
                stream = self._live.pop(rid, None) if isinstance(rid, str) else None
            if stream is not None:          # its stream ends when the engine's ABORTED comes back
                self._post(("abort", stream.key))

    def stats(self, timeout: float = 30.0) -> EngineStats:
        """The engine's counters, once it has applied every command sent before this call
        (blocks until it answers: at most a step)."""
        future: concurrent.futures.Future = concurrent.futures.Future()
        with self._lock:
            if not self.is_running:
                raise self._dead()
            token = next(self._tokens)
            self._stats[token] = future
        self._post(("stats", token))
        try:
            return future.result(timeout)
        finally:
            with self._lock:
                self._stats.pop(token, None)

    def on_stopped(self, callback: Callable[[str | None], None]) -> None:
        """Call `callback(error)` when the engine stops: error is None after shutdown(), else
        the one-line failure. Runs in a background thread (at once if it has stopped)."""
        with self._lock:
            if not self._ended:
                self._stop_callbacks.append(callback)
                return
        callback(self.error)

    def add_request_listener(self, listener: Callable[[RequestRecord], None]) -> None:
        """Call `listener(record)` in the event loop's thread as each request ends (metrics)."""
        self._request_listeners.append(listener)

    async def shutdown(self) -> None:
        await asyncio.get_running_loop().run_in_executor(None, self.shutdown_sync)

    def shutdown_sync(self) -> None:
        """Stop the engine process (pending requests end with EngineDeadError)."""
        self._stopping = True
        self._process.shutdown()

    # -- talking to the engine process --------------------------------------------------
    def _post(self, command: tuple) -> None:
        self._process.post(command)

    def _forget(self, stream: RequestStream) -> None:
        """No more items for this stream (its consumer left, or it ended)."""
        with self._lock:
            self._streams.pop(stream.key, None)
            if self._live.get(stream.request_id) is stream:
                del self._live[stream.request_id]

    def _dead(self) -> "EngineDeadError":
        return EngineDeadError("The engine has stopped" + (f": {self.error}" if self.error else ""))

    def _report(self, record: RequestRecord) -> None:
        for listener in self._request_listeners:
            try:
                listener(record)
            except Exception:
                logger.exception("a request listener failed")

    def _on_message(self, message: tuple) -> None:
        """The engine process's messages, in the reader thread."""
        kind = message[0]
        if kind == "outputs":
            self._deliver(message[1])
        elif kind == "stats":
            with self._lock:
                future = self._stats.pop(message[1], None)
            if future is not None:
                future.set_result(message[2])
        elif kind == "stopped":
            failure = message[1]
            if failure is not None:             # the one place the cause is logged
                summary, trace = failure
                logger.error("The engine failed: %s%s", summary, f"\n{trace}" if trace else "")
            with self._lock:
                self.error, self._stopping, self._ended = failure and failure[0], True, True
                keys, waiters = list(self._streams), list(self._stats.values())
                callbacks, self._stop_callbacks = self._stop_callbacks, []
                self._stats.clear()
            for callback in callbacks:
                callback(self.error)
            # an exception each: one raised in many tasks would gather every task's frames
            for future in waiters:
                future.set_exception(self._dead())
            self._deliver([(key, self._dead(), True) for key in keys])

    def _deliver(self, items: list[tuple[str, object, bool]]) -> None:
        """Hand (key, item, is_last) to the streams: one wake-up per event loop."""
        by_loop: dict[asyncio.AbstractEventLoop, list] = {}
        with self._lock:
            for key, item, last in items:
                stream = self._streams.pop(key, None) if last else self._streams.get(key)
                if stream is not None:
                    if last and self._live.get(stream.request_id) is stream:
                        del self._live[stream.request_id]
                    by_loop.setdefault(stream.loop, []).append((stream, item))
        for loop, puts in by_loop.items():
            try:
                loop.call_soon_threadsafe(_put_all, puts)
            except RuntimeError:    # that event loop is closed: nobody is listening any more
                pass


def _put_all(puts: list[tuple[RequestStream, object]]) -> None:
    for stream, item in puts:
        stream._put(item)


def fold_outputs(older: RequestOutput, newer: RequestOutput, delta: bool) -> RequestOutput:
    """One output that says what `older` then `newer` said (a stream that fell behind gets
    this instead of both): for DELTA outputs their concatenation, built in `older` (which
    nobody has seen yet), else simply `newer`."""
    if not delta:
        return newer
    earlier = {c.index: c for c in older.outputs}
    for c in newer.outputs:
        old = earlier.get(c.index)
        if old is None:
            older.outputs.append(c)
            continue
        old.text += c.text
        old.token_ids.extend(c.token_ids)
        if c.logprobs is not None:
            old.logprobs = (old.logprobs or []) + c.logprobs
        old.cumulative_logprob, old.finish_reason, old.stop_reason = (
            c.cumulative_logprob, c.finish_reason, c.stop_reason)
    older.finished = newer.finished
    return older
