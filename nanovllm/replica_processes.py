"""Data-parallel replicas as local processes (`distributed_executor_backend="mp"`, the default):
one spawned process per replica, spoken to over a pipe in the rounds data_parallel.py describes.
On a GPU machine each gets its own tensor_parallel_size GPUs (CUDA_VISIBLE_DEVICES, set before
it starts); on a CPU, cores / N threads."""
import logging
import multiprocessing
import multiprocessing.connection
import multiprocessing.util
import os
import signal
import time

from nanovllm.config import EngineConfig
from nanovllm.data_parallel import Replica, ReplicaLost, ReplicaWorker, Round
from nanovllm.engine.ctrl_c import sigint_ignored
from nanovllm.entrypoints.engine_process import sendable

logger = logging.getLogger(__name__)


def start_process_replicas(model: str, engine_kwargs: dict, config: EngineConfig) -> list[Replica]:
    """One process per replica: on a GPU machine each gets its own tensor_parallel_size GPUs,
    on the CPU each gets cores / N threads (N engines each running every core would contend)."""
    n, tp = config.data_parallel_size, config.tensor_parallel_size
    gpus, threads = [None] * n, None
    if config.device == "cuda":
        visible = _visible_gpus()
        if n * tp > len(visible):
            raise ValueError(f"data_parallel_size={n} with tensor_parallel_size={tp} needs {n * tp} GPUs; "
                             f"this machine has {len(visible)}.")
        gpus = [",".join(visible[rank * tp:(rank + 1) * tp]) for rank in range(n)]
    else:
        threads = max(1, available_cores() // n)
    replicas = []
    try:
        for rank in range(n):
            kwargs = dict(engine_kwargs, device=config.device, seed=config.seed + rank)
            replicas.append(ProcessReplica(rank, model, kwargs, threads, gpus[rank]))
        for replica in replicas:            # they load at the same time
            replica.wait_ready()
    except BaseException:
        for replica in replicas:
            replica.shutdown()
        raise
    return replicas


def available_cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def _visible_gpus() -> list[str]:
    import torch
    listed = os.environ.get("CUDA_VISIBLE_DEVICES")
    if listed is not None:
        return [d.strip() for d in listed.split(",") if d.strip()][:torch.cuda.device_count()]
    return [str(i) for i in range(torch.cuda.device_count())]


class ProcessReplica(Replica):
    """A replica in a local process, spoken to over a pipe: (adds, aborts) in, a Round out;
    None asks it to leave."""

    def __init__(self, rank: int, model: str, engine_kwargs: dict, cpu_threads: int | None, gpus: str | None):
        super().__init__(rank)
        ctx = multiprocessing.get_context("spawn")      # CUDA cannot be used in a forked child
        self.conn, theirs = ctx.Pipe()
        # Not a daemon: with tensor parallelism it starts processes of its own. It leaves when
        # the pipe closes, so it does not outlive this process.
        self.proc = ctx.Process(target=_replica_main, name=f"nanovllm-replica-{rank}",
                                args=(theirs, model, engine_kwargs, cpu_threads))
        # Its GPUs are set in its environment from the start, before anything there can touch CUDA.
        with sigint_ignored(), _environment("CUDA_VISIBLE_DEVICES", gpus):
            self.proc.start()
        theirs.close()
        # Runs at shutdown(), or at interpreter exit before multiprocessing joins its children
        # (which would wait for this one forever).
        self._stop = multiprocessing.util.Finalize(self, _stop_replica, args=(self.proc, self.conn),
                                                   exitpriority=10)

    def wait_ready(self) -> None:
        try:
            kind, payload = self.conn.recv()
        except EOFError:
            raise RuntimeError(
                f"data-parallel replica {self.rank} exited while starting ({self._how_it_ended()}); its error is "
                f"printed above. If it failed importing your script: replicas are spawned and import the main "
                f"module, so build the LLM under `if __name__ == \"__main__\":`") from None
        if kind == "failed":
            raise payload
        self.pid = payload

    def _send(self, adds: list, aborts: list[str], seconds: float) -> None:
        try:
            self.conn.send((adds, aborts, seconds))
        except OSError:
            raise ReplicaLost(self._how_it_ended()) from None

    def receive(self) -> Round:
        try:
            return self.conn.recv()
        except (EOFError, OSError):
            raise ReplicaLost(self._how_it_ended()) from None

    @staticmethod
    def wait(replicas: list["ProcessReplica"]) -> list["ProcessReplica"]:
        ready = multiprocessing.connection.wait([r.conn for r in replicas])   # a dead one reads as EOF
        return [r for r in replicas if r.conn in ready]

    def shutdown(self) -> None:
        self._stop()

    def _how_it_ended(self) -> str:
        self.proc.join(timeout=5)
        code = self.proc.exitcode
        return f"killed by signal {-code}" if code is not None and code < 0 else f"exit code {code}"


class _environment:
    """Set one environment variable for the block (None: leave it as it is)."""

    def __init__(self, name: str, value: str | None):
        self.name, self.value = name, value

    def __enter__(self):
        self.old = os.environ.get(self.name)
        if self.value is not None:
            os.environ[self.name] = self.value

    def __exit__(self, *exc):
        if self.value is None:
            return
        if self.old is None:
            os.environ.pop(self.name, None)
        else:
            os.environ[self.name] = self.old


def _replica_main(conn, model: str, engine_kwargs: dict, cpu_threads: int | None) -> None:
    """A replica process's life: load the engine, then answer rounds until None or EOF."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)    # Ctrl-C is the driver's to handle
    try:
        worker = ReplicaWorker(model, engine_kwargs, cpu_threads)
    except BaseException as e:
        conn.send(("failed", sendable(e)))
        return
    try:
        conn.send(("ready", os.getpid()))
        while (command := conn.recv()) is not None:
            conn.send(worker.run(*command))
    except (EOFError, OSError):
        pass                                        # the driver is gone
    finally:
        worker.shutdown()


def _stop_replica(proc, conn, grace_s: float = 30.0) -> None:
    """Ask a replica process to leave (it shuts its engine down), reading any round still in
    flight so that its answer cannot block it; then make sure it has left."""
    try:
        conn.send(None)
    except OSError:
        pass
    deadline = time.monotonic() + grace_s
    while proc.is_alive() and time.monotonic() < deadline:
        try:
            if conn.poll(0.1):
                conn.recv()
        except (EOFError, OSError):
            proc.join(timeout=max(0.0, deadline - time.monotonic()))
    if proc.exitcode is None:
        logger.warning("%s did not stop in %.0f s; terminating it", proc.name, grace_s)
        proc.terminate()
        proc.join(timeout=5)
    if proc.exitcode is None:
        proc.kill()
        proc.join()
    conn.close()
