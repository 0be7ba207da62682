"""GGUF's Q4_0, Q4_1 and Q8_0 weights as nanovllm's converted GGUF directories store them.

nanovllm/gguf.py writes each kept linear of a GGUF file straight in nanovllm's layout
(int_linear.py): `qweight`, `scales` and `mins`, groups of 32 (a GGUF block). A block's scale d
and min m map onto them exactly (w = q * d + m):

    Q4_0  w = d * (q - 8)        q in 0..15   scale d, min -8 d
    Q4_1  w = d * q + m          q in 0..15   scale d, min m
    Q8_0  w = d * q              q in -128..127, stored as q + 128 in 0..255: scale d, min -128 d
"""
import numpy as np
import torch

from nanovllm.quantization.packing import pack_int32
from nanovllm.quantization.quant_config import QuantConfig

TENSORS = ("qweight", "scales", "mins")
BLOCK = 32                                        # values per GGUF block
KEPT_TYPES = {"Q4_0": 4, "Q4_1": 4, "Q8_0": 8}    # the types kept quantized, and their bits


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
