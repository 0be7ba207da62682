"""EngineConfig's checks: every bad engine argument is a ValueError that names it (vLLM's way),
raised before anything is loaded where the value alone shows it, else as soon as the model's
config is read. The arguments that take one of a few values, or a number in a range, are
checked from the tables below."""
import numbers

import torch

DTYPES = {"float32": torch.float32, "float": torch.float32, "float16": torch.float16,
          "half": torch.float16, "bfloat16": torch.bfloat16}
# KV cache dtypes (vLLM's names): "auto" is the model's dtype; the fp8 ones store float8 e4m3.
KV_CACHE_DTYPES = ("auto", "fp8", "fp8_e4m3")
CHOICES = {
    "dtype": ("auto", *DTYPES),
    "load_format": ("auto", "dummy"),
    "device": ("auto", "cuda", "cpu"),
    "attention_backend": ("auto", "triton", "flash_attn", "torch"),
    "kv_cache_dtype": KV_CACHE_DTYPES,
    "distributed_executor_backend": (None, "mp", "ray"),   # how data-parallel replicas run
}


def _is_int(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_real(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _positive_int(value) -> bool:
    return _is_int(value) and value >= 1


# What each argument accepts, and how to say it.
RANGES = {
    "gpu_memory_utilization": (lambda v: _is_real(v) and 0 < v <= 1, "a number in (0, 1]"),
    "seed": (lambda v: _is_int(v) and -2**63 <= v < 2**64, "an integer in [-2**63, 2**64)"),  # torch.manual_seed's
    "block_size": (lambda v: _is_int(v) and 1 <= v <= 256 and v & (v - 1) == 0, "a power of two from 1 to 256"),
    **{name: (lambda v: isinstance(v, bool), "a bool (True or False)") for name in
       ("calculate_kv_scales", "enforce_eager", "trust_remote_code", "disable_log_stats")},
    # vLLM's default for these is None: on
    **{name: (lambda v: v is None or isinstance(v, bool), "a bool or None") for name in
       ("enable_prefix_caching", "enable_chunked_prefill")},
    **{name: (_positive_int, "a positive integer") for name in
       ("tensor_parallel_size", "data_parallel_size", "max_num_seqs")},
    **{name: (lambda v: v is None or _positive_int(v), "a positive integer or None") for name in
       ("max_model_len", "max_num_batched_tokens", "num_gpu_blocks_override")},
}


class UnknownArgumentError(TypeError, ValueError):
    """An argument `LLM` does not know. A TypeError as in vLLM (an unexpected keyword),
    and a ValueError as every other bad argument here."""


def check_known_arguments(kwargs: dict, known: set[str]) -> None:
    unknown = sorted(set(kwargs) - known)
    if unknown:
        raise UnknownArgumentError(
            f"Unknown argument(s) to LLM: {', '.join(unknown)}. Supported: {', '.join(sorted(known))}.")


def check_arguments(config) -> None:
    """What the arguments' values alone show (before the checkpoint is read)."""
    if config.seed is None:                   # as vLLM V1: no seed is seed 0
        config.seed = 0
    if isinstance(config.dtype, torch.dtype):  # vLLM takes a torch dtype too: by its name here
        config.dtype = next((name for name, dtype in DTYPES.items() if dtype == config.dtype), config.dtype)
    for name, choices in CHOICES.items():
        if getattr(config, name) not in choices:
            raise ValueError(f"{name} must be one of {list(choices)}, got {getattr(config, name)!r}.")
    for name, (accepts, what) in RANGES.items():
        if not accepts(getattr(config, name)):
            raise ValueError(f"{name} must be {what}, got {getattr(config, name)!r}.")
    for name in ("enable_prefix_caching", "enable_chunked_prefill"):
        if getattr(config, name) is None:
            setattr(config, name, True)
    from nanovllm.engine.kv_cache_memory import cpu_kv_cache_gib
    cpu_kv_cache_gib()                        # a bad NANOVLLM_CPU_KVCACHE_GIB fails now, not after loading
    if config.tokenizer_mode != "auto":
        raise ValueError(f"tokenizer_mode={config.tokenizer_mode!r} is not supported by nanovllm (only 'auto').")
    from nanovllm.quantization import SUPPORTED_QUANTIZATION
    if config.quantization not in (None, *SUPPORTED_QUANTIZATION):
        raise ValueError(f"quantization={config.quantization!r} is not supported. Supported: "
                         f"{', '.join(SUPPORTED_QUANTIZATION)} (or None: the checkpoint's own format).")


def check_against_model(config) -> None:
    """What needs the model's config: lengths, the step's token budget, the architecture, and
    how tensor parallelism splits the heads."""
    from nanovllm.config import model_max_len
    limit = model_max_len(config.hf_config)
    if config.max_model_len > limit:
        raise ValueError(f"max_model_len={config.max_model_len} is larger than the model's maximum "
                         f"context length ({limit}, max_position_embeddings in its config).")
    if not config.enable_chunked_prefill and config.max_num_batched_tokens < config.max_model_len:
        raise ValueError(f"max_num_batched_tokens ({config.max_num_batched_tokens}) is smaller than "
                         f"max_model_len ({config.max_model_len}): with enable_chunked_prefill=False a "
                         f"whole prompt must fit in one step.")
    if config.max_num_batched_tokens < config.max_num_seqs:
        raise ValueError(f"max_num_batched_tokens ({config.max_num_batched_tokens}) must be at least "
                         f"max_num_seqs ({config.max_num_seqs}): every running sequence needs a token per step.")
    from nanovllm.models.registry import model_class
    model_class(config.hf_config, config.max_model_len)      # an unsupported architecture fails here, early
    cfg, tp = config.hf_config, config.tensor_parallel_size
    heads = cfg.num_attention_heads
    kv_heads = getattr(cfg, "num_key_value_heads", None) or heads
    if heads % tp:
        raise ValueError(f"tensor_parallel_size={tp} does not divide the model's {heads} attention heads.")
    if kv_heads % tp and tp % kv_heads:
        raise ValueError(f"tensor_parallel_size={tp} and the model's {kv_heads} KV heads must divide "
                         f"one another (KV heads are split, or replicated when fewer than ranks).")
    if config.device == "cuda" and tp > torch.cuda.device_count():
        raise ValueError(f"tensor_parallel_size={tp} is larger than the number of GPUs "
                         f"({torch.cuda.device_count()}).")
