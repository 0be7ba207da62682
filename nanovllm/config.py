"""The engine's configuration: one dataclass, filled in from the checkpoint and validated in
one place (its checks and their messages: config_checks.py).

Argument names and defaults follow vLLM's `LLM(...)` / `EngineArgs` where they apply.
"""
import os
from dataclasses import dataclass, field, fields

import torch

from nanovllm.config_checks import DTYPES, check_against_model, check_arguments, check_known_arguments
from nanovllm.cpu_dtype import auto_dtype


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
        check_known_arguments(kwargs, {f.name for f in fields(cls)} - {"hf_config", "model_dir", "torch_dtype",
                                                                        "quant_config"})
        return cls(model=model, **kwargs)

    def __post_init__(self):
        check_arguments(self)                   # types, ranges and choices (config_checks.py)
        self.device = resolve_device(self.device)
        from nanovllm.models.model_dir import resolve_model_dir
        # GGUF's Q4_0/Q4_1/Q8_0 linears stay quantized on a GPU (the W4A16 kernel reads them). On a
        # CPU, 4-bit ones do too (torch's int4 kernel, a quarter of bfloat16's bytes: docs/cpu.md);
        # 8-bit ones have no CPU kernel and are widened unless asked.
        keep_gguf = (4, 8) if self.device == "cuda" or self.quantization == "gguf" else (4,)
        self.model_dir = resolve_model_dir(self.model, self.gguf_file, self.revision, keep_gguf_bits=keep_gguf)
        self.hf_config = load_hf_config(self.model_dir, self.trust_remote_code)
        self.torch_dtype = resolve_dtype(self.dtype, self.hf_config, self.device)
        if self.max_model_len is None:
            self.max_model_len = model_max_len(self.hf_config)
        if self.max_num_batched_tokens is None:
            self.max_num_batched_tokens = default_max_num_batched_tokens(self.device, self.max_num_seqs)
            if not self.enable_chunked_prefill:      # every prompt must then fit one step
                self.max_num_batched_tokens = max(self.max_num_batched_tokens, self.max_model_len)
        check_against_model(self)               # lengths, step budget, architecture, tensor parallelism
        from nanovllm.quantization.quant_config import engine_quant_config
        self.quant_config = engine_quant_config(self)
        if self.speculative_config is not None:
            from nanovllm.spec_decode.config import SpeculativeConfig
            self.speculative_config = SpeculativeConfig.for_engine(self)


def model_max_len(hf_config) -> int:
    """The model's context length (max_position_embeddings; 2048 when a config has none)."""
    return getattr(hf_config, "max_position_embeddings", None) or 2048


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
    from nanovllm.quantization.quant_config import checkpoint_quantization_config
    if os.path.isfile(os.path.join(model_dir, "config.json")):
        checkpoint_quantization_config(model_dir)   # a malformed one fails here, named, not inside transformers
    return AutoConfig.from_pretrained(model_dir, trust_remote_code=trust_remote_code)


def resolve_dtype(dtype: str, hf_config, device: str) -> torch.dtype:
    """An explicit dtype as asked; "auto" from the checkpoint's (cpu_dtype.py)."""
    return auto_dtype(hf_config, device) if dtype == "auto" else DTYPES[dtype]
