"""What a new user meets first: what the install pulls in, the demo model by name, the error for a
model that cannot be found."""
import logging
import os

import pytest

from nanovllm import LLM, SamplingParams

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_base_install_pulls_in_no_triton():
    """A CPU install never launches a kernel and CUDA torch brings its own triton: only the tests'
    interpreter needs it, so it sits in the test extra."""
    from packaging.requirements import Requirement     # a dependency of transformers
    tomllib = pytest.importorskip("tomllib")
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        project = tomllib.load(f)["project"]

    def names(requirements):
        return [Requirement(r).name.lower() for r in requirements]
    assert "torch" in names(project["dependencies"])
    assert "triton" not in names(project["dependencies"])
    assert "triton" in names(project["optional-dependencies"]["test"])


@pytest.fixture
def offline_demo(tmp_path, monkeypatch):
    """The demo model as offline: SmolLM2 cannot be fetched, so the tiny random checkpoint is used."""
    import nanovllm.demo_assets as assets
    monkeypatch.setenv("NANOVLLM_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(assets, "fetch_smollm2_gguf", lambda cache_dir=None: None)
    monkeypatch.chdir(tmp_path)          # no ./demo here
    return tmp_path


def test_llm_demo_offline_runs_the_tiny_checkpoint_and_says_so(offline_demo, caplog):
    from nanovllm.demo_model import demo_checkpoint_dir
    with caplog.at_level(logging.INFO, logger="nanovllm"):
        llm = LLM("demo", device="cpu")
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("Using the demo model" in m and "random weights" in m and "offline?" in m for m in warnings), warnings
    assert llm.llm_engine.config.model == "demo"                 # what the server names it
    assert llm.llm_engine.config.model_dir == demo_checkpoint_dir()
    out = llm.generate(["The capital of France is"], SamplingParams(temperature=0, max_tokens=4), use_tqdm=False)
    assert len(out[0].outputs[0].token_ids) == 4


def test_demo_model_path_prefers_smollm2(offline_demo, monkeypatch, caplog):
    import nanovllm.demo_assets as assets
    from nanovllm.demo_model import demo_model_path
    fake = str(offline_demo / assets.SMOLLM2_FILE)
    monkeypatch.setattr(assets, "fetch_smollm2_gguf", lambda cache_dir=None: fake)
    with caplog.at_level(logging.INFO, logger="nanovllm"):
        assert demo_model_path() == fake
    assert [r.levelname for r in caplog.records] == ["INFO"]
    assert "SmolLM2-135M-Instruct" in caplog.records[0].getMessage() and fake in caplog.records[0].getMessage()


def test_a_local_directory_named_demo_wins(offline_demo, tiny_qwen3):
    from nanovllm.models.model_dir import resolve_model_dir
    os.symlink(tiny_qwen3, offline_demo / "demo")
    assert resolve_model_dir("demo") == "demo"


def test_hub_error_says_hf_download_with_the_cause_on_one_line(monkeypatch):
    import huggingface_hub

    def offline(*args, **kwargs):
        raise ConnectionError("no network:\n    name resolution failed")
    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    with pytest.raises(OSError) as caught:
        LLM("Qwen/Qwen3-0.6B")
    message = str(caught.value)
    assert "`hf download Qwen/Qwen3-0.6B --local-dir <dir>`" in message
    assert "(ConnectionError: no network: name resolution failed)" in message
    assert "\n" not in message and "huggingface-cli" not in message
    # Raised on its own: no "During handling of the above exception..." chain under it.
    assert caught.value.__cause__ is None and caught.value.__suppress_context__


def test_unknown_path_names_the_demo_model(offline_demo):
    with pytest.raises(OSError, match=r"does not exist .*'demo' is the built-in demo model"):
        LLM("no-such-model")
