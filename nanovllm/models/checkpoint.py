"""Loading a checkpoint's weights into the (sharded, fused) model (finding the checkpoint:
models/model_dir.py; random weights for benchmarks: models/dummy_weights.py)."""
import glob
import os

import torch
from safetensors import safe_open
from torch import nn

from nanovllm.layers.linear import copy_checked
from nanovllm.quantization.install import finish_quantized_linears, quantize_checkpoint_linears


def load_weights(model: nn.Module, model_dir: str, quantization: str | None = None) -> None:
    """Copy every tensor of the checkpoint's *.safetensors into its parameter.

    A tensor whose module is fused here (q/k/v -> qkv_proj, gate/up -> gate_up_proj) goes
    through that parameter's `weight_loader` with its shard id; each loader keeps only this
    rank's slice. The linears a quantized checkpoint (or `quantization`, LLM's argument) keeps
    quantized get their quantized tensors first (nanovllm/quantization/install.py).
    """
    files = sorted(glob.glob(os.path.join(model_dir, "*.safetensors")))
    if not files:
        raise OSError(f"No *.safetensors weights in {model_dir!r}.")
    quant = quantize_checkpoint_linears(model, model_dir, files, quantization)
    packed = getattr(model, "packed_modules_mapping", {})
    params = dict(model.named_parameters(remove_duplicate=False))
    loaded = set()
    fused_shards = {}                   # a fused parameter -> (its fused module's name, the shards loaded)
    for name, tensor in _checkpoint_tensors(files):
        # Buffers some checkpoints carry that the model recomputes (RoPE's inverse
        # frequencies; older Pythia files' causal-mask buffers).
        if "rotary_emb.inv_freq" in name or name.endswith((".attention.bias", ".attention.masked_bias")):
            continue
        target, shard_id, fused = name, None, None
        for hf_name, (our_name, sid) in packed.items():
            if f".{hf_name}." in name:
                target, shard_id, fused = name.replace(f".{hf_name}.", f".{our_name}."), sid, our_name
                break
        if target not in params:
            if quant is not None and name.endswith(".bias") and not tensor.any():
                continue        # GPTQ/AWQ exports give every linear a bias, zeros where it had none
            raise ValueError(f"Checkpoint tensor {name!r} has no place in {type(model).__name__}.")
        param = params[target]
        loader = getattr(param, "weight_loader", None)
        # Loaders copy into the parameter, which converts the dtype: no converted copy of the
        # whole tensor is made first (a float32 embedding is hundreds of MB).
        try:
            if loader is None:
                copy_checked(param.data, tensor)
            elif shard_id is None:
                loader(param, tensor)
            else:
                loader(param, tensor, shard_id)
        except torch.cuda.OutOfMemoryError:     # (torch.OutOfMemoryError only from torch 2.5)
            raise
        except (ValueError, RuntimeError) as e:     # a tensor of the wrong shape, dtype or values
            raise ValueError(f"Checkpoint tensor {name!r} ({tuple(tensor.shape)}, {tensor.dtype}) does not fit "
                             f"{target!r}: {e}") from e
        loaded.add(target)
        if fused is not None:
            fused_shards.setdefault(target, (fused, set()))[1].add(shard_id)
    missing = {n for n, p in model.named_parameters()
               if n not in loaded and not getattr(p, "optional_in_checkpoint", False)}
    tied = {n for n in missing if n == "lm_head.weight"}
    # A fused parameter missing one of its projections (k_proj of q/k/v) would keep zeros there.
    for target, (fused, shards) in fused_shards.items():
        missing |= {target.replace(f".{fused}.", f".{hf_name}.") for hf_name, (our_name, sid) in packed.items()
                    if our_name == fused and sid not in shards}
    if missing - tied:
        raise ValueError(f"Checkpoint {model_dir!r} lacks weights for: {sorted(missing - tied)[:8]}")
    finish_quantized_linears(model)


def _checkpoint_tensors(files: list[str]):
    """(name, tensor) for every tensor of the files. A tensor is a view of its file mapped in
    memory; each is mapped on its own, so the pages read leave this process's memory once it is
    copied, instead of the whole file staying resident until the last tensor is loaded."""
    for path in files:
        with safe_open(path, "pt", device="cpu") as f:
            names = list(f.keys())
        for name in names:
            with safe_open(path, "pt", device="cpu") as f:
                yield name, f.get_tensor(name)
