"""CUDA graphs: launch a whole forward pass with one call.

A step of a small model is hundreds of small kernel launches, and launching them from Python
costs more than running them (~15-25 ms of host time for a 28-layer model, whatever the
batch). So forward passes are captured once into CUDA graphs that read their inputs from
fixed buffers; a step copies its inputs into the buffers and replays the graph that fits.

Two families share the buffers and one memory pool:
- decode: B sequences of one token each (the split-KV decode kernel), per batch-size bucket
  (a verifying step of few sequences runs as one-token rows too: engine/inputs.py);
- mixed: any spans (decodes, prompt chunks, both) of up to `max_num_seqs` sequences, per
  token-count bucket (the varlen kernel, whose grid depends only on the token and sequence
  counts, so one graph serves every mix of that size).
Padding tokens store nothing (slot -1); padding sequences have no query tokens (decode
padding rows attend over one token of block 0). Only the hidden states are captured: the LM
head runs on the rows that need logits, outside the graph.
"""
import logging
import os
import time

import numpy as np
import torch

from nanovllm.engine.inputs import HostInputs, ModelInputs
from nanovllm.layers.attention import AttentionMetadata

logger = logging.getLogger(__name__)


def step_graphs(runner):
    """What replays the runner's steps: CUDA graphs on a GPU (unless enforce_eager), compiled
    steps on a CPU where asked (NANOVLLM_CPU_COMPILE=1: measured on the demo model, the
    compile did not pay for itself, docs/cpu.md), else None (eager)."""
    config = runner.config
    if config.enforce_eager:
        return None
    if config.device == "cpu":
        if os.environ.get("NANOVLLM_CPU_COMPILE") != "1":
            return None
        from nanovllm.engine.cpu_compile import CompiledSteps
        from nanovllm.gguf import cache_root
        return CompiledSteps(runner, cache_root())
    start = time.perf_counter()
    graphs = StepGraphs(runner)
    logger.info("captured %d CUDA graphs (%d decode batch sizes, %d mixed-step token counts) in %.1f s",
                graphs.num_graphs, len(graphs.decode), len(graphs.mixed), time.perf_counter() - start)
    return graphs


def decode_buckets(max_batch_size: int, extra: tuple[int, ...] = ()) -> list[int]:
    """1, 2, 4, 8, then every 16 up to max_batch_size; and `extra` sizes (speculation's verifying
    step of one sequence, k + 1 rows, so that it pads to none)."""
    small = [b for b in (1, 2, 4, 8, *extra) if b < max_batch_size]
    return sorted({*small, *range(16, max_batch_size, 16), max_batch_size})


def token_buckets(max_tokens: int) -> list[int]:
    """Powers of two and the halves between them (at most 1.5x padding), up to max_tokens."""
    sizes, size = [], 16
    while size < max_tokens:
        sizes += [size] if size < 128 else [size, size * 3 // 2]
        size *= 2
    return sorted({s for s in sizes if s < max_tokens} | {max_tokens})


def _aligned(nbytes: int) -> int:
    return -(-nbytes // 16) * 16


class GraphInputs:
    """One graph's input tensors, as views of the device block all graphs share: its fields
    end where the block tables begin (the tables, the largest part, are shared), so a step's
    inputs, padded to the graph's size, arrive in one copy of a contiguous range from a host
    mirror of the block. `tokens` rows of token inputs, `rows` of sequence inputs (a decode
    graph: one a token). Graphs' fields overlap in the block: a step writes all of its own."""
    FIELDS = (("input_ids", torch.int64), ("positions", torch.int64), ("slot_mapping", torch.int64),
              ("logits_indices", torch.int64), ("seq_lens", torch.int32), ("cu_seqlens_q", torch.int32))

    @classmethod
    def header_bytes(cls, tokens: int, rows: int) -> int:
        return sum(_aligned(dtype.itemsize * cls._length(name, tokens, rows)) for name, dtype in cls.FIELDS)

    @staticmethod
    def _length(name: str, tokens: int, rows: int) -> int:
        return {"seq_lens": rows, "cu_seqlens_q": rows + 1}.get(name, tokens)

    def __init__(self, tokens: int, rows: int, is_decode: bool, block: torch.Tensor, mirrors: list[torch.Tensor],
                 tables_offset: int, max_blocks: int, block_size: int):
        self.tokens, self.rows, self.max_blocks, self.is_decode = tokens, rows, max_blocks, is_decode
        self.start = tables_offset - self.header_bytes(tokens, rows)
        self.spans, offset = {}, self.start
        for name, dtype in self.FIELDS:
            length = self._length(name, tokens, rows)
            self.spans[name] = (offset, dtype.itemsize * length, dtype, (length,))
            offset += _aligned(dtype.itemsize * length)
        self.spans["block_tables"] = (tables_offset, 4 * rows * max_blocks, torch.int32, (rows, max_blocks))
        t = self.tensors = {name: self.view(block, name) for name in self.spans}
        # numpy views of the same fields in each host mirror, made once (a step fills one)
        self.mirrored = [{name: self.view(mirror, name).numpy() for name in self.spans} for mirror in mirrors]
        self.meta = AttentionMetadata(slot_mapping=t["slot_mapping"], cu_seqlens_q=t["cu_seqlens_q"],
                                      seq_lens=t["seq_lens"], block_tables=t["block_tables"],
                                      max_seqlen_q=1 if is_decode else tokens,
                                      max_seqlen_k=max_blocks * block_size, is_decode=is_decode)

    def reset(self) -> None:
        """Inputs a forward pass can run on (for the capture): padding everywhere."""
        t = self.tensors
        for name, value in (("input_ids", 0), ("positions", 0), ("slot_mapping", -1), ("seq_lens", 1)):
            t[name].fill_(value)
        t["cu_seqlens_q"].copy_(torch.arange(self.rows + 1) if self.is_decode else torch.zeros(self.rows + 1))

    def view(self, block: torch.Tensor, name: str) -> torch.Tensor:
        """Field `name` in a block of this layout (the device block, or its host mirror)."""
        offset, nbytes, dtype, shape = self.spans[name]
        return block[offset:offset + nbytes].view(dtype).view(shape)

    def write(self, mirror: int, host: HostInputs) -> tuple[int, int]:
        """Lay `host` out in host mirror number `mirror`, padded to the graph's size; -> the byte
        range to copy (up to the step's last block-table row)."""
        n, rows, f = len(host.input_ids), len(host.seq_lens), self.mirrored[mirror]
        for name, pad in (("input_ids", 0), ("positions", 0), ("slot_mapping", -1)):   # padding stores nothing
            f[name][:n], f[name][n:] = getattr(host, name), pad
        f["logits_indices"][:len(host.logits_indices)] = host.logits_indices
        f["seq_lens"][:rows] = host.seq_lens
        f["cu_seqlens_q"][:rows + 1] = host.cu_seqlens_q
        if self.is_decode:        # padding rows attend over one token of block 0
            f["seq_lens"][rows:] = 1
            f["cu_seqlens_q"][rows + 1:] = np.arange(rows + 1, self.rows + 1)
        else:                     # padding sequences have no query tokens
            f["seq_lens"][rows:] = 0
            f["cu_seqlens_q"][rows + 1:] = n
        width = host.block_tables.shape[1]
        f["block_tables"][:rows, :width] = host.block_tables
        f["block_tables"][:rows, width:] = 0
        return self.start, self.spans["block_tables"][0] + 4 * rows * self.max_blocks

    def inputs(self, host: HostInputs) -> ModelInputs:
        """The step's ModelInputs as views of the device block (unpadded, as HostInputs.to gives)."""
        n, rows, t = len(host.input_ids), len(host.seq_lens), self.tensors
        meta = AttentionMetadata(
            slot_mapping=t["slot_mapping"][:n], cu_seqlens_q=t["cu_seqlens_q"][:rows + 1],
            seq_lens=t["seq_lens"][:rows], block_tables=t["block_tables"][:rows],
            max_seqlen_q=host.max_seqlen_q, max_seqlen_k=int(host.seq_lens.max(initial=0)), is_decode=host.is_decode)
        return ModelInputs(t["input_ids"][:n], t["positions"][:n], meta,
                           t["logits_indices"][:len(host.logits_indices)], staged=True)


class StepGraphs:
    def __init__(self, runner):
        config = runner.config
        self.model = runner.model
        device = runner.device
        self.max_seqs = config.max_num_seqs
        self.max_decode = min(config.max_num_seqs, 512)
        # The varlen kernel is graph-safe (its grid is fixed by the counts); other backends' are not known to be.
        mixed_ok = runner.backend.name == "triton"
        self.max_tokens = config.max_num_batched_tokens if mixed_ok else self.max_decode
        self.max_blocks = -(-config.max_model_len // runner.block_size)

        spec = config.speculative_config
        verify_rows = (spec.num_speculative_tokens + 1,) if spec is not None else ()
        decode_sizes = decode_buckets(self.max_decode, verify_rows)
        mixed_sizes = token_buckets(self.max_tokens) if mixed_ok else []
        tables_offset = _aligned(max([GraphInputs.header_bytes(b, b) for b in decode_sizes] +
                                     [GraphInputs.header_bytes(t, self.max_seqs) for t in mixed_sizes]))
        nbytes = tables_offset + 4 * max(self.max_seqs, self.max_decode) * self.max_blocks
        block = torch.zeros(nbytes, dtype=torch.uint8, device=device)
        self.staging = HostStaging(block)
        layout = (block, self.staging.mirrors, tables_offset, self.max_blocks, runner.block_size)
        self.decode = {b: GraphInputs(b, b, True, *layout) for b in decode_sizes}
        self.mixed = {t: GraphInputs(t, self.max_seqs, False, *layout) for t in mixed_sizes}
        self.arange = torch.arange(max(decode_sizes) + 1, dtype=torch.int32, device=device)
        self.graphs, self.outputs = {}, {}
        self.pool = None
        # Largest first, so the smaller graphs fit in the memory pool the largest reserved.
        for family in (self.mixed, self.decode):
            for size in sorted(family, reverse=True):
                family[size].reset()              # (the graphs' fields overlap)
                self.graphs[id(family[size])] = self._capture(family[size])
        if device.type == "cuda":
            torch.cuda.synchronize()

    @property
    def num_graphs(self) -> int:
        return len(self.graphs)

    def _capture(self, inputs: GraphInputs) -> torch.cuda.CUDAGraph:
        ids, positions = inputs.tensors["input_ids"], inputs.tensors["positions"]
        with torch.inference_mode():
            self.model(ids, positions, inputs.meta)           # warm-up (autotuning, lazy init)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self.pool):
                self.outputs[id(inputs)] = self.model(ids, positions, inputs.meta)
        self.pool = self.pool or graph.pool()
        return graph

    def _graph_for(self, num_tokens: int, num_seqs: int, width: int, is_decode: bool) -> GraphInputs | None:
        if width > self.max_blocks or (is_decode and num_tokens > self.max_decode) or \
                (not is_decode and (num_tokens > self.max_tokens or num_seqs > self.max_seqs)):
            return None
        family = self.decode if is_decode else self.mixed
        return next((family[s] for s in family if s >= num_tokens), None)

    def fits(self, inputs: ModelInputs) -> bool:
        meta = inputs.meta
        return self._graph_for(inputs.input_ids.shape[0], meta.seq_lens.shape[0], meta.block_tables.shape[1],
                               meta.is_decode) is not None

    def stage(self, host: HostInputs) -> ModelInputs | None:
        """Put a step's inputs straight into the buffers of the graph that will run it, in one
        copy (seven small copies to the device and as many into the buffers cost ~0.3 ms of
        host time a step: in series with the GPU where a step waits for its result). None if
        no graph fits the step."""
        graph = self._graph_for(len(host.input_ids), len(host.seq_lens), host.block_tables.shape[1], host.is_decode)
        if graph is None:
            return None
        mirror = self.staging.next()
        self.staging.copy(*graph.write(mirror, host))
        return graph.inputs(host)

    def replay(self, inputs: ModelInputs) -> torch.Tensor:
        """Replay the graph that fits, its inputs copied into its buffers unless `stage` put them
        there; -> hidden states [T, H]."""
        n, meta = inputs.input_ids.shape[0], inputs.meta
        graph = self._graph_for(n, meta.seq_lens.shape[0], meta.block_tables.shape[1], meta.is_decode)
        if not inputs.staged:     # (a tensor-parallel worker's inputs, broadcast by rank 0)
            self._copy_in(graph, inputs)
        self.graphs[id(graph)].replay()
        return self.outputs[id(graph)][:n]

    def _copy_in(self, graph: GraphInputs, inputs: ModelInputs) -> None:
        """What `stage` does, from inputs already on the device. Every field is written, padding
        included: the graphs' fields overlap in the block."""
        t, meta, n, rows = graph.tensors, inputs.meta, inputs.input_ids.shape[0], inputs.meta.seq_lens.shape[0]
        for name, values, pad in (("input_ids", inputs.input_ids, 0), ("positions", inputs.positions, 0),
                                  ("slot_mapping", meta.slot_mapping, -1),
                                  ("seq_lens", meta.seq_lens, 1 if meta.is_decode else 0)):
            t[name][:len(values)] = values
            t[name][len(values):] = pad
        if meta.is_decode:
            t["cu_seqlens_q"].copy_(self.arange[:graph.rows + 1])
        else:
            t["cu_seqlens_q"][:rows + 1] = meta.cu_seqlens_q
            t["cu_seqlens_q"][rows + 1:] = n
        t["block_tables"][:rows, :meta.block_tables.shape[1]] = meta.block_tables

    def release(self) -> None:
        """Free the graphs now. Tensor parallelism needs this before destroying the process
        group: NCCL cannot destroy a communicator that a live graph has captured (it waits
        forever; pytorch/pytorch#115388)."""
        torch.cuda.synchronize()
        for graph in self.graphs.values():
            graph.reset()
        self.graphs.clear()
        self.decode.clear()
        self.mixed.clear()
        self.outputs.clear()


class HostStaging:
    """Two host mirrors of the graphs' input block (pinned on a GPU), filled by steps in turn and
    copied to the device without waiting; a mirror is refilled only once its last copy is done."""

    def __init__(self, block: torch.Tensor):
        self.block = block
        pinned = block.device.type == "cuda"
        self.mirrors = [torch.zeros(block.numel(), dtype=torch.uint8, pin_memory=pinned) for _ in range(2)]
        self.copied = [None, None]          # CUDA events
        self.turn = 0

    def next(self) -> int:
        """The mirror to fill now."""
        self.turn ^= 1
        if self.copied[self.turn] is not None:
            self.copied[self.turn].synchronize()
        return self.turn

    def copy(self, start: int, end: int) -> None:
        """Bytes [start, end) of the mirror just filled to the device block."""
        self.block[start:end].copy_(self.mirrors[self.turn][start:end], non_blocking=True)
        if self.block.device.type == "cuda":
            self.copied[self.turn] = torch.cuda.Event()
            self.copied[self.turn].record()
