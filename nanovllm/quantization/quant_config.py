"""Which quantization a model runs with: from the checkpoint's `quantization_config` (GPTQ, AWQ,
FP8, a GGUF file kept quantized) or from `LLM(quantization="fp8")` on a 16-bit checkpoint.

Everything a checkpoint format says about its tensors is read here, once, into a `QuantConfig`;
the loaders (gptq.py, awq.py, gguf_format.py) and the linear methods read only that.
"""
import json
import os
from dataclasses import dataclass

import torch

# vLLM's names for the methods nanovllm runs.
SUPPORTED_QUANTIZATION = ("fp8", "gptq", "awq", "gguf")
# Checkpoint formats, by `quantization_config.quant_method`.
SUPPORTED_CHECKPOINT_FORMATS = ("gptq", "awq", "fp8", "gguf")


@dataclass(frozen=True)
class QuantConfig:
    method: str                 # one of SUPPORTED_QUANTIZATION
    bits: int = 4               # integer weights: 4 or 8 bits
    group_size: int = -1        # input features sharing one scale and zero; -1: all of them
    desc_act: bool = False      # GPTQ act-order: groups are given per input feature by g_idx
    zero_offset: int = 0        # added to a stored zero point (GPTQ's v1 format stores zero - 1)
    serialized: bool = True     # fp8: weights are float8 in the checkpoint (False: quantized at load)

    @property
    def integer_weights(self) -> bool:
        return self.method in ("gptq", "awq", "gguf")


def checkpoint_quantization_config(model_dir: str) -> dict | None:
    """A checkpoint directory's quantization_config: config.json's, else, from older exports, AutoGPTQ's
    quantize_config.json or AutoAWQ's quant_config.json beside it."""
    with open(os.path.join(model_dir, "config.json")) as f:
        raw = json.load(f).get("quantization_config")
    if raw is not None and not isinstance(raw, dict):
        raise ValueError(f"config.json's quantization_config must be a dict (quant_method, bits, ...), got {raw!r}")
    if raw:
        return raw
    for name, method in (("quantize_config.json", "gptq"), ("quant_config.json", "awq")):
        path = os.path.join(model_dir, name)
        if os.path.isfile(path):
            with open(path) as f:
                return {"quant_method": method, **json.load(f)}
    return None


def resolve_quant_config(quantization: str | None, raw: dict | None) -> QuantConfig | None:
    """The QuantConfig for LLM(quantization=...) and the checkpoint's quantization_config (`raw`),
    or None (16-bit). A checkpoint's own method is used with no argument; an argument must agree."""
    if quantization is not None and quantization not in SUPPORTED_QUANTIZATION:
        raise ValueError(f"quantization={quantization!r} is not supported. Supported: "
                         f"{', '.join(SUPPORTED_QUANTIZATION)} (or None: the checkpoint's own format).")
    checkpoint = parse_checkpoint_config(raw) if raw else None
    if checkpoint is None:
        if quantization in (None, "fp8"):
            return None if quantization is None else QuantConfig("fp8", bits=8, serialized=False)
        if quantization == "gguf":
            raise ValueError("quantization='gguf' keeps a GGUF file's linear weights quantized when they are all "
                             "Q4_0, Q4_1 or Q8_0 (of one width); this model is no such GGUF file (other GGUF "
                             "types are dequantized at load).")
        raise ValueError(f"quantization={quantization!r} needs a {quantization.upper()} checkpoint "
                         f"(a quantization_config in config.json); this one has none. On a 16-bit checkpoint "
                         f"only quantization='fp8' (weights quantized at load) is supported.")
    if quantization is not None and quantization != checkpoint.method:
        raise ValueError(f"quantization={quantization!r} does not match the checkpoint, which is quantized with "
                         f"{checkpoint.method!r} (its config.json's quantization_config); pass "
                         f"quantization={checkpoint.method!r} or None.")
    return checkpoint


def parse_checkpoint_config(raw) -> QuantConfig:
    """A checkpoint's `quantization_config` (a dict, or transformers' object of one) -> QuantConfig."""
    cfg = raw if isinstance(raw, dict) else raw.to_dict()
    method = str(cfg.get("quant_method", "")).lower()
    if method == "gptq":
        return _gptq(cfg)
    if method == "awq":
        return _awq(cfg)
    if method == "fp8":
        return _fp8(cfg)
    if method == "gguf":
        return QuantConfig("gguf", bits=_bits(cfg.get("bits"), "gguf"), group_size=int(cfg.get("group_size", 32)))
    raise ValueError(f"Checkpoint quantization {method or cfg!r} (quantization_config.quant_method in config.json) "
                     f"is not supported. Supported checkpoint formats: {', '.join(SUPPORTED_CHECKPOINT_FORMATS)}.")


def _bits(bits, method: str, allowed: tuple[int, ...] = (4, 8)) -> int:
    if type(bits) is not int or bits not in allowed:      # (4.0 == 4 and True == 1: both refused)
        raise ValueError(f"{method.upper()} checkpoints with bits={bits!r} are not supported "
                         f"(quantization_config.bits); supported: {', '.join(map(str, allowed))}.")
    return bits


def _group_size(group_size, method: str) -> int:
    if type(group_size) is not int or not (group_size == -1 or group_size > 0):
        raise ValueError(f"{method.upper()} quantization_config.group_size must be a positive integer or -1, "
                         f"got {group_size!r}.")
    return group_size


def _gptq(cfg: dict) -> QuantConfig:
    # AutoGPTQ's v1 format stores each zero point minus one; GPTQModel's v2 stores it as is.
    fmt = cfg.get("checkpoint_format", cfg.get("format", "gptq"))
    if fmt not in ("gptq", "gptq_v2"):
        raise ValueError(f"GPTQ checkpoint_format {fmt!r} is not supported; supported: 'gptq' (AutoGPTQ's v1 "
                         f"layout), 'gptq_v2'.")
    if cfg.get("lm_head"):
        raise ValueError("GPTQ checkpoints with a quantized LM head (quantization_config.lm_head=true) are not "
                         "supported; nanovllm keeps the decoder layers' linear weights quantized.")
    return QuantConfig("gptq", bits=_bits(cfg.get("bits"), "gptq"),
                       group_size=_group_size(cfg.get("group_size", -1), "gptq"),
                       desc_act=bool(cfg.get("desc_act", False)), zero_offset=1 if fmt == "gptq" else 0)


def _awq(cfg: dict) -> QuantConfig:
    version = str(cfg.get("version", "gemm")).lower()
    if version != "gemm":
        raise ValueError(f"AWQ version {version!r} is not supported (quantization_config.version); supported: 'gemm'.")
    if not cfg.get("zero_point", True):
        raise ValueError("AWQ checkpoints without zero points (zero_point=false) are not supported.")
    bits = cfg.get("bits", cfg.get("w_bit"))
    group_size = cfg.get("group_size", cfg.get("q_group_size", 128))
    return QuantConfig("awq", bits=_bits(bits, "awq", (4,)), group_size=_group_size(group_size, "awq"))


def _fp8(cfg: dict) -> QuantConfig:
    if cfg.get("weight_block_size"):
        raise ValueError(f"Block-wise FP8 checkpoints (quantization_config.weight_block_size="
                         f"{cfg['weight_block_size']}) are not supported; FP8 checkpoints with per-tensor or "
                         f"per-channel weight scales are.")
    scheme = cfg.get("activation_scheme", "dynamic")
    if scheme not in ("dynamic", "static"):
        raise ValueError(f"FP8 activation_scheme {scheme!r} is not supported; supported: 'dynamic', 'static' "
                         f"(activations are then scaled per token all the same).")
    return QuantConfig("fp8", bits=8)


def engine_quant_config(config) -> QuantConfig | None:
    """EngineConfig's weight format (its `quantization` and the checkpoint's own), refused where
    the GPU cannot run it: float8 weights or KV cache need compute capability 8.9 or newer."""
    quant_config = resolve_quant_config(config.quantization, checkpoint_quantization_config(config.model_dir))
    fp8 = [what for what, used in (
        ("quantization='fp8'", quant_config is not None and quant_config.method == "fp8"),
        (f"kv_cache_dtype={config.kv_cache_dtype!r}", config.kv_cache_dtype != "auto")) if used]
    if fp8 and config.device == "cuda" and torch.cuda.get_device_capability() < (8, 9):
        major, minor = torch.cuda.get_device_capability()
        raise ValueError(f"{' and '.join(fp8)} need a GPU with FP8 (compute capability 8.9 or newer: Ada, "
                         f"Hopper, Blackwell); this {torch.cuda.get_device_name()} is {major}.{minor}.")
    return quant_config
