"""Compiled decode on the CPU: what CUDA graphs are on a GPU (engine/cuda_graphs.py).

An eager decode step of a small model is hundreds of tiny torch ops, each paying Python and
dispatcher overhead, which can outweigh the arithmetic for one user's decode on a CPU. `torch.compile` (Inductor's CPU backend) traces the model once, fuses
the element-wise ops into generated C++ loops and calls oneDNN for the matmuls. The token
count is a dynamic dimension, so one compiled graph (and one specialised for a single token)
serves every step, decodes and prompt chunks alike. The KV store and the paged attention stay
opaque custom ops: their work depends on the cache's contents, and they run the torch
reference as in eager mode.

Inductor caches what it compiled on disk (TORCHINDUCTOR_CACHE_DIR, set under nanovllm's cache
directory), so the compile is paid on the first run only. It is opt-in (NANOVLLM_CPU_COMPILE=1):
on the demo model the time went to the matmuls, not to per-op overhead, and compiling did not
pay for itself (docs/cpu.md has the figures).
"""
import dataclasses
import os

import torch

from nanovllm.kernels.reference import paged_attention_reference, paged_decode_attention_reference, \
    store_kv_cache_reference
from nanovllm.layers.attention import TorchBackend


# One opaque op per layer and step: store the new keys/values, then attend. It writes the cache
# without declaring it (mutates_args=()): declared, torch.compile would copy the whole cache at
# every call to keep the graph functional. Nothing else in the graph reads the cache, so the
# undeclared write cannot be reordered against a reader.
@torch.library.custom_op("nanovllm::paged_attention", mutates_args=())
def paged_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                    slot_mapping: torch.Tensor, cu_seqlens_q: torch.Tensor, seq_lens: torch.Tensor,
                    block_tables: torch.Tensor, is_decode: bool, scale: float, window: int | None) -> torch.Tensor:
    store_kv_cache_reference(k, v, k_cache, v_cache, slot_mapping)
    if is_decode:
        return paged_decode_attention_reference(q, k_cache, v_cache, seq_lens, block_tables, scale, window=window)
    return paged_attention_reference(q, k_cache, v_cache, cu_seqlens_q, seq_lens, block_tables, scale, window=window)


@paged_attention.register_fake
def _(q, *args):
    return torch.empty_like(q)


class OpaqueTorchBackend(TorchBackend):
    """The torch reference as one custom op that torch.compile calls without tracing into it."""

    def store(self, k, v, k_cache, v_cache, meta):
        self.pending = (k, v)          # stored by attend, in the same op

    def attend(self, q, k_cache, v_cache, meta, scale, window=None):
        (k, v), self.pending = self.pending, None
        return torch.ops.nanovllm.paged_attention(q, k, v, k_cache, v_cache, meta.slot_mapping, meta.cu_seqlens_q,
                                                  meta.seq_lens, meta.block_tables, meta.is_decode, scale, window)


class CompiledSteps:
    """The same `fits` / `replay` seam as StepGraphs, for the CPU: every step runs compiled."""

    def __init__(self, runner, cache_dir: str):
        os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", os.path.join(cache_dir, "inductor"))
        backend = OpaqueTorchBackend()
        for layer in runner.attention_layers:
            layer.backend = backend
        # Regional compilation: the decoder layers share their code, so compiling each one in
        # place compiles that code once (twice: the first layer has no residual yet) and every
        # layer reuses it with its own weights. Compiling the whole model took minutes.
        for block in decoder_layers(runner.model):
            block.compile(dynamic=True)
        # Variants: the first layer (no residual yet), decode or not, one token or many, ...
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
        self.model = runner.model

    def fits(self, inputs) -> bool:
        return True

    def replay(self, inputs) -> torch.Tensor:
        # Host ints that change every step would each trigger a recompile: the compiled code
        # never reads them (the custom ops take the tensors), so they are held constant.
        meta = dataclasses.replace(inputs.meta, max_seqlen_q=0, max_seqlen_k=0)
        return self.model(inputs.input_ids, inputs.positions, meta)


def decoder_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The entries of the model's list of decoder layers (the ModuleList whose entries hold attention)."""
    from nanovllm.layers.attention import Attention
    for module in model.modules():
        if isinstance(module, torch.nn.ModuleList) and module and all(
                any(isinstance(m, Attention) for m in entry.modules()) for entry in module):
            return list(module)
    return []
