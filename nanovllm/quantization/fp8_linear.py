"""Linear layers with float8 e4m3 weights (quantization="fp8", or an FP8 checkpoint).

    weight        float8_e4m3fn [N, K]
    weight_scale  float32 [N]          w[n, k] = weight[n, k] * weight_scale[n]

A 16-bit checkpoint is quantized at load, per output channel (the largest |w| of a row maps to
448, float8 e4m3's largest value). An FP8 checkpoint (quant_method "fp8") loads as it is: its
per-tensor scales (one per q/k/v or gate/up projection) become per-channel ones, each row
taking its projection's. Activations are quantized on the fly, per token (row) of x, so
y = (x8 @ weight^T) * x_scale[m] * weight_scale[n]: torch._scaled_mm does that on GPUs with FP8
(compute capability 8.9+); elsewhere the same arithmetic runs dequantized in torch (for tests).
A checkpoint's static activation scales (input_scale) are read and not used: dynamic per-token
scales are at least as accurate.
"""
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from nanovllm import kernels
from nanovllm.distributed import tp_size
from nanovllm.layers.activation import SiluAndMul, silu_and_mul
from nanovllm.layers.fusion import use_kernels
from nanovllm.layers.layernorm import RMSNorm, add_rms_norm, rms_norm
from nanovllm.quantization.kv_cache import FP8_DTYPE, FP8_MAX
from nanovllm.quantization.quant_config import QuantConfig


def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, K] -> (float8 [M, K], float32 scales [M]) with x ~ x8 * scale[:, None], per row."""
    scale = (x.float().abs().amax(dim=-1) * (1 / FP8_MAX)).clamp(min=1e-12)     # (one rounding on every device)
    return (x.float() / scale[:, None]).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE), scale


class Fp8Rows(NamedTuple):
    """Activations already quantized per row, by the op that made them (SiluAndMulToFp8, RMSNormToFp8)."""
    values: torch.Tensor        # float8 e4m3 [M, K]
    scales: torch.Tensor        # float32 [M]
    dtype: torch.dtype          # the activations' own dtype, the product's


def scaled_mm_available(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.get_device_capability(device) >= (8, 9)


def fp8_linear(x: torch.Tensor | Fp8Rows, weight: torch.Tensor, weight_scale: torch.Tensor,
               bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [M, K] @ (weight * weight_scale[:, None])^T with x quantized per row to float8."""
    if isinstance(x, Fp8Rows):
        x8, x_scale, dtype = x
    else:   # the Triton kernel: one pass in x's dtype instead of eight over a float32 copy (same bits)
        x8, x_scale = kernels.quantize_rows_fp8(x.contiguous()) if use_kernels(x) else quantize_rows(x)
        dtype = x.dtype
    n, k = weight.shape
    if scaled_mm_available(x8.device) and n % 16 == 0 and k % 16 == 0:
        # row-wise scaled_mm: float8 operands (the second column-major), float32 scales per
        # row of x and per column of the result; bfloat16 is the output type it supports here
        y = torch._scaled_mm(x8, weight.t(), scale_a=x_scale[:, None], scale_b=weight_scale[None, :],
                             out_dtype=torch.bfloat16)
        y = y.to(dtype)
    else:
        w = weight.float() * weight_scale[:, None]
        y = F.linear((x8.float() * x_scale[:, None]), w).to(dtype)
    return y if bias is None else y + bias


class SiluAndMulToFp8(nn.Module):
    """silu(gate) * up quantized per row for a float8 down projection: on CUDA one kernel makes
    both (kernels.silu_and_mul_fp8), with the bits the two steps give apart."""

    def forward(self, x: torch.Tensor) -> Fp8Rows:
        if use_kernels(x):
            return Fp8Rows(*kernels.silu_and_mul_fp8(x), x.dtype)
        return Fp8Rows(*quantize_rows(silu_and_mul(x)), x.dtype)


class RMSNormToFp8(nn.Module):
    """An RMSNorm whose output only a float8 projection reads: its rows quantized as they are
    made (on CUDA in the norm's kernel), handed on as Fp8Rows; the residual sum as before."""

    def __init__(self, norm: RMSNorm):
        super().__init__()
        self.weight, self.eps = norm.weight, norm.eps

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        if use_kernels(x):
            if residual is None:
                return Fp8Rows(*kernels.rms_norm_fp8(x, self.weight, self.eps), x.dtype)
            values, scales, total = kernels.add_rms_norm_fp8(x, residual, self.weight, self.eps)
            return Fp8Rows(values, scales, x.dtype), total
        if residual is None:
            return Fp8Rows(*quantize_rows(rms_norm(x, self.weight, self.eps)), x.dtype)
        y, total = add_rms_norm(x, residual, self.weight, self.eps)
        return Fp8Rows(*quantize_rows(y), x.dtype), total


def fuse_input_quantization(model: nn.Module) -> None:
    """Where a float8 projection's input is made by one op that nothing else reads, that op
    quantizes it instead of the projection: each gated MLP's activation (an `act` feeding a
    `down_proj`), and in Llama's decoder layer the two RMSNorms before the fused qkv and
    gate-up projections."""
    from nanovllm.models.llama import LlamaDecoderLayer
    for module in model.modules():
        if isinstance(getattr(module, "act", None), SiluAndMul) and _fp8(getattr(module, "down_proj", None)):
            module.act = SiluAndMulToFp8()
        if type(module) is LlamaDecoderLayer:
            if _fp8(module.self_attn.qkv_proj):
                module.input_layernorm = RMSNormToFp8(module.input_layernorm)
            if _fp8(getattr(module.mlp, "gate_up_proj", None)):
                module.post_attention_layernorm = RMSNormToFp8(module.post_attention_layernorm)


def _fp8(layer) -> bool:
    return isinstance(getattr(layer, "quant_method", None), Fp8WeightMethod)


class Fp8WeightMethod:
    """Float8 weights with per-channel scales for a linear layer (the layer's `quant_method`)."""

    def __init__(self, cfg: QuantConfig):
        self.cfg = cfg

    def create_weights(self, layer: nn.Module, name: str) -> None:
        if not self.cfg.serialized:     # 16-bit weights load as usual; quantized after loading
            layer.quant_method = self
            return
        out_features, in_features = layer.weight.shape
        device, loader = layer.weight.device, layer.weight_loader
        del layer.weight
        weight = nn.Parameter(torch.empty(out_features, in_features, dtype=FP8_DTYPE, device=device),
                              requires_grad=False)
        weight.weight_loader = loader
        layer.register_parameter("weight", weight)
        scale = nn.Parameter(torch.ones(out_features, dtype=torch.float32, device=device), requires_grad=False)
        scale.weight_loader = self._scale_loader(layer, loader)
        layer.register_parameter("weight_scale", scale)
        ignored = nn.Parameter(torch.ones((), dtype=torch.float32, device=device), requires_grad=False)
        ignored.optional_in_checkpoint = True
        ignored.weight_loader = lambda param, loaded, shard_id=None: None
        layer.register_parameter("input_scale", ignored)
        layer.quant_method = self

    @staticmethod
    def _scale_loader(layer: nn.Module, shard_loader):
        def load(param: nn.Parameter, loaded: torch.Tensor, shard_id=None):
            loaded = loaded.float().reshape(-1)
            if loaded.numel() == 1:         # per tensor: each row of that tensor gets it
                loaded = loaded.expand(_checkpoint_rows(layer, shard_id)).contiguous()
            if shard_id is None:
                shard_loader(param, loaded)
            else:
                shard_loader(param, loaded, shard_id)
        return load

    def process_weights_after_loading(self, layer: nn.Module) -> None:
        if self.cfg.serialized:
            return
        weight, scale = quantize_rows(layer.weight.data)
        del layer.weight
        layer.weight = nn.Parameter(weight, requires_grad=False)
        layer.weight_scale = nn.Parameter(scale, requires_grad=False)

    def apply(self, layer: nn.Module, x: torch.Tensor | Fp8Rows, bias: torch.Tensor | None) -> torch.Tensor:
        if isinstance(x, Fp8Rows):
            return fp8_linear(x, layer.weight, layer.weight_scale, bias)
        lead = x.shape[:-1]
        y = fp8_linear(x.reshape(-1, x.shape[-1]), layer.weight, layer.weight_scale, bias)
        return y.reshape(*lead, y.shape[-1])


def _checkpoint_rows(layer: nn.Module, shard_id) -> int:
    """Rows of the checkpoint tensor that `shard_id` names in this layer (all ranks' rows)."""
    from nanovllm.layers.linear import ColumnParallelLinear, MergedColumnParallelLinear, QKVParallelLinear
    if isinstance(layer, QKVParallelLinear):
        heads = {"q": layer.total_num_heads, "k": layer.total_num_kv_heads, "v": layer.total_num_kv_heads,
                 None: layer.total_num_heads + 2 * layer.total_num_kv_heads}[shard_id]
        return heads * layer.head_dim
    if isinstance(layer, MergedColumnParallelLinear):
        return sum(layer.output_sizes) if shard_id is None else layer.output_sizes[shard_id]
    rows = layer.weight.shape[0]
    return rows * tp_size() if isinstance(layer, ColumnParallelLinear) else rows
