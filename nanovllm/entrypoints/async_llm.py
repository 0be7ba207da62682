"""`AsyncLLM`: the engine behind an asyncio front, for servers and async scripts.

    engine = AsyncLLM.from_kwargs("Qwen/Qwen3-0.6B")
    async for out in engine.generate("Hello", SamplingParams(max_tokens=32), "req-0"):
        print(out.outputs[0].text)
    await engine.shutdown()

One background thread owns the `LLMEngine` (which is not thread-safe) and its device:

    while running:
        sleep until there is work            (an idle engine costs nothing)
        apply queued adds and aborts         (new requests join the batch at the next step)
        engine.step()
        hand the RequestOutputs to their streams, in the event loop (one call_soon_threadsafe;
                                             with many requests, at most ~10 times a second)

Coroutines never touch the engine: they post commands to the thread and read their own
stream. An add that the engine rejects (a ValueError from validation) is answered on that
request's stream only, so a bad request never disturbs the running ones. A consumer that
stops iterating (it breaks, is cancelled, or its HTTP client went away) aborts its request:
the thread frees its KV blocks before the next step.
"""
import asyncio
import logging
import threading
import time
from collections import deque
from collections.abc import AsyncIterator

from nanovllm.engine.llm_engine import LLMEngine
from nanovllm.outputs import RequestOutput
from nanovllm.sampling_params import RequestOutputKind, SamplingParams

logger = logging.getLogger(__name__)

_ACCEPTED = object()   # stream item: the engine took the request
_ABORTED = object()    # stream item: the request was aborted; the stream ends


class EngineDeadError(RuntimeError):
    """The background loop has stopped (shut down, or the engine failed)."""


class RequestStream:
    """The outputs of one request: `async for output in stream`. `close()` before the end
    aborts the request (the server calls it when its client goes away).

    Outputs that arrive while the consumer is busy are folded together (as vLLM's output
    collector does): DELTA outputs are concatenated, other kinds keep only the newest. A slow
    consumer thus gets fewer, larger outputs instead of a growing backlog."""

    def __init__(self, owner: "AsyncLLM", request_id: str, params: SamplingParams | None):
        self.owner, self.request_id = owner, request_id
        self.delta = params is not None and params.output_kind == RequestOutputKind.DELTA
        self.loop = asyncio.get_running_loop()
        self.finished = False
        self._items: deque = deque()
        self._waiter: asyncio.Future | None = None
        self.held: RequestOutput | None = None    # engine thread only: output not handed over yet
        self.started = False                      # engine thread only: an output was handed over

    def _put(self, item) -> None:
        """Called in the event loop's thread."""
        last = self._items[-1] if self._items else None
        if isinstance(item, RequestOutput) and isinstance(last, RequestOutput):
            self._items[-1] = _fold(last, item, self.delta)
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

    def __aiter__(self) -> "RequestStream":
        return self

    async def __anext__(self) -> RequestOutput:
        if self.finished:
            raise StopAsyncIteration
        item = await self._get()
        if item is _ABORTED:
            self.finished = True
            raise StopAsyncIteration
        self.finished = item.finished
        return item

    def close(self) -> None:
        if not self.finished:
            self.finished = True
            self.owner._post(("abort", self.request_id))


class AsyncLLM:
    def __init__(self, engine: LLMEngine, stream_interval_per_request: float = 4e-4):
        """`stream_interval_per_request`: seconds between hand-overs of intermediate outputs to
        the event loop, per live request (see `_hand_over`)."""
        self.engine = engine
        self.stream_interval_per_request = stream_interval_per_request
        self._next_hand_over = 0.0
        self._streams: dict[str, RequestStream] = {}
        self._commands: list[tuple] = []
        self._lock = threading.Lock()
        self._wakeup = threading.Event()
        self._stopping = False
        self.error: BaseException | None = None     # set if the engine failed and the loop stopped
        # Where the engine thread's time goes (logged at shutdown): steps, and handing their
        # outputs over to the event loop. Compared with an offline run's step times, they show
        # what serving adds per step (GIL sharing with the event loop, streamed outputs).
        self.seconds_in_steps = self.seconds_handing_over = 0.0
        self.loop_steps = 0
        self._thread = threading.Thread(target=self._loop, name="nanovllm-engine", daemon=True)
        self._thread.start()

    @classmethod
    def from_kwargs(cls, model: str, **engine_kwargs) -> "AsyncLLM":
        return cls(LLMEngine.from_kwargs(model, **engine_kwargs))

    # -- the public, asyncio side -------------------------------------------------------
    @property
    def num_steps(self) -> int:
        """Engine steps run so far (each step advances every running request by one token)."""
        return self.engine.num_steps

    @property
    def is_running(self) -> bool:
        return self._thread.is_alive() and not self._stopping

    async def add_request(self, request_id: str, prompt, sampling_params: SamplingParams | None = None
                          ) -> RequestStream:
        """Queue a request; returns its output stream once the engine has accepted it.
        Raises the engine's ValueError (TypeError for a non-str id) if it is rejected."""
        if not self.is_running:
            raise EngineDeadError("The engine loop is not running") from self.error
        stream = RequestStream(self, request_id, sampling_params)
        with self._lock:
            if request_id in self._streams:
                raise ValueError(f"request_id {request_id!r} is already in use")
            self._streams[request_id] = stream
        self._post(("add", request_id, prompt, sampling_params))
        try:
            if await stream._get() is _ABORTED:     # an abort overtook the add
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
        """Abort requests; their streams end, and their KV blocks are freed before the next step."""
        for rid in [request_id] if isinstance(request_id, str) else request_id:
            self._post(("abort", rid))

    async def shutdown(self) -> None:
        await asyncio.get_running_loop().run_in_executor(None, self.shutdown_sync)

    def shutdown_sync(self) -> None:
        """Stop the loop (pending requests end with EngineDeadError) and release the engine."""
        if self._thread.is_alive():
            self._stopping = True
            self._wakeup.set()
            self._thread.join()
            launched = max(1, self.engine.num_steps)     # comparable with bench.py's "ms each"
            logger.info("engine loop: %d step() calls, %d steps launched, %.2f s in step() (%.2f ms per launched "
                        "step), %.2f s handing outputs over", self.loop_steps, self.engine.num_steps,
                        self.seconds_in_steps, 1000 * self.seconds_in_steps / launched, self.seconds_handing_over)
            self.engine.shutdown()

    # -- the engine thread ----------------------------------------------------------------
    def _post(self, command: tuple) -> None:
        with self._lock:
            self._commands.append(command)
        self._wakeup.set()

    def _deliver(self, items: list[tuple[str, object, bool]]) -> None:
        """Hand (request_id, item, is_last) to the streams: one wake-up per event loop per step."""
        by_loop: dict[asyncio.AbstractEventLoop, list] = {}
        with self._lock:
            for request_id, item, last in items:
                stream = self._streams.pop(request_id, None) if last else self._streams.get(request_id)
                if stream is not None:
                    by_loop.setdefault(stream.loop, []).append((stream, item))
        for loop, puts in by_loop.items():
            try:
                loop.call_soon_threadsafe(_put_all, puts)
            except RuntimeError:    # that event loop is closed: nobody is listening any more
                pass

    def _hand_over(self, outputs: list[RequestOutput]) -> None:
        """Pass a step's outputs to their streams. Each hand-over costs the event loop, which
        shares the GIL with this thread, tens of microseconds per stream (waking its consumer,
        an HTTP chunk), time the engine then waits for. So intermediate outputs are held here,
        folded together, until `stream_interval_per_request` x live requests has passed since
        the last hand-over: a lone request gets every step's output, 256 requests about ten
        updates a second. First and final outputs go at once (time to first token, to finish)."""
        now = time.perf_counter()
        due = now >= self._next_hand_over
        with self._lock:
            ready = []
            for out in outputs:
                stream = self._streams.get(out.request_id)
                if stream is not None:
                    stream.held = out if stream.held is None else _fold(stream.held, out, stream.delta)
                    if out.finished or not stream.started:
                        ready.append(stream)
            if due:
                ready = [stream for stream in self._streams.values() if stream.held is not None]
                self._next_hand_over = now + self.stream_interval_per_request * len(self._streams)
        items = []
        for stream in ready:
            items.append((stream.request_id, stream.held, stream.held.finished))
            stream.held, stream.started = None, True
        self._deliver(items)

    def _apply_commands(self) -> None:
        with self._lock:
            commands, self._commands = self._commands, []
        replies = []
        for command in commands:
            if command[0] == "add":
                _, request_id, prompt, params = command
                try:
                    self.engine.add_request(request_id, prompt, params)
                except Exception as e:        # rejected: tell only that caller
                    replies.append((request_id, e, True))
                else:
                    replies.append((request_id, _ACCEPTED, False))
            else:
                _, request_id = command
                self.engine.abort_request([request_id])
                replies.append((request_id, _ABORTED, True))
        self._deliver(replies)

    def _loop(self) -> None:
        try:
            while not self._stopping:
                if not self.engine.has_unfinished_requests():
                    self._wakeup.wait()          # idle: block until a command arrives
                self._wakeup.clear()
                self._apply_commands()
                if self._stopping or not self.engine.has_unfinished_requests():
                    continue
                start = time.perf_counter()
                outputs = self.engine.step()
                stepped = time.perf_counter()
                self._hand_over(outputs)
                self.seconds_in_steps += stepped - start
                self.loop_steps += 1
                self.seconds_handing_over += time.perf_counter() - stepped
        except BaseException as e:              # the engine itself failed: fail every request
            logger.exception("The engine loop failed")
            self.error = e
        finally:
            self._stopping = True
            dead = EngineDeadError("The engine loop has stopped")
            if self.error is not None:
                dead.__cause__ = self.error
            with self._lock:
                request_ids = list(self._streams)
            self._deliver([(request_id, dead, True) for request_id in request_ids])


def _put_all(puts: list[tuple[RequestStream, object]]) -> None:
    for stream, item in puts:
        stream._put(item)


def _fold(older: RequestOutput, newer: RequestOutput, delta: bool) -> RequestOutput:
    """One output that says what `older` then `newer` said: for DELTA outputs their
    concatenation (built in `older`, which nobody has seen yet), else simply `newer`."""
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
