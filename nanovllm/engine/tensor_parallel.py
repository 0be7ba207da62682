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

This file holds the runner and the step's packing (both halves: rank 0's send, the
workers' `_serve` loop). The worker processes themselves (starting, watching for deaths,
shutdown, Ctrl-C handling, TensorParallelError) are in nanovllm/engine/tp_workers.py.
"""
import atexit
import copy
import dataclasses
import logging
import pickle
import time
import weakref

import torch
import torch.distributed as dist

from nanovllm.config import EngineConfig
from nanovllm.engine.inputs import ModelInputs
from nanovllm.engine.model_runner import ModelRunner
from nanovllm.engine.ctrl_c import SigintHeld
from nanovllm.engine.tp_workers import STOP, TensorParallelError, Workers, init_process_group

logger = logging.getLogger(__name__)

_ALIGN = 16          # payload offsets are aligned so every slice can be viewed as any dtype


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
    skeleton = packer.strip(dataclasses.replace(inputs, staged=False))     # a worker copies into its own graphs' buffers
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

def _serve(runner: ModelRunner, conn) -> None:
    """A worker's step loop, the other half of TensorParallelRunner.execute: the header
    from the pipe, the payload from the broadcast, then the same forward pass as rank 0."""
    while True:
        header = conn.recv_bytes()                      # EOFError when rank 0 is gone
        if header == STOP:
            return
        skeleton, size = pickle.loads(header)
        payload = torch.empty(size, dtype=torch.uint8, device=runner.device)
        if size:
            dist.broadcast(payload, src=0)
        runner.execute(unpack_inputs(skeleton, payload))


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
        self.workers = Workers(config, _serve)
        # Shut the workers down when this runner is collected, or at interpreter exit, before
        # multiprocessing's own exit hook would terminate them (atexit runs handlers last-in first-out).
        self._finalizer = weakref.finalize(self, self.workers.shutdown)
        atexit.register(self._finalizer)
        start = time.perf_counter()
        try:
            self.workers.wait_for("hello")
            init_process_group(config, 0, self.workers.store)
            self.workers.process_group = True
            super().__init__(config)
            self.workers.graphs = self.graphs   # a graph holds no reference to this runner
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

    def wait_ready(self, ready) -> None:
        """Wait for a step's results, raising instead of hanging if a worker dies."""
        try:
            if ready.event is not None:
                self.workers.wait(ready.event)
            ready.synchronize()
        except BaseException as e:     # e.g. a CUDA error after the watchdog aborted NCCL
            error = self.workers.explain(e, out_of_step=False)
            if error is e:
                raise
            raise error from e
        self.workers.check()      # after an NCCL abort the step returned garbage: do not use it

    def execute(self, inputs: ModelInputs) -> torch.Tensor | None:
        if not self._driving:
            return super().execute(inputs)
        self.workers.check()
        with SigintHeld():
            try:
                self.workers.send(*pack_inputs(inputs, self.device))
                return super().execute(inputs)
            except BaseException as e:
                error = self.workers.explain(e)
                if error is e:
                    raise
                raise error from e

    def shutdown(self) -> None:
        self._finalizer()
        atexit.unregister(self._finalizer)
