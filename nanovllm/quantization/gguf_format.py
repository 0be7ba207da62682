"""GGUF's Q4_0, Q4_1 and Q8_0 weights as nanovllm's converted GGUF directories store them.

nanovllm/gguf.py writes each kept linear of a GGUF file straight in nanovllm's layout
(int_linear.py): `qweight`, `scales` and `mins`, groups of 32 (a GGUF block). A block's scale d
and min m map onto them exactly (w = q * d + m):

    Q4_0  w = d * (q - 8)        q in 0..15   scale d, min -8 d
    Q4_1  w = d * q + m          q in 0..15   scale d, min m
    Q8_0  w = d * q              q in -128..127, stored as q + 128 in 0..255: scale d, min -128 d
"""
import logging

import numpy as np
import torch

from nanovllm.quantization.packing import pack_int32
from nanovllm.quantization.quant_config import QuantConfig

logger = logging.getLogger(__name__)
TENSORS = ("qweight", "scales", "mins")
BLOCK = 32                                        # values per GGUF block
KEPT_TYPES = {"Q4_0": 4, "Q4_1": 4, "Q8_0": 8}    # the types kept quantized, and their bits
# llama.cpp's names of a block's linear weights (blk.N.<name>.weight)
GGUF_LINEARS = ("attn_q", "attn_k", "attn_v", "attn_qkv", "attn_output", "ffn_gate", "ffn_up", "ffn_down")


def to_nanovllm(kind: str, tensor: torch.Tensor, cfg: QuantConfig) -> torch.Tensor:
    if kind not in TENSORS:
        raise ValueError(f"nanovllm's GGUF format holds no {kind!r} tensor")
    return tensor


def from_blocks(type_name: str, raw: np.ndarray, rows: int, cols: int) -> dict[str, torch.Tensor]:
    """A GGUF tensor's raw blocks (uint8 [rows, bytes per row]) -> {qweight, scales, mins} for a weight
    of [rows, cols] (rows = output features)."""
    raw = np.ascontiguousarray(raw).reshape(rows, cols // BLOCK, -1)
    d = raw[..., :2].copy().view(np.float16)[..., 0].astype(np.float32)
    if type_name == "Q8_0":
        q = raw[..., 2:].view(np.int8).astype(np.int16) + 128
        mins = -128 * d
    elif type_name in ("Q4_0", "Q4_1"):
        if type_name == "Q4_1":
            mins = raw[..., 2:4].copy().view(np.float16)[..., 0].astype(np.float32)
            nibbles = raw[..., 4:]
        else:
            mins = -8 * d
            nibbles = raw[..., 2:]
        # byte j of a block holds value j in its low nibble and value j + 16 in its high one
        q = np.concatenate([nibbles & 0x0F, nibbles >> 4], axis=-1)
    else:
        raise ValueError(f"GGUF type {type_name} is not kept quantized; kept: {', '.join(KEPT_TYPES)}")
    q = torch.from_numpy(q.reshape(rows, cols).astype(np.int32))
    return {"qweight": pack_int32(q, KEPT_TYPES[type_name], dim=1),
            "scales": torch.from_numpy(d), "mins": torch.from_numpy(np.ascontiguousarray(mins))}


def _linear_tensors(reader) -> list:
    return [t for t in reader.tensors
            if t.name.startswith("blk.") and t.name.endswith(".weight") and t.name.split(".")[2] in GGUF_LINEARS]


def kept_bits(reader) -> int | None:
    """The bits a GGUF file's linear weights keep (4 or 8), or None when they cannot all be kept: a
    type other than Q4_0 / Q4_1 / Q8_0 among them, or both widths (one kernel serves one width)."""
    types = {t.tensor_type.name for t in _linear_tensors(reader)}
    if not types or not types <= set(KEPT_TYPES) or len({KEPT_TYPES[t] for t in types}) != 1:
        return None
    return KEPT_TYPES[types.pop()]


def keep_linears_quantized(gguf_path: str, hf_dir: str) -> None:
    """Rewrite the linear weights of `hf_dir` (gguf_path converted, every weight dequantized) as their
    GGUF blocks in nanovllm's layout, and record that in its config.json. Does nothing when the
    file's linears cannot all be kept (see kept_bits)."""
    import json
    import os

    from gguf import GGUFReader
    from safetensors.torch import load_file, save_file
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.modeling_gguf_pytorch_utils import TENSOR_PROCESSORS, TensorProcessor, \
        get_gguf_hf_weights_map

    reader = GGUFReader(gguf_path)
    bits = kept_bits(reader)
    if bits is None:
        return
    config = AutoConfig.from_pretrained(hf_dir)
    with torch.device("meta"):
        meta_model = AutoModelForCausalLM.from_config(config)
    weights_path = os.path.join(hf_dir, "model.safetensors")
    tensors = load_file(weights_path)
    arch = reader.fields["general.architecture"].contents()
    # transformers maps the names and, for some architectures, reorders rows (llama.cpp's q/k
    # permutation): applied to the row numbers, the same processing gives that order.
    processor = TENSOR_PROCESSORS.get(arch, TensorProcessor)(config=config.to_dict())
    names = get_gguf_hf_weights_map(meta_model, processor)
    for t in _linear_tensors(reader):
        hf_name = names.get(t.name)
        if hf_name is None or hf_name not in tensors:
            raise ValueError(f"{gguf_path}: no Hugging Face weight for GGUF tensor {t.name}")
        rows, cols = tensors[hf_name].shape
        order = processor.process(weights=np.arange(rows).reshape(rows, 1), name=t.name).weights.reshape(rows)
        parts = from_blocks(t.tensor_type.name, np.asarray(t.data)[order], rows, cols)
        del tensors[hf_name]
        prefix = hf_name.removesuffix(".weight")
        for kind, value in parts.items():
            tensors[f"{prefix}.{kind}"] = value
    save_file(tensors, weights_path, metadata={"format": "pt", "source": os.path.basename(gguf_path)})
    logger.info("Kept %d linear weights in %d bits (model.safetensors now %.0f MiB)", len(_linear_tensors(reader)),
                bits, os.path.getsize(weights_path) / 2**20)
    with open(os.path.join(hf_dir, "config.json")) as f:
        saved = json.load(f)
    saved["quantization_config"] = {"quant_method": "gguf", "bits": bits, "group_size": BLOCK}
    with open(os.path.join(hf_dir, "config.json"), "w") as f:
        json.dump(saved, f, indent=2)
