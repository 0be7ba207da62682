"""The KV cache's memory: how many blocks it gets (on a GPU, what gpu_memory_utilization leaves
after the weights and a profiled peak of activations; on a CPU, what max_num_seqs sequences of
max_model_len tokens need, within a memory cap), and the tensor that holds them, one view per
layer: [2 (K, V), num_layers, num_blocks, block_size, num_kv_heads, head_dim].
"""
import ctypes
import gc
import logging
import math
import mmap
import os

import torch

from nanovllm.distributed import min_over_ranks
from nanovllm.engine.inputs import block_table_array, host_inputs
from nanovllm.layers.sampling_metadata import SamplingMetadata, SamplingRow
from nanovllm.quantization.kv_cache import attach_kv_scales, kv_cache_torch_dtype
from nanovllm.sampling_params import SamplingParams

logger = logging.getLogger(__name__)
# On a CPU the KV cache is sized to what max_num_seqs sequences of max_model_len tokens need,
# within half the memory available (its pages are only taken as they are written);
# NANOVLLM_CPU_KVCACHE_GIB caps it instead (as vLLM's VLLM_CPU_KVCACHE_SPACE).
CPU_KV_CACHE_SHARE_OF_AVAILABLE = 0.5
# Sampling with every filter on, so the profile run sees the sampler's largest temporaries.
PROFILE_PARAMS = SamplingParams(temperature=1.0, top_k=50, top_p=0.9)


def kv_cache_dtype(runner) -> torch.dtype:
    """The model's dtype, or float8 e4m3 with kv_cache_dtype="fp8" (half the bytes of a 16-bit one)."""
    return kv_cache_torch_dtype(runner.config.kv_cache_dtype, runner.dtype)


def block_bytes(runner) -> int:
    layer = runner.attention_layers[0]
    per_token = 2 * len(runner.attention_layers) * layer.num_kv_heads * layer.head_dim * kv_cache_dtype(runner).itemsize
    return per_token * runner.block_size


def allocate_kv_cache(runner) -> int:
    """Size the ModelRunner's KV cache, allocate it and give each attention layer its views;
    returns the number of blocks."""
    cfg = runner.config
    # A cache larger than every sequence at full length at once is never needed.
    useful = cfg.max_num_seqs * -(-cfg.max_model_len // runner.block_size)
    if cfg.num_gpu_blocks_override is not None:
        num_blocks = cfg.num_gpu_blocks_override
    elif cfg.device == "cuda":
        num_blocks = min(useful, _profile_num_blocks(runner))
    else:
        num_blocks = min(useful, cpu_kv_cache_bytes() // block_bytes(runner))
        one_sequence = -(-cfg.max_model_len // runner.block_size)
        if num_blocks < one_sequence:
            raise ValueError(
                f"The CPU KV cache may take {cpu_kv_cache_bytes() / 2**30:.2f} GiB (NANOVLLM_CPU_KVCACHE_GIB, "
                f"else half the available memory), less than one sequence of max_model_len="
                f"{cfg.max_model_len} tokens needs ({one_sequence * block_bytes(runner) / 2**30:.2f} GiB): "
                f"lower max_model_len or free memory.")
    num_blocks = min_over_ranks(num_blocks, runner.device)    # every rank must hold the same blocks
    if num_blocks < 1:
        raise ValueError("No memory is left for the KV cache: raise gpu_memory_utilization "
                         "or lower max_num_batched_tokens.")
    bind_kv_cache(runner, num_blocks)
    fp8 = kv_cache_dtype(runner) != runner.dtype     # say what the float8 cache bought
    logger.info("KV cache: %d blocks of %d tokens (%.2f GiB%s): %d tokens, %.1f full-length sequences",
                num_blocks, runner.block_size, num_blocks * block_bytes(runner) / 2**30,
                f", float8 e4m3: {runner.dtype.itemsize}x the tokens of {str(runner.dtype)[6:]}" if fp8 else "",
                num_blocks * runner.block_size, num_blocks * runner.block_size / cfg.max_model_len)
    return num_blocks


def bind_kv_cache(runner, num_blocks: int) -> None:
    layer = runner.attention_layers[0]
    shape = (2, len(runner.attention_layers), num_blocks, runner.block_size, layer.num_kv_heads, layer.head_dim)
    dtype = kv_cache_dtype(runner)
    if dtype != runner.dtype and runner.backend.name == "flash_attn":
        raise ValueError("kv_cache_dtype='fp8' is not supported with attention_backend='flash_attn'; "
                         "use the 'triton' (CUDA) or 'torch' backend.")
    if runner.device.type == "cpu":
        # An anonymous memory map reads as zeros and takes a page only when it is written, so
        # the memory used follows the tokens cached, not the cache's size. (Not np.zeros: numpy
        # asks for 2 MB huge pages on large arrays, and every layer's first write takes one.)
        nbytes = math.prod(shape) * dtype.itemsize
        runner.kv_cache = torch.frombuffer(mmap.mmap(-1, nbytes), dtype=torch.uint8).view(dtype).view(shape)
    else:
        runner.kv_cache = torch.zeros(shape, dtype=dtype, device=runner.device)
    for i, layer in enumerate(runner.attention_layers):
        layer.k_cache, layer.v_cache = runner.kv_cache[0, i], runner.kv_cache[1, i]
    attach_kv_scales(runner.attention_layers, dtype, runner.config.calculate_kv_scales, runner.device)


def _profile_num_blocks(runner) -> int:
    """Run the largest prefill the scheduler can produce on a scratch cache, and give the
    KV cache what `gpu_memory_utilization` leaves after weights and peak activations."""
    cfg = runner.config
    seq_len = min(cfg.max_model_len, cfg.max_num_batched_tokens)
    num_seqs = max(1, min(cfg.max_num_seqs, cfg.max_num_batched_tokens // seq_len))
    scratch_blocks = num_seqs * -(-seq_len // runner.block_size)
    gc.collect()                  # an engine dropped before this one may still hold memory in reference cycles
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    bind_kv_cache(runner, scratch_blocks)
    per_seq = scratch_blocks // num_seqs           # each sequence gets consecutive blocks
    inputs = host_inputs(
        input_ids=[0] * (seq_len * num_seqs), positions=list(range(seq_len)) * num_seqs,
        slots=[s * per_seq * runner.block_size + p for s in range(num_seqs) for p in range(seq_len)],
        cu_q=[i * seq_len for i in range(num_seqs + 1)], seq_lens=[seq_len] * num_seqs,
        tables=block_table_array([list(range(s * per_seq, (s + 1) * per_seq)) for s in range(num_seqs)]),
        max_q=seq_len, is_decode=False, logits_indices=[(i + 1) * seq_len - 1 for i in range(num_seqs)],
        ).to(runner.device)
    logits = runner.execute(inputs)
    if logits is not None:                          # only rank 0 samples
        runner.sampler(logits.float(), SamplingMetadata.build(
            [SamplingRow(PROFILE_PARAMS, [], [])] * num_seqs, runner.vocab_size, runner.device))
    torch.cuda.synchronize()
    # Measured while the scratch cache and the weights are still allocated: what is left
    # above them at the peak is the activations' (and the sampler's) share.
    peak_activations = torch.cuda.max_memory_allocated() - torch.cuda.memory_allocated()
    del runner.kv_cache, logits
    for layer in runner.attention_layers:
        layer.k_cache = layer.v_cache = torch.empty(0)
    torch.cuda.empty_cache()
    free, total = torch.cuda.mem_get_info()
    budget = total * cfg.gpu_memory_utilization - (total - free) - peak_activations
    logger.info("memory: %.1f GiB in use after loading, %.2f GiB peak activations",
                (total - free) / 2**30, peak_activations / 2**30)
    return int(budget // block_bytes(runner))


def map_large_buffers() -> None:
    """Have glibc map buffers of 1 MB and more on their own, and give them back when freed. By
    default it raises that threshold after the first such buffer is freed; loading's transients
    (a few MB per layer) then come from the heap, which keeps their pages: on the demo model,
    100-300 MB more resident memory, differing from run to run."""
    try:
        ctypes.CDLL("libc.so.6").mallopt(-3, 1 << 20)     # M_MMAP_THRESHOLD
    except (OSError, AttributeError):                     # not glibc (macOS, musl): nothing to do
        pass


def cpu_kv_cache_bytes() -> int:
    """The most the CPU KV cache may take: NANOVLLM_CPU_KVCACHE_GIB, else half the available memory."""
    gib = cpu_kv_cache_gib()
    return int(gib * 2**30) if gib is not None else int(available_memory_bytes() * CPU_KV_CACHE_SHARE_OF_AVAILABLE)


def available_memory_bytes() -> int:
    """MemAvailable on Linux; elsewhere total physical memory, as os.sysconf tells it."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def cpu_kv_cache_gib() -> float | None:
    """The CPU KV cache's cap in GiB: NANOVLLM_CPU_KVCACHE_GIB where set (and not empty), else None."""
    text = os.environ.get("NANOVLLM_CPU_KVCACHE_GIB", "").strip()
    if not text:
        return None
    try:
        gib = float(text)
    except ValueError:
        gib = math.nan
    if not (math.isfinite(gib) and gib > 0):
        raise ValueError(f"NANOVLLM_CPU_KVCACHE_GIB must be a positive number of GiB (the KV cache's size "
                         f"on a CPU; unset: sized to need, within half the available memory), got {text!r}.")
    return gib
