"""CUDA graphs: launch a whole forward pass with one call.

A step of a small model is hundreds of small kernel launches, and launching them from Python
costs more than running them (~15-25 ms of host time for a 28-layer model, whatever the
batch). So forward passes are captured once into CUDA graphs that read their inputs from
fixed buffers; a step's inputs reach the buffers in one copy (engine/graph_inputs.py) and
the graph that fits is replayed.

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

import torch

from nanovllm.engine.graph_inputs import GraphInputs, HostStaging, aligned
from nanovllm.engine.inputs import HostInputs, ModelInputs
from nanovllm.layers.attention_backends import fresh_spans

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
        # Steps with long fresh prompts run eagerly, for cuDNN's attention (attention_backends.py),
        # where it takes them: a 16-bit cache and model.
        self.fresh_eager = mixed_ok and config.kv_cache_dtype == "auto" and runner.dtype != torch.float32
        self.max_blocks = -(-config.max_model_len // runner.block_size)

        spec = config.speculative_config
        verify_rows = (spec.num_speculative_tokens + 1,) if spec is not None else ()
        decode_sizes = decode_buckets(self.max_decode, verify_rows)
        mixed_sizes = token_buckets(self.max_tokens) if mixed_ok else []
        tables_offset = aligned(max([GraphInputs.header_bytes(b, b) for b in decode_sizes] +
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
        return not (self.fresh_eager and meta.fresh_spans) and self._graph_for(
            inputs.input_ids.shape[0], meta.seq_lens.shape[0], meta.block_tables.shape[1], meta.is_decode) is not None

    def stage(self, host: HostInputs) -> ModelInputs | None:
        """Put a step's inputs straight into the buffers of the graph that will run it, in one
        copy; None if no graph fits the step. (Seven small copies to the device and as many into
        the buffers took 0.15-0.18 ms of a verifying step's host time on an H100, this 0.09-0.10:
        such a step's host work is in series with its GPU time, docs/benchmarks.md.)"""
        graph = self._graph_for(len(host.input_ids), len(host.seq_lens), host.block_tables.shape[1], host.is_decode)
        if graph is None or (self.fresh_eager and fresh_spans(host)):
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
