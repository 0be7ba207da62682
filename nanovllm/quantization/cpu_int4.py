"""4-bit weights on the CPU through torch's own int4 matmul (`aten::_weight_int4pack_mm_for_cpu`).

torch ships a vectorised CPU kernel for weight-only 4-bit GEMMs that unpacks and scales the
weights in registers. A decode step reads every weight once, so on a memory-bound CPU a 4-bit
weight costs about a quarter of a bfloat16 one (docs/cpu.md has the figures).

Its layout: the weight as `_convert_weight_to_int4pack_for_cpu` packs it (uint8 [N, K / 2]) and
`scales_and_zeros` [K / G, N, 2], with w = (q - 8) * scale + zero. Ours (int_linear.py) is
w = q * scale + min, so zero = min + 8 * scale. The kernel takes groups of 32, 64, 128 or 256
input features and a multiple of 16 output features.

The matmul runs in bfloat16 whatever the model's dtype: the kernel's float32 and float16 paths
are several times slower (measured: 7-8 tok/s against 53 for the demo model's decode). A
float32 model then keeps everything else exact (docs/cpu.md: what dtype "auto" picks).
NANOVLLM_CPU_INT4=0 keeps nanovllm's layout and the exact dequantizing reference instead.
"""
import os

import torch

GROUP_SIZES = (32, 64, 128, 256)


def can_repack(layer: torch.nn.Module, bits: int) -> bool:
    """A CPU layer of 4-bit weights in contiguous groups of a size the kernel takes."""
    out_features = layer.qweight.shape[0]
    return (os.environ.get("NANOVLLM_CPU_INT4") != "0" and layer.qweight.device.type == "cpu" and bits == 4
            and layer.g_idx is None and layer.group_size in GROUP_SIZES and out_features % 16 == 0)


def repack(qweight_values: torch.Tensor, scales: torch.Tensor, mins: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(values uint8 [N, K] in 0..15, scales [N, K / G], mins [N, K / G]) -> (packed weight,
    scales_and_zeros in bfloat16)."""
    packed = torch._convert_weight_to_int4pack_for_cpu(qweight_values.to(torch.int32), 1)
    zeros = mins.float() + 8 * scales.float()
    scales_and_zeros = torch.stack([scales.float().t(), zeros.t()], dim=-1).to(torch.bfloat16).contiguous()
    return packed, scales_and_zeros


def int4_matmul(x: torch.Tensor, packed: torch.Tensor, scales_and_zeros: torch.Tensor, group_size: int) -> torch.Tensor:
    """x [M, K] @ w.T -> [M, N] in x's dtype, computed in bfloat16."""
    return torch._weight_int4pack_mm_for_cpu(x.to(torch.bfloat16), packed, group_size, scales_and_zeros).to(x.dtype)
