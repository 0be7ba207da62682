"""Linear layers whose weights stay 4- or 8-bit integers (GPTQ, AWQ, GGUF's Q4_0/Q4_1/Q8_0).

nanovllm's layout, whatever the checkpoint's, for a layer of K input and N output features on
this rank, b-bit weights (p = 32 // b per int32) in groups of G input features:

    qweight  int32 [N, K / p]   input feature k of row n in bits b*(k % p) .. of qweight[n, k // p]
    scales   [N, K / G]         in the model's dtype
    mins     [N, K / G]         w[n, k] = q[n, k] * scales[n, g] + mins[n, g], g = k // G

Output-major like a 16-bit weight, so each linear's own `weight_loader` (fused q/k/v and
gate/up slices, tensor-parallel shards) places these tensors unchanged. A checkpoint's zero points
z (GPTQ, AWQ) become mins = -z * scale once loaded; GGUF's Q4_1 stores its mins as they are.

GPTQ's act-order (desc_act) gives each input feature its group through `g_idx`. Sorting the input
features by group makes the groups contiguous again: the rows of the weight are permuted once at
load and each input row the same way at run time (`input_perm`). Where this rank holds a slice of
the input features (a row-parallel layer split over ranks) the groups stay scattered: the scales
of every group are then kept and the kernel looks each feature's group up in `g_idx`.

On CUDA the matmul is the W4A16 Triton kernel (kernels/w4a16_gemm.py), which unpacks and scales
the weights in registers. On the CPU, 4-bit weights whose groups torch's own int4 kernel takes are
repacked for it once loaded (cpu_int4.py); elsewhere `dequantize` widens the weight and F.linear
multiplies (the reference both kernels are tested against).
"""
import torch
import torch.nn.functional as F
from torch import nn

from nanovllm.distributed import tp_rank, tp_size
from nanovllm.layers.activation import SiluAndMul, silu_and_mul
from nanovllm.layers.fusion import use_kernels
from nanovllm.layers.linear import copy_checked
from nanovllm.quantization import awq, cpu_int4, gguf_format, gptq
from nanovllm.quantization.packing import pack_int32, unpack_int32, values_per_word
from nanovllm.quantization.quant_config import QuantConfig

_FORMATS = {"gptq": gptq, "awq": awq, "gguf": gguf_format}


def dequantize(qweight: torch.Tensor, scales: torch.Tensor, mins: torch.Tensor, bits: int, group_size: int,
               g_idx: torch.Tensor | None = None) -> torch.Tensor:
    """The weight [N, K] the quantized tensors stand for, in scales' dtype (the reference of the kernel:
    the product and sum in float32, then one rounding)."""
    per_word = values_per_word(bits)
    shifts = torch.arange(per_word, device=qweight.device, dtype=torch.int32) * bits
    q = ((qweight.unsqueeze(-1) >> shifts) & ((1 << bits) - 1)).flatten(1).float()   # [N, K]
    if g_idx is not None:
        groups = g_idx.long()
        return (q * scales.float()[:, groups] + mins.float()[:, groups]).to(scales.dtype)
    n, k = q.shape
    q = q.view(n, k // group_size, group_size)      # contiguous groups: broadcast, no gather
    return (q * scales.float().unsqueeze(-1) + mins.float().unsqueeze(-1)).view(n, k).to(scales.dtype)


def fuse_gated_activation(model: nn.Module) -> None:
    """A gated MLP whose fused gate-up projection is 4-bit gets its SiLU activation from that
    projection (`layer.gated`): on a GPU the Gluon GEMV computes silu(gate) * up in its last step,
    one launch fewer a layer at batch 1 (kernels/w4a16_gemv.py)."""
    for module in model.modules():
        layer = getattr(module, "gate_up_proj", None)
        if (isinstance(getattr(module, "act", None), SiluAndMul) and hasattr(module, "down_proj")
                and isinstance(getattr(layer, "quant_method", None), IntWeightMethod)
                and layer.quant_method.cfg.bits == 4 and layer.bias is None):
            layer.gated = True
            module.act = nn.Identity()


def use_kernel(x: torch.Tensor) -> bool:
    """The Triton kernel on CUDA; the torch reference elsewhere (tests point this at the interpreter)."""
    return x.is_cuda


class IntWeightMethod:
    """Makes a linear layer hold `cfg.bits`-bit weights and multiplies with them (the layer's
    `quant_method`). One instance serves every layer of a model; per-layer state lives on the layer."""

    def __init__(self, cfg: QuantConfig):
        self.cfg = cfg
        self.format = _FORMATS[cfg.method]

    # -- building and loading ---------------------------------------------------------------
    def create_weights(self, layer: nn.Module, name: str) -> None:
        """Replace layer.weight by the quantized tensors, each with a loader that converts the
        checkpoint's layout to ours and then lets the layer's own loader shard it."""
        from nanovllm.layers.linear import RowParallelLinear
        cfg, bits = self.cfg, self.cfg.bits
        out_features, in_features = layer.weight.shape
        split_input = isinstance(layer, RowParallelLinear) and tp_size() > 1
        full_in = in_features * tp_size() if split_input else in_features
        group = full_in if cfg.group_size == -1 else cfg.group_size
        # With act-order or one group per row, a rank's input slice needs every group's scales.
        all_groups = split_input and (cfg.group_size == -1 or cfg.desc_act)
        if full_in % group or (not all_groups and in_features % group):
            per_rank = f" ({in_features} on each of {tp_size()} ranks)" if split_input else ""
            raise ValueError(f"{cfg.method.upper()} group_size {cfg.group_size} does not divide the {full_in} input "
                             f"features{per_rank} of {name}; supported: a group size that divides every "
                             f"layer's input features per rank, or -1.")
        if in_features % values_per_word(bits):
            raise ValueError(f"{name} has {in_features} input features per rank, not a multiple of "
                             f"{values_per_word(bits)} (the {bits}-bit values in an int32 word).")
        num_groups = (full_in if all_groups else in_features) // group
        device, dtype = layer.weight.device, layer.weight.dtype
        del layer.weight
        # one group over the whole input (-1) covers just this rank's slice of it
        layer.group_size = in_features if cfg.group_size == -1 else group
        layer.all_groups, layer.split_input = all_groups, split_input

        def add(param_name: str, shape, param_dtype, whole: bool = False):
            param = nn.Parameter(torch.zeros(shape, dtype=param_dtype, device=device), requires_grad=False)
            param.weight_loader = self._loader(layer, param_name, whole)
            layer.register_parameter(param_name, param)

        add("qweight", (out_features, in_features // values_per_word(bits)), torch.int32)
        add("scales", (out_features, num_groups), dtype, whole=all_groups)
        if "qzeros" in self.format.TENSORS:
            add("qzeros", (out_features, num_groups), torch.float32, whole=all_groups)
        if "mins" in self.format.TENSORS:
            add("mins", (out_features, num_groups), dtype, whole=all_groups)
        if "g_idx" in self.format.TENSORS:
            # A checkpoint without g_idx has contiguous groups: that is the default.
            offset = tp_rank() * in_features if split_input else 0
            g_idx = (torch.arange(in_features, device=device) + offset) // group
            param = nn.Parameter(g_idx.to(torch.int32), requires_grad=False)
            param.optional_in_checkpoint = True
            param.weight_loader = self._g_idx_loader(layer, name)
            layer.register_parameter("g_idx", param)
        layer.register_buffer("input_perm", None)
        layer.register_buffer("int4pack", None)      # torch's CPU int4 layout, once repacked (cpu_int4.py)
        layer.gated = False         # the output is silu(gate) * up of the product's halves (fuse_gated_activation)
        layer.quant_method = self

    def _loader(self, layer: nn.Module, kind: str, whole: bool):
        convert, cfg, shard = self.format.to_nanovllm, self.cfg, layer.weight_loader
        checked, words = cfg.method in ("gptq", "awq"), kind in ("qweight", "qzeros")   # words: int32

        def load(param: nn.Parameter, loaded: torch.Tensor, shard_id=None):
            if checked and (loaded.dtype != torch.int32 if words else not loaded.is_floating_point()):
                raise ValueError(f"{kind} in {loaded.dtype}; {cfg.method.upper()} stores it as "
                                 f"{'int32 words' if words else 'floating point'}")
            ours = convert(kind, loaded, cfg)
            if whole:                    # every rank keeps all of it
                copy_checked(param.data, ours)
            elif shard_id is None:
                shard(param, ours)
            else:
                shard(param, ours, shard_id)
        return load

    def _g_idx_loader(self, layer: nn.Module, name: str):
        def load(param: nn.Parameter, loaded: torch.Tensor, shard_id=None) -> None:
            full_in = param.numel() * (tp_size() if layer.split_input else 1)
            groups = 1 if self.cfg.group_size == -1 else full_in // self.cfg.group_size
            if loaded.is_floating_point() or loaded.shape != (full_in,):
                raise ValueError(f"g_idx must be {full_in} integer group indices, got {tuple(loaded.shape)} "
                                 f"{loaded.dtype}")
            low, high = int(loaded.min()), int(loaded.max())
            if low < 0 or high >= groups:      # (out of range, it would read scales not its group's)
                raise ValueError(f"g_idx holds groups {low} to {high}; the layer has groups 0 to {groups - 1}")
            g_idx = loaded.to(param.device, torch.int32)
            if layer.split_input:
                g_idx = g_idx.chunk(tp_size())[tp_rank()]
            # q/k/v (gate/up) share their input: GPTQ gives them the same act-order, and a fused
            # layer can only permute its input one way.
            previous = getattr(layer, "_g_idx_loaded", None)
            if previous is not None and not torch.equal(previous, g_idx):
                raise ValueError(f"{name}: the projections fused into this layer have different g_idx "
                                 f"(act-order); nanovllm needs them equal to fuse them.")
            copy_checked(param.data, g_idx)
            layer._g_idx_loaded = g_idx
        return load

    def process_weights_after_loading(self, layer: nn.Module) -> None:
        """Zero points -> mins; act-order -> contiguous groups (or the g_idx look-up); on the CPU,
        torch's int4 layout where its kernel takes the layer."""
        if hasattr(layer, "qzeros"):
            mins = -layer.qzeros.float() * layer.scales.float()
            layer.mins = nn.Parameter(mins.to(layer.scales.dtype), requires_grad=False)
            del layer.qzeros
        self._order_groups(layer)
        if cpu_int4.can_repack(layer, self.cfg.bits):
            values = unpack_int32(layer.qweight.data, self.cfg.bits, dim=1)
            layer.int4pack, scales_and_zeros = cpu_int4.repack(values, layer.scales.data, layer.mins.data)
            layer.register_buffer("scales_and_zeros", scales_and_zeros)
            del layer.qweight, layer.scales, layer.mins

    def _order_groups(self, layer: nn.Module) -> None:
        """Act-order (g_idx): permute the input features so that groups are contiguous, or keep
        g_idx for the kernel to look each feature's group up."""
        layer.__dict__.pop("_g_idx_loaded", None)
        g_idx = layer._parameters.pop("g_idx", None)
        layer.register_buffer("g_idx", None)
        if g_idx is None:
            return
        g_idx = g_idx.data.long()
        in_features = g_idx.shape[0]
        contiguous = torch.arange(in_features, device=g_idx.device) // layer.group_size
        first_group = 0 if layer.all_groups or not layer.split_input else tp_rank() * in_features // layer.group_size
        local = g_idx - first_group
        if torch.equal(local, contiguous):
            return
        perm = torch.argsort(local, stable=True)
        if not layer.all_groups and torch.equal(local[perm], contiguous):
            bits = self.cfg.bits
            q = unpack_int32(layer.qweight.data, bits, dim=1)[:, perm]
            layer.qweight.data = pack_int32(q, bits, dim=1)
            layer.input_perm = perm
        else:
            layer.g_idx = local.to(torch.int32)     # a registered buffer: assignment keeps it one

    # -- running ---------------------------------------------------------------------------------
    def apply(self, layer: nn.Module, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        lead, in_features = x.shape[:-1], x.shape[-1]
        x = x.reshape(-1, in_features)
        if layer.input_perm is not None:
            x = x.index_select(1, layer.input_perm)
        gated = layer.gated
        if layer.int4pack is not None:
            y = cpu_int4.int4_matmul(x, layer.int4pack, layer.scales_and_zeros, layer.group_size)
        elif use_kernel(x):
            from nanovllm.kernels.w4a16_gemm import w4a16_gemm
            fused = gated and use_kernels(x)        # (NANOVLLM_FUSED_KERNELS=0: torch's activation, as unfused)
            y = w4a16_gemm(x, layer.qweight, layer.scales, layer.mins, self.cfg.bits, layer.group_size, layer.g_idx,
                           gated=fused)
            gated = gated and not fused
        else:
            w = dequantize(layer.qweight, layer.scales, layer.mins, self.cfg.bits, layer.group_size, layer.g_idx)
            y = F.linear(x, w.to(x.dtype))
        if gated:
            y = silu_and_mul(y)
        if bias is not None:        # (a gated layer has none)
            y = y + bias
        return y.reshape(*lead, y.shape[-1])
