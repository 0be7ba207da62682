"""CUDA graphs for decode: launch a whole forward pass with one call.

A decode step of a small model is hundreds of small kernel launches, and launching them
from Python costs more than running them. So the decode forward is captured once per
batch-size bucket into a CUDA graph that reads its inputs from fixed buffers; a step
copies its inputs into the buffers of the smallest bucket that fits and replays it.
Padding rows store nothing (slot -1) and attend over one token of block 0.
"""
import torch

from nanovllm.layers.attention import AttentionMetadata


def batch_buckets(max_batch_size: int) -> list[int]:
    small = [b for b in (1, 2, 4, 8) if b < max_batch_size]
    return small + list(range(16, max_batch_size, 16)) + [max_batch_size]


class DecodeGraphs:
    def __init__(self, runner, max_batch_size: int):
        self.model = runner.model
        device = runner.device
        max_blocks = -(-runner.config.max_model_len // runner.block_size)
        self.block_size = runner.block_size
        self.max_batch_size = max_batch_size
        self.input_ids = torch.zeros(max_batch_size, dtype=torch.int64, device=device)
        self.positions = torch.zeros(max_batch_size, dtype=torch.int64, device=device)
        self.slot_mapping = torch.full((max_batch_size,), -1, dtype=torch.int64, device=device)
        self.seq_lens = torch.ones(max_batch_size, dtype=torch.int32, device=device)
        self.block_tables = torch.zeros(max_batch_size, max_blocks, dtype=torch.int32, device=device)
        self.cu_seqlens_q = torch.arange(max_batch_size + 1, dtype=torch.int32, device=device)
        self.buckets = batch_buckets(max_batch_size)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.outputs: dict[int, torch.Tensor] = {}
        pool = None
        # Largest first, so the smaller graphs fit in the memory pool the largest reserved.
        for bs in reversed(self.buckets):
            meta = self._meta(bs)
            with torch.inference_mode():
                self.model(self.input_ids[:bs], self.positions[:bs], meta)      # warm-up (autotuning, lazy init)
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=pool):
                    self.outputs[bs] = self.model(self.input_ids[:bs], self.positions[:bs], meta)
            pool = pool or graph.pool()
            self.graphs[bs] = graph
        torch.cuda.synchronize()

    def _meta(self, bs: int) -> AttentionMetadata:
        return AttentionMetadata(slot_mapping=self.slot_mapping[:bs], cu_seqlens_q=self.cu_seqlens_q[:bs + 1],
                                 seq_lens=self.seq_lens[:bs], block_tables=self.block_tables[:bs],
                                 max_seqlen_q=1, max_seqlen_k=self.block_tables.shape[1] * self.block_size,
                                 is_decode=True)

    def fits(self, inputs) -> bool:
        return bool(self.graphs) and inputs.input_ids.shape[0] <= self.max_batch_size \
            and inputs.meta.block_tables.shape[1] <= self.block_tables.shape[1]

    def replay(self, inputs) -> torch.Tensor:
        """Copy a decode batch of n sequences into the buffers, replay, return hidden states [n, H]."""
        n = inputs.input_ids.shape[0]
        bs = next(b for b in self.buckets if b >= n)
        meta = inputs.meta
        self.input_ids[:n] = inputs.input_ids
        self.positions[:n] = inputs.positions
        self.slot_mapping[:n] = meta.slot_mapping
        self.slot_mapping[n:bs] = -1
        self.seq_lens[:n] = meta.seq_lens
        self.seq_lens[n:bs] = 1
        width = meta.block_tables.shape[1]
        self.block_tables[:n, :width] = meta.block_tables
        self.graphs[bs].replay()
        return self.outputs[bs][:n]

    def release(self) -> None:
        """Free the graphs now. Tensor parallelism needs this before destroying the process
        group: NCCL cannot destroy a communicator that a live graph has captured (it waits
        forever; pytorch/pytorch#115388)."""
        torch.cuda.synchronize()
        for graph in self.graphs.values():
            graph.reset()
        self.graphs.clear()
        self.outputs.clear()
