"""The attention backends other than the torch reference (layers/attention.py), and the choice
among them: the project's Triton kernels (the default on CUDA) and flash-attn when installed.
Each stores a step's keys and values and attends over the paged cache, as TorchBackend does
(layers/attention.py; the CPU's batched form of it: layers/cpu_attention.py).
"""
import logging
import warnings

import numpy as np
import torch

from nanovllm.layers.attention import AttentionMetadata
from nanovllm.layers.cpu_attention import BatchedTorchBackend

logger = logging.getLogger(__name__)

# A prompt with no cached context and at least FRESH_MIN_TOKENS new tokens in a step is one of the
# step's fresh spans, if they add up to FRESH_MIN_STEP_TOKENS: the step then runs eagerly (not from
# a CUDA graph) and TritonBackend attends them with cuDNN's dense kernel, faster than ours on long
# prompts. Below those sizes cuDNN's calls save less than an eager step's launches cost the host,
# which would stall the decodes that share the step (docs/benchmarks.md, sixteenth session).
FRESH_MIN_TOKENS = 2048
FRESH_MIN_STEP_TOKENS = 8192


def fresh_spans(host) -> tuple:
    """AttentionMetadata.fresh_spans of a step, from its HostInputs (engine/inputs.py)."""
    if host.is_decode:          # (every decode step asks, through StepGraphs.stage)
        return ()
    counts = np.diff(host.cu_seqlens_q)
    fresh = np.flatnonzero((host.seq_lens == counts) & (counts >= FRESH_MIN_TOKENS))
    if counts[fresh].sum() < FRESH_MIN_STEP_TOKENS:
        return ()
    return tuple((int(i), int(host.cu_seqlens_q[i]), int(host.cu_seqlens_q[i + 1])) for i in fresh)


class TritonBackend:
    """The project's own Triton kernels: varlen paged prefill and split-KV paged decode. A step's
    long prompts with no cached context (`meta.fresh_spans`) go to cuDNN's dense attention instead,
    from the step's own keys and values: on long prompts it is faster than our kernel."""
    name = "triton"

    def __init__(self):
        from nanovllm import kernels
        self.k = kernels
        self.fresh_kv = None        # the step's new keys and values, while it has fresh spans
        self.dense_ok = {}          # (dtype, heads, KV heads, head dim) -> cuDNN takes these shapes

    def store(self, k, v, k_cache, v_cache, meta: AttentionMetadata, **kv_scales):
        self.k.store_kv_cache(k, v, k_cache, v_cache, meta.slot_mapping, **kv_scales)
        self.fresh_kv = (k, v) if meta.fresh_spans and not kv_scales else None

    def attend(self, q, k_cache, v_cache, meta: AttentionMetadata, scale: float, window: int | None = None,
               **kv_scales):
        if meta.is_decode:
            return self.k.paged_decode_attention(q, k_cache, v_cache, meta.seq_lens, meta.block_tables, scale,
                                                 window=window, **kv_scales)
        new_kv, self.fresh_kv = self.fresh_kv, None
        if new_kv is None or window is not None or not self._dense_ok(q, *new_kv):
            return self.k.paged_prefill_attention(q, k_cache, v_cache, meta.cu_seqlens_q, meta.seq_lens,
                                                  meta.block_tables, meta.max_seqlen_q, scale, window=window,
                                                  **kv_scales)
        out = torch.empty_like(q, memory_format=torch.contiguous_format)
        done_seqs = done_tokens = 0         # sequences (tokens) before these are attended
        for seq, first, end in meta.fresh_spans + ((len(meta.seq_lens), len(q), len(q)),):
            if seq > done_seqs:             # the other sequences between two fresh ones: our kernel
                cu_seqlens_q = meta.cu_seqlens_q[done_seqs:seq + 1] - done_tokens
                self.k.paged_prefill_attention(
                    q[done_tokens:first], k_cache, v_cache, cu_seqlens_q, meta.seq_lens[done_seqs:seq],
                    meta.block_tables[done_seqs:seq], meta.max_seqlen_q, scale, out=out[done_tokens:first])
            if end > first:
                out[first:end] = causal_attention(q[first:end], new_kv[0][first:end], new_kv[1][first:end], scale)
            done_seqs, done_tokens = seq + 1, end
        return out

    def _dense_ok(self, q, k, v) -> bool:
        """Does cuDNN take attention of these shapes? (Tried once, on two tokens.)"""
        key = (q.dtype, q.shape[1], k.shape[1], q.shape[2])
        if key not in self.dense_ok:
            try:
                with warnings.catch_warnings():         # torch warns of each reason before it refuses
                    warnings.simplefilter("ignore")
                    causal_attention(q[:2], k[:2], v[:2], 1.0)
                self.dense_ok[key] = True
            except RuntimeError as e:
                logger.info("long fresh prompts stay on the Triton kernel: %s", str(e).splitlines()[0])
                self.dense_ok[key] = False
        return self.dense_ok[key]


def causal_attention(q, k, v, scale: float) -> torch.Tensor:
    """One sequence with no cached context: q [L, Hq, D] over its own k, v [L, Hkv, D], causal;
    through cuDNN's kernel on a GPU (torch's default pick there, FlashAttention-2, is slower than
    ours), torch's math kernel elsewhere (the interpreter's tests)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    with sdpa_kernel(SDPBackend.CUDNN_ATTENTION if q.is_cuda else SDPBackend.MATH):
        o = torch.nn.functional.scaled_dot_product_attention(
            q.transpose(0, 1).unsqueeze(0), k.transpose(0, 1).unsqueeze(0), v.transpose(0, 1).unsqueeze(0),
            is_causal=True, scale=scale, enable_gqa=True)
    return o[0].transpose(0, 1)


class FlashAttnBackend:
    """flash-attn's paged kernels, when the package is installed. Its paged KV cache needs
    blocks of a multiple of 256 tokens; stores go through our Triton kernel."""
    name = "flash_attn"

    def __init__(self):
        import flash_attn
        from nanovllm import kernels
        self.fa, self.store_kv_cache = flash_attn, kernels.store_kv_cache

    def store(self, k, v, k_cache, v_cache, meta: AttentionMetadata):
        self.store_kv_cache(k, v, k_cache, v_cache, meta.slot_mapping)

    def attend(self, q, k_cache, v_cache, meta: AttentionMetadata, scale: float, window: int | None = None):
        # flash-attn's window counts the keys left of the query's own: W - 1 of them
        sliding = {} if window is None else {"window_size": (window - 1, 0)}
        if meta.is_decode:
            return self.fa.flash_attn_with_kvcache(
                q.unsqueeze(1), k_cache, v_cache, cache_seqlens=meta.seq_lens, block_table=meta.block_tables,
                softmax_scale=scale, causal=True, **sliding).squeeze(1)
        cu_seqlens_k = torch.nn.functional.pad(meta.seq_lens.cumsum(0, dtype=torch.int32), (1, 0))
        # causal=True aligns the mask to the bottom right: query j of a sequence with a cached
        # prefix sees the prefix and the new tokens up to itself, as in our reference.
        return self.fa.flash_attn_varlen_func(
            q, k_cache, v_cache, cu_seqlens_q=meta.cu_seqlens_q, cu_seqlens_k=cu_seqlens_k,
            max_seqlen_q=meta.max_seqlen_q, max_seqlen_k=meta.max_seqlen_k, softmax_scale=scale,
            causal=True, block_table=meta.block_tables, **sliding)


def flash_attn_available() -> bool:
    try:
        import flash_attn  # noqa: F401
        return True
    except Exception:     # not installed, or built for another torch/CUDA
        return False


def select_backend(name: str, device: str, block_size: int):
    """"auto": flash-attn on CUDA when it is installed and the block size suits it, else the
    Triton kernels; the torch reference on the CPU."""
    if name == "auto":
        name = "torch"
        if device == "cuda":
            from nanovllm.kernels import triton_available
            if flash_attn_available() and block_size % 256 == 0:
                name = "flash_attn"
            elif triton_available():
                name = "triton"
    if name == "flash_attn":
        if not flash_attn_available():
            raise ValueError("attention_backend='flash_attn' but the flash_attn package cannot be imported.")
        if block_size % 256:
            raise ValueError(f"attention_backend='flash_attn' needs block_size to be a multiple of 256 "
                             f"(flash-attn's paged KV cache), got {block_size}.")
        backend = FlashAttnBackend()
    elif name == "triton":
        from nanovllm.kernels import triton_available, triton_interpreting
        if not triton_available() or (device != "cuda" and not triton_interpreting()):
            raise ValueError(f"attention_backend='triton' needs triton and a CUDA GPU (on a CPU, triton's "
                             f"interpreter: TRITON_INTERPRET=1); the device is {device!r}.")
        backend = TritonBackend()
    else:
        backend = BatchedTorchBackend()
    logger.info("attention backend: %s", backend.name)
    return backend
