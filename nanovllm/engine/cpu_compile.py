"""Compiled decode steps on the CPU: what CUDA graphs are on a GPU (engine/cuda_graphs.py).

An eager decode step of a small model is hundreds of tiny torch ops, each paying Python and
dispatcher overhead; for one user's decode on a CPU that costs more than the arithmetic.
`torch.compile` (Inductor's CPU backend) traces the whole forward pass once and fuses its
element-wise ops into generated C++ loops. Shapes are dynamic, so a few compiled graphs (decode
or not, one sequence or several) serve every step.

What the compiler must not see is the write into the KV cache: traced, it would copy the whole
cache to keep the graph functional. So each layer's store is an opaque custom op. In a decode
step the same op gathers each sequence's cached keys and values (its block table's blocks), and
the attention over them is traced with the rest; a step with prompt tokens runs the torch
reference's attention inside its op. Inductor caches what it compiled on disk (TORCHINDUCTOR_CACHE_DIR,
under nanovllm's cache directory), so later runs start faster. docs/cpu.md has the figures.
"""
import dataclasses
import os

import torch

from nanovllm.kernels.reference import paged_attention_reference, store_kv_cache_reference


# The cache write is not declared (mutates_args=()): declared, torch.compile would copy the
# whole cache at every call. The op returns what the attention reads, so nothing that reads the
# cache can be ordered before the write.
@torch.library.custom_op("nanovllm::store_and_gather", mutates_args=())
def store_and_gather(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                     slot_mapping: torch.Tensor, block_tables: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Store the new keys/values, then return every sequence's cached ones: [batch, blocks * block_size, H, D]."""
    store_kv_cache_reference(k, v, k_cache, v_cache, slot_mapping)
    blocks = block_tables.long()
    return k_cache[blocks].flatten(1, 2), v_cache[blocks].flatten(1, 2)


@store_and_gather.register_fake
def _(k, v, k_cache, v_cache, slot_mapping, block_tables):
    shape = (block_tables.shape[0], block_tables.shape[1] * k_cache.shape[1], *k_cache.shape[2:])
    return k_cache.new_empty(shape), v_cache.new_empty(shape)


@torch.library.custom_op("nanovllm::store_and_attend", mutates_args=())
def store_and_attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                     slot_mapping: torch.Tensor, cu_seqlens_q: torch.Tensor, seq_lens: torch.Tensor,
                     block_tables: torch.Tensor, scale: float, window: int | None) -> torch.Tensor:
    store_kv_cache_reference(k, v, k_cache, v_cache, slot_mapping)
    return paged_attention_reference(q, k_cache, v_cache, cu_seqlens_q, seq_lens, block_tables, scale, window=window)


@store_and_attend.register_fake
def _(q, *args):
    return torch.empty_like(q)


def attend_gathered(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, seq_lens: torch.Tensor, scale: float,
                    window: int | None) -> torch.Tensor:
    """Decode attention of q [batch, Hq, D] over each sequence's gathered keys/values
    [batch, L, Hkv, D], of which the first seq_lens[b] are its own (the rest masked)."""
    batch, num_heads, head_dim = q.shape
    num_kv_heads = k.shape[2]
    grouped = q.view(batch, num_kv_heads, num_heads // num_kv_heads, head_dim).float()   # GQA: heads by KV head
    scores = torch.matmul(grouped, k.permute(0, 2, 3, 1).float()) * scale                # [batch, Hkv, group, L]
    key_pos = torch.arange(k.shape[1], device=q.device)[None, :]
    hidden = key_pos >= seq_lens[:, None]
    if window is not None:
        hidden |= key_pos < seq_lens[:, None] - window
    probs = scores.masked_fill(hidden[:, None, None, :], float("-inf")).softmax(-1)
    return torch.matmul(probs, v.transpose(1, 2).float()).reshape(batch, num_heads, head_dim).to(q.dtype)


class CompilableTorchBackend:
    """The torch backend as the compiler sees it: the stores, with what reads the cache, in opaque ops."""
    name = "torch"

    def store(self, k, v, k_cache, v_cache, meta):
        self.pending = (k, v)          # stored by attend, in the same op

    def attend(self, q, k_cache, v_cache, meta, scale, window=None):
        (k, v), self.pending = self.pending, None
        if meta.is_decode:
            keys, values = torch.ops.nanovllm.store_and_gather(k, v, k_cache, v_cache, meta.slot_mapping,
                                                               meta.block_tables)
            return attend_gathered(q, keys, values, meta.seq_lens, scale, window)
        return torch.ops.nanovllm.store_and_attend(q, k, v, k_cache, v_cache, meta.slot_mapping, meta.cu_seqlens_q,
                                                   meta.seq_lens, meta.block_tables, scale, window)


class CompiledSteps:
    """The same `fits` / `replay` seam as StepGraphs, for the CPU: every step runs compiled."""

    def __init__(self, runner, cache_dir: str):
        os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", os.path.join(cache_dir, "inductor"))
        backend = CompilableTorchBackend()
        for layer in runner.attention_layers:
            layer.backend = backend
        # Without it, a dimension that happens to equal another at the first call (a block table
        # of 3 blocks, 3 KV heads) is tied to it, and the next step recompiles.
        torch.fx.experimental._config.use_duck_shape = False
        self.forward = torch.compile(runner.model.forward, dynamic=True)

    def fits(self, inputs) -> bool:
        return True

    def replay(self, inputs) -> torch.Tensor:
        # Host ints that change every step would each trigger a recompile: the compiled code
        # never reads them (the custom ops take the tensors), so they are held constant.
        meta = dataclasses.replace(inputs.meta, max_seqlen_q=0, max_seqlen_k=0)
        return self.forward(inputs.input_ids, inputs.positions, meta)
