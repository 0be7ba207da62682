"""4-bit weights on the CPU through torch's own int4 matmul (`aten::_weight_int4pack_mm_for_cpu`).

torch ships a vectorised CPU kernel for weight-only 4-bit GEMMs that unpacks and scales the
weights in registers. A decode step reads every weight once, so on a memory-bound CPU a 4-bit
weight costs about a quarter of a bfloat16 one (docs/cpu.md has the figures).

Its layout: the weight as `_convert_weight_to_int4pack_for_cpu` packs it (uint8 [N, K / 2]) and
`scales_and_zeros` [K / G, N, 2], with w = (q - 8) * scale + zero. Ours (int_linear.py) is
w = q * scale + min, so zero = min + 8 * scale. The kernel takes groups of 32, 64, 128 or 256
input features and a multiple of 16 output features.

The kernel's time is flat up to ~4 rows and then grows with the rows, so from 128 rows (a prompt
chunk), on a CPU with bfloat16 instructions, the weight is unpacked to bfloat16 for the call and
multiplied densely instead: the same values the kernel uses, 1.7x faster for a 512-token prompt
(docs/cpu.md, "The int4 kernel by rows").

The matmul runs in bfloat16 whatever the model's dtype: the kernel's float32 and float16 paths
are several times slower (measured: 7-8 tok/s against 53 for the demo model's decode). A
float32 model then keeps everything else exact (docs/cpu.md: what dtype "auto" picks).
NANOVLLM_CPU_INT4=0 keeps nanovllm's layout and the exact dequantizing reference instead.
"""
import functools
import os

import torch
import torch.nn.functional as F

from nanovllm.cpu_dtype import cpu_has_bf16_instructions

GROUP_SIZES = (32, 64, 128, 256)
DENSE_ROWS = 128      # from this many rows on, unpack and multiply densely (measured on a 2-core x86 CPU)


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
    xb = x.to(torch.bfloat16)
    # (a compiled graph keeps the kernel: a branch on the row count would recompile per size)
    if not torch.compiler.is_compiling() and x.shape[0] >= DENSE_ROWS and _dense_pays() \
            and packed.shape[0] % packed_block_rows() == 0:
        return F.linear(xb, unpack(packed, scales_and_zeros, group_size)).to(x.dtype)
    return torch._weight_int4pack_mm_for_cpu(xb, packed, group_size, scales_and_zeros).to(x.dtype)


def unpack(packed: torch.Tensor, scales_and_zeros: torch.Tensor, group_size: int, block_rows: int | None = None,
           ) -> torch.Tensor:
    """The packed weight as bfloat16 [N, K], as the kernel sees it: (q - 8) * scale + zero. torch's
    CPU layout: blocks of `block_rows` output rows (64 where the CPU has AVX-512, 32 with AVX2:
    `packed_block_rows`); for each input feature, block_rows / 2 bytes, byte i holding row i of
    the block in its low nibble and row block_rows / 2 + i in its high one."""
    rows = block_rows or packed_block_rows()
    n, k = packed.shape[0], packed.shape[1] * 2
    blocks = packed.view(n // rows, k, rows // 2)
    q = torch.cat([blocks & 15, blocks >> 4], dim=2).transpose(1, 2).reshape(n, k // group_size, group_size)
    scales, zeros = scales_and_zeros.transpose(0, 1).unsqueeze(2).unbind(-1)     # [N, groups, 1] each
    return torch.addcmul(zeros, q.to(torch.bfloat16) - 8, scales).reshape(n, k)


@functools.cache
def _dense_pays() -> bool:
    """Only a CPU with bfloat16 instructions multiplies the unpacked weight faster than the kernel
    (on an AVX2-only AMD EPYC, 4x slower: docs/cpu.md), and only a layout `unpack` reads can be."""
    return cpu_has_bf16_instructions() and packed_block_rows() is not None


@functools.cache
def packed_block_rows() -> int | None:
    """The output rows of one block of this torch's packing (it depends on the CPU's vector
    width), or None if `unpack` reads neither layout (the layout is the kernel's own, not an API)."""
    values = torch.randint(0, 16, (128, 64), generator=torch.Generator().manual_seed(0), dtype=torch.int32)
    identity = torch.ones(64 // 32, 128, 2, dtype=torch.bfloat16)
    identity[..., 1] = 8                    # scale 1, zero 8: the weights are the values themselves
    packed = torch._convert_weight_to_int4pack_for_cpu(values, 1)
    return next((rows for rows in (64, 32) if torch.equal(unpack(packed, identity, 32, rows),
                                                         values.to(torch.bfloat16))), None)
