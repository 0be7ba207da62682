"""The front's handle on the engine process (engine_process.py): start it, send it commands
from any thread without blocking, hand its messages to a callback, stop it."""
import contextlib
import logging
import multiprocessing
import multiprocessing.util
import queue
import signal
import threading
from multiprocessing.reduction import ForkingPickler

from nanovllm.entrypoints.engine_process import run_engine

logger = logging.getLogger(__name__)


class EngineProcess:
    """The front's handle on the engine process: start it, send it commands, hand its
    messages to `on_message` (called in a reader thread), stop it."""

    def __init__(self, model: str, engine_kwargs: dict, stream_interval_per_request: float, on_message):
        ctx = multiprocessing.get_context("spawn")       # CUDA cannot be used in a forked child
        self.conn, theirs = ctx.Pipe()
        # Not a daemon: with tensor parallelism it starts worker processes of its own. It ends
        # when the pipe closes, so it does not outlive this process.
        self.proc = ctx.Process(target=run_engine, name="nanovllm-engine",
                                args=(theirs, model, engine_kwargs, stream_interval_per_request))
        try:
            with sigint_blocked():
                self.proc.start()
            theirs.close()
            kind, payload = self.conn.recv()    # loading the model can take a while
        except EOFError:
            self.proc.join()
            raise RuntimeError(
                f"The engine process exited while starting (exit code {self.proc.exitcode}); its error is "
                f"printed above. If it failed importing your script: the process is spawned and imports "
                f"the main module, so build AsyncLLM under `if __name__ == \"__main__\":`") from None
        except BaseException:                   # Ctrl-C, a SIGTERM turned exception: stop loading now
            _end_now(self.proc)
            raise
        if kind == "failed":
            self.proc.join()
            raise payload
        self.config = payload
        # Commands go through a queue and a sender thread, so a full pipe (the engine busy with
        # a step) never blocks the caller's event loop.
        self.outbox: queue.SimpleQueue = queue.SimpleQueue()
        self.sender = threading.Thread(target=self._send_loop, name="nanovllm-engine-sender", daemon=True)
        self.reader = threading.Thread(target=self._read_loop, args=(on_message,), name="nanovllm-engine-reader",
                                       daemon=True)
        self.sender.start()
        self.reader.start()
        # Runs at shutdown(), or at interpreter exit before multiprocessing joins its children
        # (which would wait for this one forever). (The threads keep this object alive.)
        self._stop = multiprocessing.util.Finalize(self, _stop_process, args=(self.proc, self.outbox),
                                                   exitpriority=10)

    def post(self, command: tuple) -> None:
        """Queue a command. Pickled here, in the caller's thread: one that cannot be pickled
        raises to its caller instead of stopping the sender thread."""
        self.outbox.put(ForkingPickler.dumps(command))

    def alive(self) -> bool:
        return self.proc.is_alive()

    def shutdown(self) -> None:
        self._stop()
        self.reader.join(timeout=5)             # it has read "stopped" (or EOF)
        self.conn.close()

    def _send_loop(self) -> None:
        while (command := self.outbox.get()) is not None:
            try:
                self.conn.send_bytes(command)
            except OSError:
                return

    def _read_loop(self, on_message) -> None:
        while True:
            try:
                message = self.conn.recv()
            except (EOFError, OSError):
                self.proc.join(timeout=5)
                code = self.proc.exitcode
                how = f"killed by signal {-code}" if code is not None and code < 0 else f"exit code {code}"
                message = ("stopped", (f"The engine process exited unexpectedly ({how})", None))
            on_message(message)
            if message[0] == "stopped":
                return


def _end_now(proc) -> None:
    """Stop the engine process without waiting for it to load (SIGTERM, then SIGKILL)."""
    if proc.pid is None:                        # it was not started
        return
    proc.terminate()
    proc.join(timeout=5)
    if proc.exitcode is None:
        proc.kill()
        proc.join()


def _stop_process(proc, outbox: queue.SimpleQueue, grace_s: float = 30.0) -> None:
    """Ask the engine process to leave (it shuts its engine down: TP workers, NCCL), then
    make sure it has."""
    outbox.put(ForkingPickler.dumps(("shutdown",)))
    outbox.put(None)                            # ends the sender thread
    proc.join(timeout=grace_s)
    if proc.exitcode is None:
        logger.warning("the engine process did not stop in %.0f s; terminating it", grace_s)
        proc.terminate()
        proc.join(timeout=5)
    if proc.exitcode is None:
        proc.kill()
        proc.join()


@contextlib.contextmanager
def sigint_blocked():
    """Start a child with SIGINT blocked: a Ctrl-C (which reaches the whole process group)
    does not interrupt it while it imports, before it ignores SIGINT itself (the mask is
    inherited through exec). Blocked, not ignored, here: a Ctrl-C meanwhile stays pending for
    this thread and raises KeyboardInterrupt as soon as the block ends, instead of being lost."""
    old = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)
