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

import torch

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


class StepGraphs:
    def __init__(self, runner):
        config = runner.config
        self.model, self.block_size = runner.model, runner.block_size
        device = runner.device
        self.max_seqs = config.max_num_seqs
        self.max_decode = min(config.max_num_seqs, 512)
        # The varlen kernel is graph-safe (its grid is fixed by the counts); other backends' are not known to be.
        mixed_ok = runner.backend.name == "triton"
        self.max_tokens = config.max_num_batched_tokens if mixed_ok else self.max_decode
        max_blocks = -(-config.max_model_len // self.block_size)

        def buffer(size, fill=0, dtype=torch.int64, width=None):
            shape = (size,) if width is None else (size, width)
            return torch.full(shape, fill, dtype=dtype, device=device)
        self.input_ids = buffer(self.max_tokens)
        self.positions = buffer(self.max_tokens)
        self.slot_mapping = buffer(self.max_tokens, -1)
        self.seq_lens = buffer(self.max_seqs, 1, torch.int32)
        self.block_tables = buffer(self.max_seqs, 0, torch.int32, max_blocks)
        self.decode_cu = torch.arange(self.max_decode + 1, dtype=torch.int32, device=device)
        self.mixed_cu = buffer(self.max_seqs + 1, 0, torch.int32)

        spec = config.speculative_config
        verify_rows = (spec.num_speculative_tokens + 1,) if spec is not None else ()
        self.decode = {bs: None for bs in decode_buckets(self.max_decode, verify_rows)}
        self.mixed = {t: None for t in token_buckets(self.max_tokens)} if mixed_ok else {}
        self.outputs: dict[tuple[str, int], torch.Tensor] = {}
        self.pool = None
        # Largest first, so the smaller graphs fit in the memory pool the largest reserved.
        for size in sorted(self.mixed, reverse=True):
            self.mixed[size] = self._capture(("mixed", size), size, self._mixed_meta(size))
        for size in sorted(self.decode, reverse=True):
            self.decode[size] = self._capture(("decode", size), size, self._decode_meta(size))
        if device.type == "cuda":
            torch.cuda.synchronize()

    @property
    def num_graphs(self) -> int:
        return len(self.decode) + len(self.mixed)

    def _capture(self, key, num_tokens: int, meta: AttentionMetadata) -> torch.cuda.CUDAGraph:
        ids, positions = self.input_ids[:num_tokens], self.positions[:num_tokens]
        with torch.inference_mode():
            self.model(ids, positions, meta)           # warm-up (autotuning, lazy init)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self.pool):
                self.outputs[key] = self.model(ids, positions, meta)
        self.pool = self.pool or graph.pool()
        return graph

    def _decode_meta(self, bs: int) -> AttentionMetadata:
        return AttentionMetadata(slot_mapping=self.slot_mapping[:bs], cu_seqlens_q=self.decode_cu[:bs + 1],
                                 seq_lens=self.seq_lens[:bs], block_tables=self.block_tables[:bs],
                                 max_seqlen_q=1, max_seqlen_k=self.block_tables.shape[1] * self.block_size,
                                 is_decode=True)

    def _mixed_meta(self, num_tokens: int) -> AttentionMetadata:
        return AttentionMetadata(slot_mapping=self.slot_mapping[:num_tokens], cu_seqlens_q=self.mixed_cu,
                                 seq_lens=self.seq_lens, block_tables=self.block_tables,
                                 max_seqlen_q=num_tokens, max_seqlen_k=self.block_tables.shape[1] * self.block_size,
                                 is_decode=False)

    def fits(self, inputs) -> bool:
        num_tokens, meta = inputs.input_ids.shape[0], inputs.meta
        if meta.block_tables.shape[1] > self.block_tables.shape[1]:
            return False
        if meta.is_decode:
            return num_tokens <= self.max_decode
        return bool(self.mixed) and num_tokens <= self.max_tokens and meta.seq_lens.shape[0] <= self.max_seqs

    def replay(self, inputs) -> torch.Tensor:
        """Copy the step's inputs into the buffers, replay, return hidden states [T, H]."""
        n, meta = inputs.input_ids.shape[0], inputs.meta
        num_seqs, width = meta.seq_lens.shape[0], meta.block_tables.shape[1]
        family = self.decode if meta.is_decode else self.mixed
        size = next(s for s in family if s >= n)
        self.input_ids[:n] = inputs.input_ids
        self.positions[:n] = inputs.positions
        self.slot_mapping[:n] = meta.slot_mapping
        self.slot_mapping[n:size] = -1
        self.seq_lens[:num_seqs] = meta.seq_lens
        self.block_tables[:num_seqs, :width] = meta.block_tables
        if meta.is_decode:
            self.seq_lens[num_seqs:size] = 1
        else:
            self.seq_lens[num_seqs:] = 0                 # padding sequences: no query tokens
            self.mixed_cu[:num_seqs + 1] = meta.cu_seqlens_q
            self.mixed_cu[num_seqs + 1:] = n
        family[size].replay()
        return self.outputs[("decode" if meta.is_decode else "mixed", size)][:n]

    def release(self) -> None:
        """Free the graphs now. Tensor parallelism needs this before destroying the process
        group: NCCL cannot destroy a communicator that a live graph has captured (it waits
        forever; pytorch/pytorch#115388)."""
        torch.cuda.synchronize()
        for graph in [*self.decode.values(), *self.mixed.values()]:
            graph.reset()
        self.decode.clear()
        self.mixed.clear()
        self.outputs.clear()
