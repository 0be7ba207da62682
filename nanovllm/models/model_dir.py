"""Where a model's files are: a local directory, a GGUF file (converted once to a cached
Hugging Face directory), the built-in demo model, or a Hugging Face repo id (downloaded); and
the sampling defaults its generation_config.json sets."""
import json
import os
import re


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


def generation_defaults(model_dir: str) -> dict:
    """The sampling settings of the checkpoint's generation_config.json, as SamplingParams fields."""
    path = os.path.join(model_dir, "generation_config.json")
    if not os.path.exists(path):
        return {}
    with open(path) as f:
        saved = json.load(f)
    names = {"temperature": "temperature", "top_k": "top_k", "top_p": "top_p", "min_p": "min_p",
             "repetition_penalty": "repetition_penalty", "max_new_tokens": "max_tokens"}
    return {ours: saved[theirs] for theirs, ours in names.items() if saved.get(theirs) is not None}
