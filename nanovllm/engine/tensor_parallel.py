"""Tensor parallelism: one model split over N ranks, driven from the user's process.

Rank 0 is the user's process: a `TensorParallelRunner`, which is a ModelRunner that
also drives ranks 1..N-1, worker processes started with the spawn method. Every rank
builds the same model from sharded layers (nanovllm/layers/) and joins one
`torch.distributed` process group (NCCL on CUDA, gloo on CPU); the layers' all-reduces
and the LM head's gather run inside it.

A step, seen from rank 0:

    inputs = prepare(batch)                    rank 0 only: the scheduler lives here
    header -> each worker's pipe               the inputs with every tensor replaced by a
                                               _Slot (dtype, shape, offset): a few hundred bytes
    payload -> dist.broadcast                  all input tensors packed into one byte buffer
    execute(inputs)                            every rank; logits arrive on rank 0 only
    sample(...)                                rank 0 only

Workers block on their pipe between steps, so an idle engine holds no collective open
(no timeout to hit) and a worker sees its parent's death as the pipe closing.
On the CPU the ranks share the cores, so each runs torch with cores / N threads.

Robustness:
- Nothing global is fixed: the rendezvous TCPStore listens on a port the OS picks, and no
  shared memory is used, so engines in different processes never meet.
- Shutdown (engine.shutdown(), `del llm`, garbage collection, interpreter exit) sends
  "stop" to the workers, joins them, and destroys the process group, so another engine
  can start in the same process (one at a time: torch.distributed has one default group).
  Workers ignore Ctrl-C; rank 0 holds a Ctrl-C until the step in flight finishes (an
  interrupted step would leave the ranks out of step), then raises it. Workers exit when
  their parent dies, even in a collective.
- A worker that dies is noticed by rank 0: between steps (exit code, broken pipe), in a
  gloo collective (the peer's socket closes), or by a watchdog thread that aborts NCCL.
  The engine then raises TensorParallelError (a RuntimeError) naming the worker, with
  the worker's traceback when it failed in Python; it never waits forever.
  Collectives also time out after NANOVLLM_TP_TIMEOUT_S seconds (default 600).
"""
import atexit
import copy
import dataclasses
import logging
import multiprocessing.connection
import os
import pickle
import signal
import threading
import time
import traceback
import weakref
from datetime import timedelta

import torch
import torch.distributed as dist

from nanovllm.config import EngineConfig
from nanovllm.engine.model_runner import ModelInputs, ModelRunner, StepResult

logger = logging.getLogger(__name__)

_STOP = b"stop"
_ALIGN = 16          # payload offsets are aligned so every slice can be viewed as any dtype


class TensorParallelError(RuntimeError):
    """A worker died or failed, or the ranks fell out of step: the engine cannot go on."""


def _timeout() -> timedelta:
    return timedelta(seconds=float(os.environ.get("NANOVLLM_TP_TIMEOUT_S", 600)))


def _init_process_group(config: EngineConfig, rank: int, store) -> None:
    if config.device == "cuda":
        torch.cuda.set_device(rank)
    dist.init_process_group("nccl" if config.device == "cuda" else "gloo", store=store, rank=rank,
                            world_size=config.tensor_parallel_size, timeout=_timeout())


# -- step inputs: header + packed payload ---------------------------------------------------
@dataclasses.dataclass
class _Slot:
    """Stands in the header for a tensor of the payload."""
    offset: int
    nbytes: int
    dtype: torch.dtype
    shape: tuple


class _Packer:
    """Replaces every tensor on `device` inside a (nested) dataclass by a _Slot and collects
    their bytes. Anything else (ints, bools, a stray CPU tensor) stays in the header."""

    def __init__(self, device: torch.device):
        self.device, self.parts, self.size = device, [], 0

    def strip(self, obj):
        if isinstance(obj, torch.Tensor) and obj.device == self.device:
            data = obj.contiguous().reshape(-1).view(torch.uint8)
            slot = _Slot(self.size, data.numel(), obj.dtype, tuple(obj.shape))
            pad = -data.numel() % _ALIGN
            self.parts += [data, data.new_empty(pad)] if pad else [data]
            self.size += data.numel() + pad
            return slot
        if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
            out = copy.copy(obj)
            for f in dataclasses.fields(obj):
                object.__setattr__(out, f.name, self.strip(getattr(obj, f.name)))
            return out
        if isinstance(obj, (list, tuple)):
            return type(obj)(self.strip(x) for x in obj)
        if isinstance(obj, dict):
            return {k: self.strip(v) for k, v in obj.items()}
        return obj


def pack_inputs(inputs: ModelInputs, device: torch.device) -> tuple[bytes, torch.Tensor]:
    """-> (header bytes for the pipes, the uint8 payload for the broadcast)."""
    packer = _Packer(device)
    skeleton = packer.strip(inputs)
    payload = torch.cat(packer.parts) if packer.parts else torch.empty(0, dtype=torch.uint8, device=device)
    return pickle.dumps((skeleton, packer.size), protocol=pickle.HIGHEST_PROTOCOL), payload


def unpack_inputs(skeleton, payload: torch.Tensor):
    """The worker's side of pack_inputs: put views of the payload back where the slots are."""
    if isinstance(skeleton, _Slot):
        return payload[skeleton.offset:skeleton.offset + skeleton.nbytes].view(skeleton.dtype).view(skeleton.shape)
    if dataclasses.is_dataclass(skeleton) and not isinstance(skeleton, type):
        for f in dataclasses.fields(skeleton):
            object.__setattr__(skeleton, f.name, unpack_inputs(getattr(skeleton, f.name), payload))
        return skeleton
    if isinstance(skeleton, (list, tuple)):
        return type(skeleton)(unpack_inputs(x, payload) for x in skeleton)
    if isinstance(skeleton, dict):
        return {k: unpack_inputs(v, payload) for k, v in skeleton.items()}
    return skeleton


# -- worker processes (ranks 1..N-1) ------------------------------------------------------------
def _worker_main(config: EngineConfig, rank: int, port: int, conn, cpu_threads: int) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)        # Ctrl-C is rank 0's to handle
    _exit_with_parent()
    if config.device == "cpu":
        torch.set_num_threads(cpu_threads)
    try:
        store = dist.TCPStore("127.0.0.1", port, config.tensor_parallel_size, False, timeout=_timeout())
        conn.send(("hello", os.getpid()))
        _init_process_group(config, rank, store)
        runner = ModelRunner(config)
        conn.send(("ready", runner.num_blocks))
        while True:
            header = conn.recv_bytes()                  # EOFError when rank 0 is gone
            if header == _STOP:
                break
            skeleton, size = pickle.loads(header)
            payload = torch.empty(size, dtype=torch.uint8, device=runner.device)
            if size:
                dist.broadcast(payload, src=0)
            runner.execute(unpack_inputs(skeleton, payload))
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


class _Workers:
    """Rank 0's handle on the worker processes: start, talk, watch, stop. It holds no
    reference to the runner, so a weakref finalizer can shut it down."""

    def __init__(self, config: EngineConfig):
        self.world = config.tensor_parallel_size
        self.nccl = config.device == "cuda"
        self.procs, self.conns = [], []
        self.failure: str | None = None   # why the workers can no longer be driven
        self.last_words: str | None = None  # the traceback a failing worker sent
        self.closed = False
        self.process_group = False        # whether rank 0 joined the process group
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
                proc = ctx.Process(target=_worker_main, args=(config, rank, self.store.port, theirs, cpu_threads),
                                   name=f"nanovllm-tp-rank{rank}", daemon=True)
                with _sigint_ignored():           # the worker starts with Ctrl-C ignored
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
    def send(self, inputs: ModelInputs, device: torch.device) -> None:
        header, payload = pack_inputs(inputs, device)
        for conn in self.conns:
            conn.send_bytes(header)
        if payload.numel():
            dist.broadcast(payload, src=0)

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
        logger.error("%s", self._death_note(rank, proc))
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
        if self.failure is None:              # workers wait on their pipes: ask them to leave
            for conn in self.conns:
                try:
                    conn.send_bytes(_STOP)
                except OSError:
                    pass
        else:
            grace_s = 1.0                     # workers may be stuck in a collective
        if self.process_group and dist.is_initialized():
            try:
                dist.destroy_process_group()
            except Exception as e:
                logger.warning("destroying the process group failed: %s", e)
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
        self._watchdog.join(timeout=1.0)
        if not self.nccl:
            torch.set_num_threads(self.saved_threads)
        os.close(self._wake_r)
        os.close(self._wake_w)
        self.store = None


# -- rank 0 ---------------------------------------------------------------------------------------
class TensorParallelRunner(ModelRunner):
    """Rank 0: a ModelRunner that starts the workers and, before each forward pass, sends
    them the step's inputs. prepare/sample are ModelRunner's and run here only."""

    def __init__(self, config: EngineConfig):
        if dist.is_initialized():
            raise TensorParallelError(
                "torch.distributed is already initialised in this process (another tensor-parallel "
                "engine is still alive?). Only one can live in a process at a time: shut the other "
                "down first (llm.llm_engine.shutdown() or `del llm`).")
        self._driving = False            # during __init__ every rank runs its own warm-up passes
        self.workers = _Workers(config)
        # Shut the workers down when this runner is collected, or at interpreter exit, before
        # multiprocessing's own exit hook would terminate them (atexit runs handlers last-in first-out).
        self._finalizer = weakref.finalize(self, self.workers.shutdown)
        atexit.register(self._finalizer)
        start = time.perf_counter()
        try:
            self.workers.wait_for("hello")
            _init_process_group(config, 0, self.workers.store)
            self.workers.process_group = True
            super().__init__(config)
            self.workers.wait_for("ready")
        except BaseException as e:
            error = self.workers.explain(e)
            self.shutdown()
            if error is e:
                raise
            raise error from e
        self._driving = True
        logger.info("tensor parallel: %d ranks (%s) ready in %.1f s", config.tensor_parallel_size,
                    "nccl" if config.device == "cuda" else "gloo", time.perf_counter() - start)

    @property
    def worker_pids(self) -> list[int]:
        return self.workers.pids

    def resolve(self, launched) -> StepResult:
        try:
            result = super().resolve(launched)
        except BaseException as e:     # e.g. a CUDA error after the watchdog aborted NCCL
            error = self.workers.explain(e, out_of_step=False)
            if error is e:
                raise
            raise error from e
        self.workers.check()      # after an NCCL abort the step returned garbage: do not use it
        return result

    def execute(self, inputs: ModelInputs) -> torch.Tensor | None:
        if not self._driving:
            return super().execute(inputs)
        self.workers.check()
        with _SigintHeld():
            try:
                self.workers.send(inputs, self.device)
                return super().execute(inputs)
            except BaseException as e:
                error = self.workers.explain(e)
                if error is e:
                    raise
                raise error from e

    def shutdown(self) -> None:
        self._finalizer()
        atexit.unregister(self._finalizer)


class _sigint_ignored:
    """Start child processes with SIGINT ignored (they inherit it through exec)."""

    def __enter__(self):
        self.old = None
        if threading.current_thread() is threading.main_thread() and signal.getsignal(signal.SIGINT) is not None:
            self.old = signal.signal(signal.SIGINT, signal.SIG_IGN)

    def __exit__(self, *exc):
        if self.old is not None:
            signal.signal(signal.SIGINT, self.old)


class _SigintHeld:
    """Hold a Ctrl-C until the block ends (the ranks must finish the step together), then
    deliver it. A second Ctrl-C raises at once, giving up the engine."""

    def __enter__(self):
        self.pending = False
        self.old = None
        if threading.current_thread() is threading.main_thread():
            old = signal.getsignal(signal.SIGINT)
            if callable(old):             # leave SIG_IGN / SIG_DFL / non-Python handlers alone
                self.old = signal.signal(signal.SIGINT, self._handler)

    def _handler(self, signum, frame):
        if self.pending:
            raise KeyboardInterrupt
        self.pending = True
        os.write(2, b"nanovllm: Ctrl-C received, stopping after the current step (again to abort)\n")

    def __exit__(self, *exc):
        if self.old is not None:
            signal.signal(signal.SIGINT, self.old)
            if self.pending:
                signal.raise_signal(signal.SIGINT)
