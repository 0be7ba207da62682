"""Tensor parallelism's worker processes (ranks 1..N-1), as rank 0 sees and runs them.

`Workers` is rank 0's handle on them: it spawns them, waits for their hand-shake, watches
them, and stops them. `_worker_main` is a worker's whole life: it joins the process group,
builds its ModelRunner, then serves steps with the loop nanovllm/engine/tensor_parallel.py
hands it (the step protocol, both halves, lives there).

Workers block on their pipe between steps, so an idle engine holds no collective open
(no timeout to hit) and a worker sees its parent's death as the pipe closing.
On the CPU the ranks share the cores, so each runs torch with cores / N threads.

Robustness:
- Nothing global is fixed: the rendezvous TCPStore listens on a port the OS picks, and no
  shared memory is used, so engines in different processes never meet.
- Shutdown (engine.shutdown(), `del llm`, garbage collection, interpreter exit) sends
  "stop" to the workers, joins them, and destroys the process group (CUDA graphs released
  first: NCCL cannot destroy a communicator a live graph captured; after a failure, NCCL's
  group is aborted instead), so another engine can start in the same process (one at a
  time: torch.distributed has one default group).
  Workers ignore Ctrl-C; rank 0 holds a Ctrl-C until the step in flight finishes (an
  interrupted step would leave the ranks out of step), then raises it (ctrl_c.py). Workers exit when
  their parent dies, even in a collective.
- A worker that dies is noticed by rank 0: between steps (exit code, broken pipe), in a
  gloo collective (the peer's socket closes), or by a watchdog thread that aborts NCCL.
  The engine then raises TensorParallelError (a RuntimeError) naming the worker, with
  the worker's traceback when it failed in Python; it never waits forever.
  Collectives also time out after NANOVLLM_TP_TIMEOUT_S seconds (default 600).
"""
import logging
import multiprocessing.connection
import os
import signal
import threading
import time
import traceback
from datetime import timedelta

import torch
import torch.distributed as dist

from nanovllm.config import EngineConfig
from nanovllm.engine.ctrl_c import sigint_ignored
from nanovllm.engine.model_runner import ModelRunner

logger = logging.getLogger(__name__)

STOP = b"stop"       # sent on a worker's pipe instead of a step's header: leave


class TensorParallelError(RuntimeError):
    """A worker died or failed, or the ranks fell out of step: the engine cannot go on."""


def _timeout() -> timedelta:
    return timedelta(seconds=float(os.environ.get("NANOVLLM_TP_TIMEOUT_S", 600)))


def init_process_group(config: EngineConfig, rank: int, store) -> None:
    if config.device == "cuda":
        torch.cuda.set_device(rank)
    dist.init_process_group("nccl" if config.device == "cuda" else "gloo", store=store, rank=rank,
                            world_size=config.tensor_parallel_size, timeout=_timeout())


# -- a worker process ------------------------------------------------------------------------
def _worker_main(config: EngineConfig, rank: int, port: int, conn, cpu_threads: int, serve) -> None:
    """A worker's life. `serve(runner, conn)` runs its steps until it reads STOP."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)        # Ctrl-C is rank 0's to handle
    _exit_with_parent()
    if config.device == "cpu":
        torch.set_num_threads(cpu_threads)
    try:
        store = dist.TCPStore("127.0.0.1", port, config.tensor_parallel_size, False, timeout=_timeout())
        conn.send(("hello", os.getpid()))
        init_process_group(config, rank, store)
        runner = ModelRunner(config)
        conn.send(("ready", runner.num_blocks))
        serve(runner, conn)                             # EOFError when rank 0 is gone
        if runner.graphs is not None:
            runner.graphs.release()                     # before destroy_process_group, see release()
    except EOFError:
        os._exit(1)
    except BaseException:
        try:
            conn.send(("error", traceback.format_exc()))
        except OSError:
            pass
        os._exit(1)
    if dist.is_initialized():
        dist.destroy_process_group()


def _exit_with_parent() -> None:
    """A daemon thread that ends this worker as soon as its parent process is gone, even
    while the main thread is stuck in a collective."""
    parent, ppid = multiprocessing.parent_process(), os.getppid()

    def watch():
        while os.getppid() == ppid:
            if parent is not None and multiprocessing.connection.wait([parent.sentinel], timeout=1.0):
                break
            if parent is None:
                time.sleep(1.0)
        os._exit(1)

    threading.Thread(target=watch, name="nanovllm-parent-watch", daemon=True).start()


def _exited(proc) -> bool:
    """Whether the process has ended (its sentinel is ready; safe while another thread reaps it)."""
    return bool(multiprocessing.connection.wait([proc.sentinel], timeout=0))


class Workers:
    """Rank 0's handle on the worker processes: start, talk, watch, stop. It holds no
    reference to the runner, so a weakref finalizer can shut it down."""

    def __init__(self, config: EngineConfig, serve):
        """`serve`: the step loop each worker runs (see _worker_main)."""
        self.world = config.tensor_parallel_size
        self.nccl = config.device == "cuda"
        self.procs, self.conns = [], []
        self.failure: str | None = None   # why the workers can no longer be driven
        self.death: str | None = None     # set by the watchdog thread the moment a worker dies
        self.last_words: str | None = None  # the traceback a failing worker sent
        self.closed = False
        self.process_group = False        # whether rank 0 joined the process group
        self.graphs = None                # rank 0's StepGraphs: released before the group is destroyed
        # On the CPU the ranks share the cores: N processes each running torch's full thread
        # pool oversubscribe them (OpenMP threads spin while they wait), which is ~20x slower.
        self.saved_threads = torch.get_num_threads()
        cpu_threads = max(1, self.saved_threads // self.world)
        if config.device == "cpu":
            torch.set_num_threads(cpu_threads)
        # The rendezvous store: port 0 lets the OS pick a free port.
        self.store = dist.TCPStore("127.0.0.1", 0, self.world, True, timeout=_timeout(), wait_for_workers=False)
        ctx = torch.multiprocessing.get_context("spawn")
        try:
            for rank in range(1, self.world):
                ours, theirs = ctx.Pipe()
                proc = ctx.Process(target=_worker_main, args=(config, rank, self.store.port, theirs, cpu_threads, serve),
                                   name=f"nanovllm-tp-rank{rank}", daemon=True)
                with sigint_ignored():           # the worker starts with Ctrl-C ignored
                    proc.start()
                theirs.close()
                self.procs.append(proc)
                self.conns.append(ours)
        except BaseException:
            for proc in self.procs:
                proc.kill()
                proc.join()
            raise
        self._wake_r, self._wake_w = os.pipe()
        self._watchdog = threading.Thread(target=self._watch, name="nanovllm-tp-watchdog", daemon=True)
        self._watchdog.start()

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self.procs]

    # -- start-up ------------------------------------------------------------------------
    def wait_for(self, kind: str, timeout: float = 600.0) -> list:
        """Wait until every worker has sent message `kind`; raise if one fails or dies first."""
        deadline, answers = time.monotonic() + timeout, []
        hint = ("; see its traceback above. A script that creates the LLM at import time must guard "
                "it with `if __name__ == \"__main__\":` (workers are spawned and import __main__)"
                if kind == "hello" else "")
        for rank, (proc, conn) in enumerate(zip(self.procs, self.conns), 1):
            while True:
                left = deadline - time.monotonic()
                ready = multiprocessing.connection.wait([conn, proc.sentinel], timeout=max(0.0, left))
                if conn in ready:
                    try:
                        msg = conn.recv()
                    except (EOFError, OSError):
                        raise TensorParallelError(self._death_note(rank, proc) + hint) from None
                    if msg[0] == "error":
                        raise TensorParallelError(f"tensor-parallel worker rank {rank} failed:\n{msg[1]}")
                    if msg[0] == kind:
                        answers.append(msg[1])
                        break
                elif ready:
                    raise TensorParallelError(self._death_note(rank, proc) + hint)
                elif left <= 0:
                    raise TensorParallelError(f"tensor-parallel worker rank {rank} sent no {kind!r} "
                                              f"within {timeout:.0f} s")
        return answers

    # -- each step -----------------------------------------------------------------------
    def send(self, header: bytes, payload: torch.Tensor) -> None:
        """Send a step: the header down every pipe, then the payload by broadcast."""
        for conn in self.conns:
            conn.send_bytes(header)
        if payload.numel():
            dist.broadcast(payload, src=0)

    def wait(self, event: torch.cuda.Event) -> None:
        """Wait for `event` (a step's results), raising as soon as a worker dies. An NCCL
        kernel waits for a dead peer forever, and aborting the communicator may not free a
        kernel a CUDA graph launched, so rank 0 polls instead of blocking in the driver."""
        while not event.query():
            if self.death is not None:
                self.failure = self.failure or self._worker_failure() or self.death   # its traceback, if it sent one
                raise TensorParallelError(self.failure)
            time.sleep(0)                     # let other threads (the watchdog) run

    def check(self) -> None:
        """Raise if a worker is gone or the ranks are out of step."""
        if self.failure is None:
            self.failure = self._worker_failure()
        if self.failure is not None:
            raise TensorParallelError(f"The tensor-parallel engine cannot run (shut it down and create "
                                      f"a new LLM): {self.failure}")

    def explain(self, error: BaseException, out_of_step: bool = True) -> BaseException:
        """After `error` in a step or at start-up: a RuntimeError naming the worker that
        died or failed, if one did; otherwise `error` itself. `out_of_step`: the error came
        while the ranks were working together, so the workers cannot be driven any more."""
        if isinstance(error, TensorParallelError) or (
                not out_of_step and self.failure is None and self._worker_failure() is None):
            return error
        if isinstance(error, KeyboardInterrupt):
            self.failure = self.failure or "a step was interrupted (second Ctrl-C) while the ranks were working"
            return error
        if not isinstance(error, (RuntimeError, OSError, EOFError)):
            # Rank 0's own error (a ValueError for a cache that does not fit, ...): every rank
            # meets it alike, so it is the one to report.
            self.failure = self.failure or f"{type(error).__name__} on rank 0: {error}"
            return error
        # A crashed worker closes its sockets a moment before it can be reaped.
        multiprocessing.connection.wait([p.sentinel for p in self.procs], timeout=1.0)
        note = self._worker_failure()
        if note is not None:
            self.failure = self.failure or note
            return TensorParallelError(note)
        self.failure = self.failure or f"a step failed on rank 0 ({type(error).__name__}: {error})"
        return error

    def _worker_failure(self) -> str | None:
        """What became of a worker that failed (its traceback) or died, or None if all are
        well. Main thread only: it reads the pipes."""
        for rank, conn in enumerate(self.conns, 1):
            try:
                while self.last_words is None and conn.poll():
                    msg = conn.recv()
                    if msg[0] == "error":
                        self.last_words = f"tensor-parallel worker rank {rank} failed:\n{msg[1].rstrip()}"
            except (EOFError, OSError):
                pass
        if self.last_words is not None:
            return self.last_words
        for rank, proc in enumerate(self.procs, 1):
            if _exited(proc):
                return self._death_note(rank, proc)
        return None

    @staticmethod
    def _death_note(rank: int, proc) -> str:
        proc.join(timeout=1.0)
        for _ in range(100):    # another thread may be reaping it this very moment
            if proc.exitcode is not None:
                break
            time.sleep(0.01)
        code = proc.exitcode
        how = f"was killed by signal {-code}" if code is not None and code < 0 else f"exited with code {code}"
        return f"tensor-parallel worker rank {rank} (pid {proc.pid}) {how}"

    def _watch(self) -> None:
        """Watchdog: when a worker dies, record it, and abort NCCL so a collective that
        waits for the dead rank returns instead of waiting forever (gloo notices by itself:
        the dead peer's socket closes)."""
        sentinels = {p.sentinel: (rank, p) for rank, p in enumerate(self.procs, 1)}
        ready = multiprocessing.connection.wait(list(sentinels) + [self._wake_r])
        if self.closed or self._wake_r in ready:
            return
        rank, proc = sentinels[ready[0]]
        self.death = self._death_note(rank, proc)
        logger.error("%s", self.death)
        if self.nccl and self.process_group:
            try:
                dist.distributed_c10d._abort_process_group()
            except Exception as e:     # best effort: the collective's timeout is the fallback
                logger.warning("could not abort the NCCL process group: %s", e)

    # -- shutdown ------------------------------------------------------------------------
    def shutdown(self, grace_s: float = 10.0) -> None:
        if self.closed:
            return
        self.closed = True
        os.write(self._wake_w, b"x")
        # The watchdog now returns, or it is recording a death and aborting NCCL: let it
        # finish, so the teardown below sees what it did. An abort that hangs is given up on.
        self._watchdog.join(timeout=grace_s)
        watchdog_stuck = self._watchdog.is_alive()
        self.failure = self.failure or self.death
        if self.failure is None:              # workers wait on their pipes: ask them to leave
            for conn in self.conns:
                try:
                    conn.send_bytes(STOP)
                except OSError:
                    pass
        else:
            grace_s = 1.0                     # workers may be stuck in a collective
        if watchdog_stuck:
            logger.warning("the process group could not be aborted; it is left as it is")
        elif self.process_group and dist.is_initialized():
            try:
                if self.failure is None:
                    if self.graphs is not None:   # a communicator a live graph captured cannot be destroyed
                        self.graphs.release()
                    dist.destroy_process_group()
                elif self.nccl:
                    # Ranks out of step, a graph perhaps stuck in an all-reduce: destroying would
                    # wait forever. Abort instead (unless the watchdog's abort already ended it).
                    dist.distributed_c10d._abort_process_group()
                else:
                    dist.destroy_process_group()
            except Exception as e:
                logger.warning("tearing down the process group failed: %s", e)
        self.graphs = None
        self.process_group = False
        deadline = time.monotonic() + grace_s
        for proc in self.procs:
            proc.join(timeout=max(0.0, deadline - time.monotonic()))
        for proc in self.procs:
            if proc.exitcode is None:
                proc.terminate()
                proc.join(timeout=2.0)
            if proc.exitcode is None:
                proc.kill()
                proc.join()
        for conn in self.conns:
            conn.close()
        if not self.nccl:
            torch.set_num_threads(self.saved_threads)
        os.close(self._wake_r)
        os.close(self._wake_w)
        self.store = None
