"""GPTQ checkpoints (AutoGPTQ's layout, "v1", and GPTQModel's "v2"), read into nanovllm's layout.

Per quantized linear of K input and N output features, with b-bit weights (p = 32 // b per int32)
in groups of G input features (G = K when group_size is -1):

    qweight  int32 [K / p, N]   input feature k of column n: bits b*(k % p) .. of qweight[k // p, n]
    qzeros   int32 [K / G, N / p]  zero point of (group, n): packed the same way along N;
                                 v1 stores zero - 1 (QuantConfig.zero_offset = 1)
    scales   float16 [K / G, N]
    g_idx    int32 [K]          the group of each input feature: k // G, or, with desc_act
                                 (act-order), the order GPTQ quantized the features in
    w[n, k] = (q[k, n] - zero[g_idx[k], n]) * scale[g_idx[k], n]

nanovllm's layout (int_linear.py) is output-major, [N, ...], like a 16-bit weight: GPTQ's qweight,
packed along K, is exactly its transpose.
"""
import torch

from nanovllm.quantization.packing import unpack_int32
from nanovllm.quantization.quant_config import QuantConfig

TENSORS = ("qweight", "qzeros", "scales", "g_idx")


def to_nanovllm(kind: str, tensor: torch.Tensor, cfg: QuantConfig) -> torch.Tensor:
    """One checkpoint tensor of a GPTQ linear -> nanovllm's layout (see int_linear.py)."""
    if kind == "qweight":
        return tensor.t()
    if kind == "qzeros":
        return (unpack_int32(tensor, cfg.bits, dim=1).float() + cfg.zero_offset).t()
    if kind == "scales":
        return tensor.t()
    if kind == "g_idx":
        return tensor
    raise ValueError(f"GPTQ checkpoints hold no {kind!r} tensor")
