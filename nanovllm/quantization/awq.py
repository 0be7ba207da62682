"""AWQ checkpoints (AutoAWQ's GEMM layout), read into nanovllm's layout.

Per quantized linear of K input and N output features, 4-bit weights in groups of G input features:

    qweight  int32 [K, N / 8]   packed along the output features, in AWQ's interleaved order: the
                                 eight slots of a word hold columns 0, 2, 4, 6, 1, 3, 5, 7 of its group
    qzeros   int32 [K / G, N / 8]  zero points, packed the same way (stored as they are)
    scales   float16 [K / G, N]
    w[n, k] = (q[k, n] - zero[k // G, n]) * scale[k // G, n]
"""
import torch

from nanovllm.quantization.packing import AWQ_ORDER, pack_int32, unpack_int32
from nanovllm.quantization.quant_config import QuantConfig

TENSORS = ("qweight", "qzeros", "scales")


def to_nanovllm(kind: str, tensor: torch.Tensor, cfg: QuantConfig) -> torch.Tensor:
    """One checkpoint tensor of an AWQ linear -> nanovllm's layout (see int_linear.py)."""
    if kind == "qweight":       # unpack along N, repack along K
        return pack_int32(unpack_int32(tensor, cfg.bits, dim=1, order=AWQ_ORDER).t(), cfg.bits, dim=1)
    if kind == "qzeros":
        return unpack_int32(tensor, cfg.bits, dim=1, order=AWQ_ORDER).float().t()
    if kind == "scales":
        return tensor.t()
    raise ValueError(f"AWQ checkpoints hold no {kind!r} tensor")
