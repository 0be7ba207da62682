"""Attention kernels: Triton implementations and their pure-torch references.

    store_kv_cache           write new K/V into the paged cache          (store_kv.py)
    paged_prefill_attention  varlen causal attention over the paged cache (prefill_attention.py)
    paged_decode_attention   one query token per sequence, split-KV       (decode_attention.py)
    gumbel_sample            one token per row from softmax(logits / T)  (gumbel_sample.py)
    greedy_sample            torch.argmax over rows, split over chunks    (gumbel_sample.py)
    sampling_thresholds      min-p / top-k / top-p cut-offs, no sorting  (sampling_filters.py)
    apply_penalties          repetition/frequency/presence, one pass     (penalties.py)
    logprobs_and_top_k       a row's logsumexp, a token's rank, the top k (logprobs.py)
    logsumexp_and_rank       the same without the top k                   (logprobs.py)
    rms_norm, add_rms_norm   RMSNorm, optionally after the residual add   (rms_norm.py)
    rms_norm_fp8, add_...    the same, quantized per row to float8        (rms_norm.py)
    rotary_                  RoPE on q and k in place, optional q/k norm  (rotary.py)
    silu_and_mul             the gated MLP's activation                  (silu_and_mul.py)
    silu_and_mul_fp8         the same, quantized per row to float8       (silu_and_mul.py)
    fused_moe                mixture-of-experts: two grouped GEMMs        (fused_moe.py)
    quantize_rows_fp8        float8 activations, one scale per row       (quantize_fp8.py)
    *_reference              the same in plain torch                      (reference.py)
    (the online-softmax step the two attention kernels share: online_softmax.py)

The Triton modules are imported lazily, on first use of one of their names, for two reasons:
importing `nanovllm.kernels` must work where triton is not installed (macOS, Windows), and
`@triton.jit` fixes interpreter-or-GPU mode when the module is imported, so on a machine
without CUDA, TRITON_INTERPRET=1 only has to be set before the first kernel is used (not
before `import nanovllm`). Check `triton_available()` before calling a Triton kernel.
Call these through the package (`kernels.rms_norm(...)`): importing rms_norm.py, silu_and_mul.py
or gumbel_sample.py directly sets the package's attribute of that name to the module, which then
hides the function.
"""
import importlib
import os

from .reference import gather_kv, paged_attention_reference, store_kv_cache_reference

_LAZY = {
    "store_kv_cache": ".store_kv",
    "paged_prefill_attention": ".prefill_attention",
    "paged_decode_attention": ".decode_attention",
    "gumbel_sample": ".gumbel_sample",
    "greedy_sample": ".gumbel_sample",
    "sampling_thresholds": ".sampling_filters",
    "apply_penalties": ".penalties",
    "logsumexp_and_rank": ".logprobs",
    "logprobs_and_top_k": ".logprobs",
    "rms_norm": ".rms_norm",
    "quantize_rows_fp8": ".quantize_fp8",
    "add_rms_norm": ".rms_norm",
    "rms_norm_fp8": ".rms_norm",
    "add_rms_norm_fp8": ".rms_norm",
    "rotary_": ".rotary",
    "silu_and_mul": ".silu_and_mul",
    "silu_and_mul_fp8": ".silu_and_mul",
}

__all__ = ["triton_available", *_LAZY, "store_kv_cache_reference", "paged_attention_reference",
           "gather_kv"]


def triton_available() -> bool:
    """True when triton imports and can run here: on a CUDA GPU, or in its CPU interpreter
    (TRITON_INTERPRET=1)."""
    try:
        import triton  # noqa: F401
    except Exception:   # not installed, or a broken install
        return False
    if triton_interpreting():
        return True
    import torch
    return torch.cuda.is_available()


def triton_interpreting() -> bool:
    """TRITON_INTERPRET is set: triton runs kernels on CPU tensors, in Python."""
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


def __getattr__(name: str):
    if name in _LAZY:
        module = importlib.import_module(_LAZY[name], __name__)
        # Bind every name the module provides: importing `.gumbel_sample` set this package's
        # attribute `gumbel_sample` to the module, which the function must replace.
        for lazy_name, module_name in _LAZY.items():
            if module_name == _LAZY[name]:
                globals()[lazy_name] = getattr(module, lazy_name)     # later look-ups skip this hook
        return globals()[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
