"""Which linear layers of a model stay quantized, and giving them their quantized weights.

A GPTQ, AWQ or converted GGUF checkpoint says it layer by layer: a linear is quantized when the
checkpoint holds its `qweight` (an FP8 checkpoint: its `weight_scale`). A checkpoint may keep some
layers in 16 bits (an MoE router, an LM head); they load as usual. `quantization="fp8"` on a 16-bit
checkpoint quantizes every linear of the decoder layers at load.
"""
from collections.abc import Iterable

from safetensors import safe_open
from torch import nn

from nanovllm.quantization.quant_config import QuantConfig, checkpoint_quantization_config, resolve_quant_config


def quantize_checkpoint_linears(model: nn.Module, model_dir: str, files: list[str], quantization: str | None
                                 ) -> QuantConfig | None:
    """Before a checkpoint loads: the linears it (or `quantization`) keeps quantized made ready
    for their quantized tensors. Returns the QuantConfig, None for a 16-bit model."""
    quant = resolve_quant_config(quantization, checkpoint_quantization_config(model_dir))
    if quant is not None:
        names = []
        for path in files:
            with safe_open(path, "pt", device="cpu") as f:
                names.extend(f.keys())
        quantize_linears(model, quant, names)
    return quant


def method_for(cfg: QuantConfig):
    if cfg.integer_weights:
        from nanovllm.quantization.int_linear import IntWeightMethod
        return IntWeightMethod(cfg)
    from nanovllm.quantization.fp8_linear import Fp8WeightMethod
    return Fp8WeightMethod(cfg)


def quantize_linears(model: nn.Module, cfg: QuantConfig, checkpoint_names: Iterable[str] | None) -> list[str]:
    """Swap the weights of the linears that `cfg` and the checkpoint's tensor names keep quantized
    for their quantized tensors (before loading). Returns the names of those layers. Without
    names (FP8 quantized at load, random weights): every linear of the decoder layers."""
    from nanovllm.layers.linear import ReplicatedLinear, _Linear
    method = method_for(cfg)
    if checkpoint_names is None or (cfg.method == "fp8" and not cfg.serialized):
        names = [name for name, m in model.named_modules()
                 if isinstance(m, _Linear) and not isinstance(m, ReplicatedLinear)]
    else:
        marker = ".qweight" if cfg.integer_weights else ".weight_scale"
        names = sorted({_fused_name(model, name[:-len(marker)]) for name in checkpoint_names if name.endswith(marker)})
    for name in names:
        try:
            layer = model.get_submodule(name)
        except AttributeError:
            raise ValueError(f"Checkpoint holds quantized weights for {name!r}, which {type(model).__name__} "
                             f"does not have.") from None
        if not isinstance(layer, _Linear):
            raise ValueError(f"Checkpoint holds {cfg.method} weights for {name!r}, a {type(layer).__name__}; "
                             f"nanovllm keeps only linear layers quantized.")
        if layer.quant_method is None:         # fused layers are named once per checkpoint tensor
            method.create_weights(layer, name)
    return names


def finish_quantized_linears(model: nn.Module) -> None:
    """After loading: each quantized layer converts what it read into the form its matmul uses;
    float8 projections then take their input quantized by the op that makes it, and 4-bit gate-up
    projections make the activation, where they can."""
    for module in model.modules():
        method = getattr(module, "quant_method", None)
        if method is not None:
            method.process_weights_after_loading(module)
    from nanovllm.quantization.fp8_linear import fuse_input_quantization
    from nanovllm.quantization.int_linear import fuse_gated_activation
    fuse_input_quantization(model)
    fuse_gated_activation(model)


def _fused_name(model: nn.Module, name: str) -> str:
    """A checkpoint layer's name -> the model's (q_proj -> qkv_proj ...), as load_weights maps them."""
    for hf_name, (our_name, _) in getattr(model, "packed_modules_mapping", {}).items():
        if f".{hf_name}." in name + ".":
            return (name + ".").replace(f".{hf_name}.", f".{our_name}.")[:-1]
    return name
