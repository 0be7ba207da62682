"""The engine's configuration: one dataclass, validated in one place.

Argument names and defaults follow vLLM's `LLM(...)` / `EngineArgs` where they apply.
"""
import numbers
from dataclasses import dataclass, field, fields

import torch

_DTYPES = {"float32": torch.float32, "float": torch.float32, "float16": torch.float16,
           "half": torch.float16, "bfloat16": torch.bfloat16}
LOAD_FORMATS = ("auto", "dummy")
DEVICES = ("auto", "cuda", "cpu")
ATTENTION_BACKENDS = ("auto", "triton", "flash_attn", "torch")
# How data-parallel replicas run (nanovllm/data_parallel.py): local processes, or Ray actors.
EXECUTOR_BACKENDS = (None, "mp", "ray")
# KV cache dtypes (vLLM's names): "auto" is the model's dtype; the fp8 ones store float8 e4m3.
KV_CACHE_DTYPES = ("auto", "fp8", "fp8_e4m3")
# The arguments that take one of a few values, and those values.
CHOICES = {"dtype": ("auto", *_DTYPES), "load_format": LOAD_FORMATS, "device": DEVICES,
           "attention_backend": ATTENTION_BACKENDS, "kv_cache_dtype": KV_CACHE_DTYPES,
           "distributed_executor_backend": EXECUTOR_BACKENDS}


def _positive_int(value) -> bool:
    return _is_int(value) and value >= 1


# The arguments that take a number in a range (or a bool): what they accept, and how to say it.
RANGES = {
    "gpu_memory_utilization": (lambda v: _is_real(v) and 0 < v <= 1, "a number in (0, 1]"),
    "seed": (lambda v: _is_int(v) and -2**63 <= v < 2**64, "an integer in [-2**63, 2**64)"),  # torch.manual_seed's
    "block_size": (lambda v: _is_int(v) and 1 <= v <= 256 and v & (v - 1) == 0, "a power of two from 1 to 256"),
    "calculate_kv_scales": (lambda v: isinstance(v, bool), "a bool"),
    **{name: (_positive_int, "a positive integer") for name in
       ("tensor_parallel_size", "data_parallel_size", "max_num_seqs")},
    **{name: (lambda v: v is None or _positive_int(v), "a positive integer or None") for name in
       ("max_model_len", "max_num_batched_tokens", "num_gpu_blocks_override")},
}


class UnknownArgumentError(TypeError, ValueError):
    """An argument `LLM` does not know. A TypeError as in vLLM (an unexpected keyword),
    and a ValueError as every other bad argument here."""


@dataclass
class EngineConfig:
    model: str
    tokenizer: str | None = None
    dtype: str = "auto"
    seed: int = 0
    tensor_parallel_size: int = 1
    data_parallel_size: int = 1                     # engine replicas (nanovllm/data_parallel.py)
    distributed_executor_backend: str | None = None  # where replicas run: "mp" (default) or "ray"
    gpu_memory_utilization: float = 0.9
    max_model_len: int | None = None
    max_num_seqs: int = 256
    max_num_batched_tokens: int | None = None
    block_size: int = 16
    enable_prefix_caching: bool = True
    num_gpu_blocks_override: int | None = None
    enforce_eager: bool = False
    load_format: str = "auto"
    device: str = "auto"
    attention_backend: str = "auto"
    gguf_file: str | None = None
    revision: str | None = None
    trust_remote_code: bool = False
    enable_chunked_prefill: bool = True
    # Accepted so that vLLM scripts run unchanged; only the values nanovllm implements are allowed.
    tokenizer_mode: str = "auto"
    kv_cache_dtype: str = "auto"              # "fp8" / "fp8_e4m3": K and V stored as float8 e4m3
    calculate_kv_scales: bool = False         # fp8 KV cache: scales from the first batch (else 1.0)
    quantization: str | None = None           # None: the checkpoint's own (GPTQ, AWQ, FP8, GGUF); "fp8"
    disable_log_stats: bool = True
    swap_space: float = 4
    # Speculative decoding (vLLM's dict; nanovllm/spec_decode/): parsed into a SpeculativeConfig.
    speculative_config: dict | None = None
    # Filled in by __post_init__ from the checkpoint:
    hf_config: object = field(default=None, repr=False)
    model_dir: str = field(default="", repr=False)
    torch_dtype: torch.dtype = field(default=torch.float32, repr=False)
    quant_config: object = field(default=None, repr=False)     # nanovllm.quantization.QuantConfig or None

    @classmethod
    def from_kwargs(cls, model: str, **kwargs) -> "EngineConfig":
        known = {f.name for f in fields(cls) if f.name not in ("hf_config", "model_dir", "torch_dtype", "quant_config")}
        unknown = sorted(set(kwargs) - known)
        if unknown:
            raise UnknownArgumentError(
                f"Unknown argument(s) to LLM: {', '.join(unknown)}. Supported: {', '.join(sorted(known))}.")
        return cls(model=model, **kwargs)

    def __post_init__(self):
        self._check_ranges()
        self.device = resolve_device(self.device)
        from nanovllm.models.model_dir import resolve_model_dir
        # GGUF's Q4_0/Q4_1/Q8_0 linears stay quantized on a GPU (the W4A16 kernel reads them). On a
        # CPU, 4-bit ones do too (torch's int4 kernel, a quarter of bfloat16's bytes: docs/cpu.md);
        # 8-bit ones have no CPU kernel and are widened unless asked.
        keep_gguf = (4, 8) if self.device == "cuda" or self.quantization == "gguf" else (4,)
        self.model_dir = resolve_model_dir(self.model, self.gguf_file, self.revision, keep_gguf_bits=keep_gguf)
        self.hf_config = load_hf_config(self.model_dir, self.trust_remote_code)
        self.torch_dtype = resolve_dtype(self.dtype, self.hf_config, self.device)
        self._check_against_model()

    def _check_ranges(self):
        if self.seed is None:                   # as vLLM V1: no seed is seed 0
            self.seed = 0
        for name, choices in CHOICES.items():
            if getattr(self, name) not in choices:
                raise ValueError(f"{name} must be one of {list(choices)}, got {getattr(self, name)!r}.")
        for name, (accepts, what) in RANGES.items():
            if not accepts(getattr(self, name)):
                raise ValueError(f"{name} must be {what}, got {getattr(self, name)!r}.")
        from nanovllm.engine.kv_cache_memory import cpu_kv_cache_gib
        cpu_kv_cache_gib()                      # a bad NANOVLLM_CPU_KVCACHE_GIB fails now, not after loading
        if self.tokenizer_mode != "auto":
            raise ValueError(f"tokenizer_mode={self.tokenizer_mode!r} is not supported by nanovllm (only 'auto').")
        from nanovllm.quantization import SUPPORTED_QUANTIZATION
        if self.quantization not in (None, *SUPPORTED_QUANTIZATION):
            raise ValueError(f"quantization={self.quantization!r} is not supported. Supported: "
                             f"{', '.join(SUPPORTED_QUANTIZATION)} (or None: the checkpoint's own format).")

    def _check_against_model(self):
        cfg = self.hf_config
        limit = getattr(cfg, "max_position_embeddings", None) or 2048
        if self.max_model_len is None:
            self.max_model_len = limit
        elif self.max_model_len > limit:
            raise ValueError(f"max_model_len={self.max_model_len} is larger than the model's maximum "
                             f"context length ({limit}, max_position_embeddings in its config).")
        if self.max_num_batched_tokens is None:
            self.max_num_batched_tokens = default_max_num_batched_tokens(self.device, self.max_num_seqs)
            if not self.enable_chunked_prefill:      # every prompt must then fit one step
                self.max_num_batched_tokens = max(self.max_num_batched_tokens, self.max_model_len)
        if not self.enable_chunked_prefill and self.max_num_batched_tokens < self.max_model_len:
            raise ValueError(f"max_num_batched_tokens ({self.max_num_batched_tokens}) is smaller than "
                             f"max_model_len ({self.max_model_len}): with enable_chunked_prefill=False a "
                             f"whole prompt must fit in one step.")
        if self.max_num_batched_tokens < self.max_num_seqs:
            raise ValueError(f"max_num_batched_tokens ({self.max_num_batched_tokens}) must be at least "
                             f"max_num_seqs ({self.max_num_seqs}): every running sequence needs a token per step.")
        from nanovllm.models.registry import model_class
        model_class(cfg, self.max_model_len)      # an unsupported architecture fails here, early
        from nanovllm.quantization.quant_config import engine_quant_config
        self.quant_config = engine_quant_config(self)
        if self.speculative_config is not None:
            from nanovllm.spec_decode.config import SpeculativeConfig
            self.speculative_config = SpeculativeConfig.for_engine(self)
        heads, kv_heads = cfg.num_attention_heads, getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
        tp = self.tensor_parallel_size
        if heads % tp:
            raise ValueError(f"tensor_parallel_size={tp} does not divide the model's "
                             f"{heads} attention heads.")
        if kv_heads % tp and tp % kv_heads:
            raise ValueError(f"tensor_parallel_size={tp} and the model's {kv_heads} KV heads must divide "
                             f"one another (KV heads are split, or replicated when fewer than ranks).")
        if self.device == "cuda" and tp > torch.cuda.device_count():
            raise ValueError(f"tensor_parallel_size={tp} is larger than the number of GPUs "
                             f"({torch.cuda.device_count()}).")


def _is_int(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_real(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def default_max_num_batched_tokens(device: str, max_num_seqs: int, server: bool = False) -> int:
    """vLLM's defaults: the LLM class computes up to 16384 tokens a step on a CUDA GPU of at
    least 70 GiB other than an A100, else 8192; its OpenAI server 8192, else 2048. Never fewer
    than max_num_seqs: every running sequence needs its token in a decode step."""
    large = (device == "cuda" and torch.cuda.get_device_properties(0).total_memory >= 70 * 2**30
             and "A100" not in torch.cuda.get_device_name(0))
    budget = (8192 if large else 2048) if server else (16384 if large else 8192)
    return max(budget, max_num_seqs)


def resolve_device(device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("device='cuda' was asked for but torch sees no CUDA GPU; use device='cpu' or 'auto'.")
    return device


def load_hf_config(model_dir: str, trust_remote_code: bool = False):
    from transformers import AutoConfig
    return AutoConfig.from_pretrained(model_dir, trust_remote_code=trust_remote_code)


def resolve_dtype(dtype: str, hf_config, device: str) -> torch.dtype:
    """"auto" is the checkpoint's dtype (`dtype` in transformers 5, `torch_dtype` in 4.x); on a
    CPU, what cpu_dtype.py picks for it."""
    if dtype != "auto":
        return _DTYPES[dtype]
    saved = getattr(hf_config, "dtype", None) or getattr(hf_config, "torch_dtype", None) or "float32"
    if isinstance(saved, str):
        saved = _DTYPES.get(saved, torch.float32)
    if device == "cpu":
        from nanovllm.cpu_dtype import cpu_auto_dtype
        return cpu_auto_dtype(saved, hf_config)
    return saved
