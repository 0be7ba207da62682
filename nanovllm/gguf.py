"""GGUF checkpoints, turned into ordinary Hugging Face directories.

The engine only knows how to load a Hugging Face directory (config.json, tokenizer files,
*.safetensors). Rather than teach every loader about GGUF, a .gguf file is converted once,
through transformers' own GGUF support, into such a directory in a cache:

    <cache>/gguf/<stem>-<key>/{config.json, tokenizer files, model.safetensors}

`key` changes when the file's size or mtime does, so a replaced file is converted again.
The weights are dequantized (by the `gguf` package, via transformers), except linear weights in
Q4_0, Q4_1 or Q8_0 of a width in `keep_bits` (the engine passes (4, 8) on a GPU or with
LLM(quantization="gguf"), (4,) on a CPU): those are written in nanovllm's quantized layout
(nanovllm/quantization/gguf_format.py) and stay 4 or 8 bits in memory.
"""
import hashlib
import logging
import os
import shutil
import tempfile
import time

import torch

logger = logging.getLogger(__name__)

# Bump when the layout of a converted directory changes, so old caches are not reused.
_FORMAT_VERSION = 2      # 2: config.json records gguf_quantized
_HALF_TYPES = {"F16": torch.float16, "BF16": torch.bfloat16}


def cache_root(cache_dir: str | None = None) -> str:
    """The cache root: `cache_dir`, else $NANOVLLM_CACHE, else ~/.cache/nanovllm."""
    from nanovllm.demo_model import cache_root as default_root
    return cache_dir or default_root()


def converted_dir(gguf_path: str, cache_dir: str | None = None, keep_bits: tuple[int, ...] = ()) -> str:
    """Where `gguf_path` is (or would be) converted to. Only stats the file, so it is cheap (with
    keep_bits, also reads its tensor table: a file with nothing to keep converts as without)."""
    st = os.stat(gguf_path)
    kept = f":kept{bits}" if (bits := _bits_to_keep(gguf_path, keep_bits)) else ""
    key = hashlib.sha1(f"{st.st_size}:{st.st_mtime_ns}:{_FORMAT_VERSION}{kept}".encode()).hexdigest()[:12]
    stem = os.path.splitext(os.path.basename(gguf_path))[0]
    return os.path.join(cache_root(cache_dir), "gguf", f"{stem}-{key}")


def gguf_to_hf_dir(gguf_path: str, cache_dir: str | None = None, keep_bits: tuple[int, ...] = ()) -> str:
    """Convert `gguf_path` to a Hugging Face directory (cached) and return that directory.
    keep_bits: linear weights in Q4_0 / Q4_1 (4) or Q8_0 (8) of these widths stay so (a directory
    only nanovllm loads).

    Raises ValueError for tensor types the `gguf` package cannot dequantize and for architectures
    transformers' GGUF support does not know, naming what is supported.
    """
    gguf_path = os.path.abspath(gguf_path)
    if not os.path.isfile(gguf_path):
        raise FileNotFoundError(f"GGUF file not found: {gguf_path}")
    out = converted_dir(gguf_path, cache_dir, keep_bits)
    # The directory only appears by rename once complete, so its existence means a full conversion.
    if os.path.isdir(out):
        return out

    os.makedirs(os.path.dirname(out), exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".tmp-{os.path.basename(out)}-", dir=os.path.dirname(out))
    start = time.perf_counter()
    # Converting takes a while (about 20 s for a 135M model on 2 cores): say so, stage by stage.
    logger.info("Converting %s to a Hugging Face checkpoint in %s (once per file)",
                os.path.basename(gguf_path), out)
    try:
        _convert(gguf_path, tmp)
        if _bits_to_keep(gguf_path, keep_bits):
            from nanovllm.quantization.gguf_format import keep_linears_quantized
            keep_linears_quantized(gguf_path, tmp)
        try:
            os.rename(tmp, out)
        except OSError:
            # Another process finished the same conversion first: keep theirs.
            if not os.path.isdir(out):
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    logger.info("Converted %s in %.1f s", os.path.basename(gguf_path), time.perf_counter() - start)
    return out


def _stage(number: int, what: str) -> None:
    """One status line per stage of `_convert`: each takes seconds, and a first run would sit silent."""
    logger.info("GGUF conversion [%d/4]: %s", number, what)


def _convert(gguf_path: str, out: str) -> None:
    """Write config.json, the tokenizer and model.safetensors for `gguf_path` into `out`."""
    from safetensors.torch import save_file
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    _stage(1, "reading the tensor table and the model config")
    arch, tensor_types = _check_tensor_types(gguf_path)
    folder, name = os.path.split(gguf_path)
    try:
        config = AutoConfig.from_pretrained(folder, gguf_file=name)
    except ValueError as e:
        raise _unsupported_architecture(gguf_path, arch, e) from e
    if config.model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        raise _unsupported_architecture(gguf_path, arch, f"model_type {config.model_type!r} is no causal LM")
    dtype = _choose_dtype(tensor_types)

    # The weights: transformers maps GGUF names to this model's names (and undoes llama.cpp's q/k
    # permutation); building it on the meta device costs no memory.
    with torch.device("meta"):
        meta_model = AutoModelForCausalLM.from_config(config)
    _stage(2, f"reading and dequantizing {sum(tensor_types.values())} tensors "
              f"({', '.join(f'{n} {k}' for k, n in sorted(tensor_types.items()))})")
    try:
        tensors = load_gguf_checkpoint(gguf_path, return_tensors=True, model_to_load=meta_model,
                                       torch_dtype=dtype)["tensors"]
    except (ValueError, NotImplementedError) as e:
        raise _unsupported_architecture(gguf_path, arch, e) from e
    # llama.cpp writes output.weight only when the head is not the embedding matrix.
    config.tie_word_embeddings = "lm_head.weight" not in tensors
    expected = set(meta_model.state_dict())
    if config.tie_word_embeddings:
        expected.discard("lm_head.weight")
    if missing := sorted(expected - set(tensors)):
        raise ValueError(f"{gguf_path}: transformers found no GGUF tensor for {missing[:5]}"
                         f"{' ...' if len(missing) > 5 else ''}; cannot convert this {arch!r} file.")

    # The engine picks its model class from `architectures`, which GGUF metadata does not state.
    config.architectures = [MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[config.model_type]]
    config.dtype = dtype
    # Quantized weights were widened to float32 only to be exact: an engine on a CPU may run them in bfloat16.
    config.gguf_quantized = any(kind not in ("F32", "F16", "BF16") for kind in tensor_types)
    config.save_pretrained(out)
    _stage(3, "the tokenizer and its chat template")
    AutoTokenizer.from_pretrained(folder, gguf_file=name).save_pretrained(out)  # with its chat template
    _stage(4, f"writing model.safetensors ({sum(t.nbytes for t in tensors.values()) / 2**20:.0f} MiB)")
    save_file({k: v.contiguous() for k, v in tensors.items()}, os.path.join(out, "model.safetensors"),
              metadata={"format": "pt", "source": os.path.basename(gguf_path)})


def _bits_to_keep(gguf_path: str, keep_bits: tuple[int, ...]) -> int | None:
    """The width the file's linear weights are kept in (4 or 8), if it is among keep_bits."""
    if not keep_bits:
        return None
    from gguf import GGUFReader

    from nanovllm.quantization.gguf_format import kept_bits
    bits = kept_bits(GGUFReader(gguf_path))
    return bits if bits in keep_bits else None


def _check_tensor_types(gguf_path: str) -> tuple[str, dict[str, int]]:
    """The file's architecture and {type name: tensor count}; ValueError for types `gguf` cannot dequantize."""
    from gguf import GGUFReader

    reader = GGUFReader(gguf_path)
    arch = reader.fields["general.architecture"].contents()
    counts: dict[str, int] = {}
    for t in reader.tensors:
        counts[t.tensor_type.name] = counts.get(t.tensor_type.name, 0) + 1
    bad = sorted(n for n in counts if n not in dequantizable_types())
    if bad:
        raise ValueError(f"{gguf_path} holds tensors of type {', '.join(bad)}, which the gguf package cannot "
                         f"dequantize. Supported: {', '.join(dequantizable_types())}.")
    return arch, counts


def dequantizable_types() -> list[str]:
    """The ggml tensor types `gguf.quants.dequantize` handles, found by trying one zero block of each
    (the package has no public list, and it grows with its version)."""
    import numpy as np
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, quants

    names = []
    for qtype in GGMLQuantizationType:
        try:
            quants.dequantize(np.zeros(GGML_QUANT_SIZES[qtype][1], dtype=np.uint8), qtype)
            names.append(qtype.name)
        except (NotImplementedError, KeyError):
            pass
    return names


def supported_architectures() -> list[str]:
    """GGUF architectures transformers' GGUF loader (`load_gguf_checkpoint`) knows."""
    from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES
    return sorted(set(GGUF_SUPPORTED_ARCHITECTURES) - {"general", "tokenizer"})  # metadata groups, not models


def _unsupported_architecture(gguf_path: str, arch: str, why: object) -> ValueError:
    return ValueError(f"{gguf_path}: GGUF architecture {arch!r} is not supported by transformers' GGUF "
                      f"loader ({why}). Supported: {', '.join(supported_architectures())}.")


def _choose_dtype(tensor_types: dict[str, int]) -> torch.dtype:
    """float32, except for a file of plain half-precision weights, which stays in that dtype.

    llama.cpp keeps 1-D tensors (norms) in F32 even in an F16/BF16 file, so F32 tensors next to
    half ones do not count (transformers' own GGUF reader decides the same way). Dequantized
    blocks get float32: that is exact, and picking a half type is left to the engine's `dtype`.
    """
    kinds = set(tensor_types) - {"F32"}
    if len(kinds) == 1 and (kind := kinds.pop()) in _HALF_TYPES:
        return _HALF_TYPES[kind]
    return torch.float32


def resolve_gguf(model: str, gguf_file: str | None = None, keep_bits: tuple[int, ...] = ()) -> str | None:
    """The converted Hugging Face directory if `model` names a GGUF checkpoint, else None
    (keep_bits: see gguf_to_hf_dir).

    A GGUF checkpoint is: a path ending in .gguf; a directory plus `gguf_file` (a name inside it,
    or a path); or a directory without config.json holding exactly one .gguf file (with a
    config.json it is a Hugging Face directory, which wins; with several .gguf files, ValueError).
    """
    if model.endswith(".gguf") and not os.path.isdir(model):
        return gguf_to_hf_dir(model, keep_bits=keep_bits)
    if not os.path.isdir(model):
        return None
    if gguf_file is not None:
        return gguf_to_hf_dir(os.path.join(model, gguf_file), keep_bits=keep_bits)
    if os.path.exists(os.path.join(model, "config.json")):
        return None
    found = sorted(f for f in os.listdir(model) if f.endswith(".gguf"))
    if len(found) > 1:  # which one is meant? (None here would only fail later, on a missing config.json)
        raise ValueError(f"{model} holds several GGUF files ({', '.join(found)}); pass gguf_file= to pick one.")
    return gguf_to_hf_dir(os.path.join(model, found[0]), keep_bits=keep_bits) if found else None
