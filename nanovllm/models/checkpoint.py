"""Finding a checkpoint and loading its weights into the (sharded, fused) model."""
import glob
import os
import re

import torch
from safetensors import safe_open
from torch import nn

from nanovllm.quantization import QuantConfig
from nanovllm.quantization.install import checkpoint_quant_config, finish_quantized_linears, quantize_linears


def resolve_model_dir(model: str, gguf_file: str | None = None, revision: str | None = None,
                      keep_gguf_bits: tuple[int, ...] = ()) -> str:
    """A local directory (used as is), a GGUF file (converted once to a cached Hugging Face
    directory; keep_gguf_bits: its Q4_0/Q4_1 (4) or Q8_0 (8) linear weights of these widths stay so), "demo" (the demo
    model, unless a local path has that name), or a Hugging Face repo id (downloaded with huggingface_hub)."""
    from nanovllm.demo_model import DEMO_MODEL, demo_model_path
    from nanovllm.gguf import resolve_gguf
    if model == DEMO_MODEL and not os.path.exists(model):
        model = demo_model_path()
    converted = resolve_gguf(model, gguf_file, keep_gguf_bits)
    if converted is not None:
        return converted
    if os.path.isdir(model):
        return model
    if not re.fullmatch(r"[A-Za-z0-9_][\w.-]*/[\w.-]+", model):
        raise OSError(f"Model path {model!r} does not exist (and is not a Hugging Face repo id of the form "
                      f"'org/name'; {DEMO_MODEL!r} is the built-in demo model).")
    from huggingface_hub import snapshot_download
    try:
        return snapshot_download(model, revision=revision, allow_patterns=[
            "*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "tokenizer*"])
    except Exception as e:
        # `from None`: the user sees this one error, with its cause on one line, rather than
        # huggingface_hub's chained tracebacks.
        raise OSError(
            f"Could not find {model!r} locally and could not download it from the Hugging Face Hub "
            f"({type(e).__name__}: {_one_line(str(e))}). On a machine with internet access run "
            f"`hf download {model} --local-dir <dir>`, copy <dir> here and pass "
            f"LLM(model='<dir>').") from None


def _one_line(message: str, limit: int = 300) -> str:
    message = " ".join(message.split())
    return message if len(message) <= limit else message[:limit - 3] + "..."


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
    quant = checkpoint_quant_config(model_dir, quantization)
    if quant is not None:
        names = []
        for path in files:
            with safe_open(path, "pt", device="cpu") as f:
                names.extend(f.keys())
        quantize_linears(model, quant, names)
    packed = getattr(model, "packed_modules_mapping", {})
    params = dict(model.named_parameters(remove_duplicate=False))
    loaded = set()
    for name, tensor in _checkpoint_tensors(files):
        # Buffers some checkpoints carry that the model recomputes (RoPE's inverse
        # frequencies; older Pythia files' causal-mask buffers).
        if "rotary_emb.inv_freq" in name or name.endswith((".attention.bias", ".attention.masked_bias")):
            continue
        target, shard_id = name, None
        for hf_name, (our_name, sid) in packed.items():
            if f".{hf_name}." in name:
                target, shard_id = name.replace(f".{hf_name}.", f".{our_name}."), sid
                break
        if target not in params:
            if quant is not None and name.endswith(".bias") and not tensor.any():
                continue        # GPTQ/AWQ exports give every linear a bias, zeros where it had none
            raise ValueError(f"Checkpoint tensor {name!r} has no place in {type(model).__name__}.")
        param = params[target]
        loader = getattr(param, "weight_loader", None)
        # Loaders copy into the parameter, which converts the dtype: no converted copy of the
        # whole tensor is made first (a float32 embedding is hundreds of MB).
        if loader is None:
            param.data.copy_(tensor)
        elif shard_id is None:
            loader(param, tensor)
        else:
            loader(param, tensor, shard_id)
        loaded.add(target)
    missing = {n for n, p in model.named_parameters()
               if n not in loaded and not getattr(p, "optional_in_checkpoint", False)}
    tied = {n for n in missing if n == "lm_head.weight"}
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


def init_dummy_weights(model: nn.Module, seed: int = 0, quant: QuantConfig | None = None) -> None:
    """load_format="dummy": random weights of the right shapes (benchmarks need no checkpoint).
    Small values keep activations finite; norms stay at one. With `quant` the decoder's linears
    are quantized: FP8 from the random 16-bit weights; GPTQ/AWQ/GGUF as random integers whose
    scales and zeros give weights in the same small range."""
    if quant is not None:
        quantize_linears(model, quant, None)
    for i, (name, p) in enumerate(model.named_parameters()):
        gen = torch.Generator(device=p.device).manual_seed(seed + i)
        kind = name.rsplit(".", 1)[-1]
        if "norm" in name:
            p.data.fill_(1.0)
        elif kind == "qweight":             # every bit of every int32 word random
            p.data.copy_(torch.randint(-2**31, 2**31, p.shape, generator=gen, device=p.device))
        elif kind == "g_idx":               # contiguous groups, as create_weights made them
            continue
        elif kind in ("scales", "qzeros", "mins"):
            middle = 2 ** (quant.bits - 1)  # weights (q - middle) * scale in [-0.02, 0.02)
            p.data.fill_({"scales": 0.02 / middle, "qzeros": middle, "mins": -0.02}[kind])
        else:
            p.data.uniform_(-0.02, 0.02, generator=gen)
    if quant is not None:
        finish_quantized_linears(model)
