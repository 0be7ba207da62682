"""The engine in its own process, behind `AsyncLLM` (and so behind `nanovllm serve`).

Why a process and not a thread: a step is Python work on the host (scheduling, inputs,
detokenizing) that must keep pace with the GPU. In a thread beside the server's event loop it
shares Python's GIL with the streaming of every client's chunks, and each waits for the
other (on an H100 the server's steps took ~45% longer than offline ones). vLLM runs its
engine core in a separate process for the same reason.

The two sides talk over one pipe (multiprocessing.Pipe: pickled tuples):

    front -> engine   ("add", request_id, prompt, params) | ("abort", request_id)
                      ("stats", token) | ("shutdown",)
    engine -> front   ("ready", config) or ("failed", error)          once, at start
                      ("outputs", [(request_id, item, last), ...])     item: a RequestOutput,
                                                                       ACCEPTED, ABORTED or an error
                      ("stats", token, EngineStats)
                      ("stopped", None or (summary, traceback))        last: None after
                                                                       "shutdown", else why it failed

The engine process's loop:

    while running:
        block on the pipe while idle (an idle engine costs nothing), else take what is waiting
        apply the commands in order (new requests join the batch at the next step)
        one engine step (`HandOver.step`: engine.advance(), then the outputs due now)
        send them (each request's only a few times a second under load: `HandOver`)

It ends on "shutdown", on a failure, or when the pipe closes (the front process is gone).
The front's side of the pipe (start, send, read, stop): engine_handle.py.
"""
import gc
import logging
import multiprocessing
import multiprocessing.connection
import os
import pickle
import signal
import threading
import time
import traceback
from dataclasses import dataclass

from nanovllm.entrypoints.hand_over import HandOver
from nanovllm.outputs import RequestOutput
from nanovllm.sampling_params import RequestOutputKind

logger = logging.getLogger(__name__)

ACCEPTED = "accepted"   # an "outputs" item: the engine took the request
ABORTED = "aborted"     # an "outputs" item: the request was aborted; its stream ends


@dataclass
class EngineStats:
    """What the engine process reports on `("stats", token)`, after the commands sent before it."""
    num_steps: int                  # steps launched (each advances every running request by one token)
    num_unfinished_requests: int
    num_free_blocks: int
    num_blocks: int
    loop_iterations: int            # turns of the loop (it does not turn while idle)
    num_running: int = 0            # sequences in the running batch (vLLM: vllm:num_requests_running)
    num_waiting: int = 0            # sequences waiting for their (next) prefill
    num_preemptions: int = 0        # since the start
    num_draft_tokens: int | None = None      # speculative decoding (None when off): proposed tokens,
    num_accepted_tokens: int | None = None   # and those accepted, since the start


@dataclass
class RequestTimes:
    """When a request's first token was made and when it finished (time.monotonic(), one
    clock for every process of the machine), sent with its final output as `metrics`."""
    first_token: float | None
    finished: float


class EngineLoop:
    """The engine process's loop (module docstring), over an `LLMEngine` and the pipe."""

    def __init__(self, engine, conn, stream_interval_per_request: float):
        self.engine, self.conn = engine, conn
        self.hand_over = HandOver(stream_interval_per_request)
        self.clock = FirstTokenClock()
        self.loop_iterations = 0
        # Where the time goes (logged at the end; compare "ms per launched step" with the
        # "ms each" of an offline bench.py run to see what serving adds to a step).
        self.seconds_in_steps = self.seconds_sending = 0.0

    def run(self) -> None:
        failure = None              # (one-line summary, traceback): the front logs it, once
        try:
            while self._take_commands(block=not self.engine.has_unfinished_requests()):
                self.loop_iterations += 1
                if not self.engine.has_unfinished_requests():
                    continue
                start = time.perf_counter()
                outputs = self.hand_over.step(self.engine)
                stepped = time.perf_counter()
                self.clock.after_step(self.engine, outputs)
                if outputs:
                    self.conn.send(("outputs", self.hand_over.items(outputs)))
                self.seconds_in_steps += stepped - start
                self.seconds_sending += time.perf_counter() - stepped
        except (EOFError, BrokenPipeError):
            pass                                # the front process is gone
        except BaseException as e:
            failure = (summarize(e), traceback.format_exc())
        launched = max(1, self.engine.num_steps)
        logger.info("engine loop: %d steps launched, %.2f s in step() (%.2f ms per launched step), %.2f s "
                    "sending outputs", self.engine.num_steps, self.seconds_in_steps,
                    1000 * self.seconds_in_steps / launched, self.seconds_sending)
        try:
            self.conn.send(("stopped", failure))
        except OSError:
            if failure is not None:             # nobody else can log it
                logger.error("The engine loop failed:\n%s", failure[1])

    def _take_commands(self, block: bool) -> bool:
        """Apply the commands waiting on the pipe (first waiting for one if `block`); answer
        adds and aborts in one message. False once asked to shut down."""
        replies = []
        if block:
            self.conn.poll(None)                # wakes on a command, or on EOF
        while self.conn.poll():
            command = self.conn.recv()
            kind = command[0]
            if kind == "add":
                _, request_id, prompt, params = command
                try:
                    self.engine.add_request(request_id, prompt, params)
                except Exception as e:          # rejected: tell only that caller
                    replies.append((request_id, sendable(e), True))
                else:
                    self.clock.add(request_id, params)
                    replies.append((request_id, ACCEPTED, False))
            elif kind == "abort":
                self.engine.abort_request([command[1]])
                self.hand_over.drop(command[1])
                self.clock.drop(command[1])
                replies.append((command[1], ABORTED, True))
            elif kind == "stats":
                self._flush(replies)
                self.conn.send(("stats", command[1], self.stats()))
            else:                               # "shutdown"
                self._flush(replies)
                return False
        self._flush(replies)
        return True

    def _flush(self, replies: list) -> None:
        if replies:
            self.conn.send(("outputs", replies[:]))
            replies.clear()

    def stats(self) -> EngineStats:
        bm, scheduler = self.engine.block_manager, self.engine.scheduler
        spec = getattr(self.engine, "speculator", None)
        return EngineStats(self.engine.num_steps, self.engine.get_num_unfinished_requests(),
                           bm.num_free_blocks, bm.num_blocks, self.loop_iterations,
                           len(scheduler.running), len(scheduler.waiting), scheduler.num_preemptions,
                           spec and spec.metrics.num_draft_tokens, spec and spec.metrics.num_accepted_tokens)


class FirstTokenClock:
    """When each request's first token was made, for the time-to-first-token metric. A
    streamed request's first output tells (it is made at its first token). A FINAL_ONLY one
    (the server's non-streamed requests) has no output before its last, so after each step
    those still without a token are looked up in the engine."""

    def __init__(self):
        self.streamed: set[str] = set()             # added, no output yet
        self.final_only: set[str] = set()           # added, no token yet
        self.first_token: dict[str, float] = {}

    def add(self, request_id: str, params) -> None:
        final_only = params is not None and params.output_kind == RequestOutputKind.FINAL_ONLY
        (self.final_only if final_only else self.streamed).add(request_id)

    def drop(self, request_id: str) -> None:
        self.streamed.discard(request_id)
        self.final_only.discard(request_id)
        self.first_token.pop(request_id, None)

    def after_step(self, engine, outputs: list[RequestOutput]) -> None:
        now = time.monotonic()
        if self.final_only:
            for request_id in [r for r in self.final_only if _first_token_made(engine, r)]:
                self.final_only.discard(request_id)
                self.first_token[request_id] = now
        for output in outputs:
            if output.request_id in self.streamed:
                self.streamed.discard(output.request_id)
                self.first_token[output.request_id] = now
            if output.finished:
                output.metrics = RequestTimes(self.first_token.pop(output.request_id, None), now)


def _first_token_made(engine, request_id: str) -> bool:
    """Has the engine made a token for this request yet? (Reads LLMEngine.requests and its
    sequences: the one place this file looks past the engine's public methods.)"""
    request = engine.requests.get(request_id)
    return request is None or any(seq.num_output_tokens for seq in request.seqs)


def summarize(error: BaseException, limit: int = 300) -> str:
    """One line for a client or a log: the error's type and the first line of its message."""
    lines = str(error).strip().splitlines()
    text = f"{type(error).__name__}: {lines[0]}" if lines else type(error).__name__
    return text if len(text) <= limit else text[:limit - 3] + "..."


def sendable(error: BaseException) -> BaseException:
    """`error`, or a RuntimeError carrying its text if it does not survive pickling."""
    try:
        pickle.loads(pickle.dumps(error))
        return error
    except Exception:
        return RuntimeError(f"{type(error).__name__}: {error}")


def run_engine(conn, model: str, engine_kwargs: dict, stream_interval_per_request: float) -> None:
    """The engine process's main function."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)    # Ctrl-C is the front's to handle (the whole group gets it)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})     # (blocked since its start: engine_handle.sigint_blocked)
    loaded = threading.Event()
    _exit_if_orphaned_before(loaded)
    from nanovllm.engine.llm_engine import LLMEngine
    try:
        engine = LLMEngine.from_kwargs(model, **engine_kwargs)
    except BaseException as e:
        conn.send(("failed", sendable(e)))
        return
    finally:
        loaded.set()
    # This process holds nothing but the engine, for as long as it runs: what loading built
    # (model, tokenizer, the libraries' objects) goes out of the garbage collector's reach, so
    # that a full collection mid-step walks only what steps create (docs/serving.md).
    gc.collect()
    gc.freeze()
    try:
        conn.send(("ready", engine.config))
        EngineLoop(engine, conn, stream_interval_per_request).run()
    except OSError:
        pass                                        # the front went away while the model loaded
    finally:
        engine.shutdown()
        gc.unfreeze()      # the final collection at exit then frees them (else Triton's bindings report leaks)


def _exit_if_orphaned_before(loaded: threading.Event) -> None:
    """While the model loads (which can take minutes), the pipe is not read: if the front
    dies meanwhile (killed, or a signal's default action), end this process at once instead
    of loading on as an orphan. (Tensor-parallel workers end with their parent.) Once loaded,
    the loop sees the pipe close and stops in order."""
    parent = multiprocessing.parent_process()
    if parent is None:
        return

    def watch():
        if multiprocessing.connection.wait([parent.sentinel]) and not loaded.is_set():
            os._exit(1)
    threading.Thread(target=watch, name="nanovllm-front-watch", daemon=True).start()
