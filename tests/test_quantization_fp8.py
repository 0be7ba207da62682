"""FP8 weights: float8 e4m3 with per-channel scales, activations quantized per token. On the CPU the
dequantized torch path runs (torch._scaled_mm needs a GPU with FP8)."""
import json
import os
import shutil

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from nanovllm import LLM, SamplingParams
from nanovllm.layers.linear import _Linear
from nanovllm.quantization.fp8_linear import fp8_linear, quantize_rows
from nanovllm.quantization.kv_cache import FP8_DTYPE, FP8_MAX
from tests.conftest import random_prompts

LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
FUSED = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj"),
         "o_proj": ("o_proj",), "down_proj": ("down_proj",)}


def test_rows_quantize_to_the_full_float8_range():
    x = torch.randn(5, 64) * torch.logspace(-3, 3, 5)[:, None]
    x8, scale = quantize_rows(x)
    assert x8.dtype == FP8_DTYPE and torch.equal(x8.float().abs().amax(1), torch.full((5,), FP8_MAX))
    torch.testing.assert_close(scale, x.abs().amax(1) / FP8_MAX)
    # 3 mantissa bits: within 2**-4 of each value, relative to its row's largest
    assert ((x8.float() * scale[:, None] - x).abs() <= x.abs().amax(1, keepdim=True) * 2**-4).all()


def test_fp8_linear_is_the_product_of_the_quantized_operands():
    gen = torch.Generator().manual_seed(0)
    x, w, bias = torch.randn(7, 96, generator=gen), torch.randn(48, 96, generator=gen), torch.randn(48, generator=gen)
    w8, w_scale = quantize_rows(w)
    x_scale = x.abs().amax(1) / FP8_MAX                                    # per token, computed here
    x8 = (x / x_scale[:, None]).to(FP8_DTYPE)
    expected = (x8.double() @ w8.double().t()) * x_scale[:, None].double() * w_scale[None, :].double() + bias.double()
    got = fp8_linear(x, w8, w_scale, bias)
    torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-5)
    exact = F.linear(x, w, bias)
    assert (got - exact).norm() < 0.05 * exact.norm()                      # and close to the 16-bit product


def write_fp8_checkpoint(src: str, dst: str) -> dict[str, torch.Tensor]:
    """`src` as an FP8 checkpoint (quant_method "fp8", as AutoFP8 writes them): each linear's weight in
    float8 with one scale per tensor, and a static input scale. Returns {name: the weight it stands for}."""
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("*.safetensors"))
    tensors, meant = {}, {}
    for name, t in load_file(os.path.join(src, "model.safetensors")).items():
        module, _, kind = name.rpartition(".")
        if kind != "weight" or module.rpartition(".")[2] not in LINEARS:
            tensors[name] = t
            continue
        scale = t.abs().max() / FP8_MAX
        tensors[name] = (t / scale).to(FP8_DTYPE)
        tensors[f"{module}.weight_scale"] = scale.reshape(())
        tensors[f"{module}.input_scale"] = torch.tensor(0.05)
        meant[name] = tensors[name].float() * scale
    save_file(tensors, os.path.join(dst, "model.safetensors"))
    with open(os.path.join(dst, "config.json")) as f:
        config = json.load(f)
    config["quantization_config"] = {"quant_method": "fp8", "activation_scheme": "static"}
    with open(os.path.join(dst, "config.json"), "w") as f:
        json.dump(config, f)
    return meant


def _linears(llm):
    return {name: m for name, m in llm.llm_engine.runner.model.named_modules() if isinstance(m, _Linear)}


def test_fp8_checkpoint_loads_as_it_is(checkpoint_factory, tmp_path):
    """Per-tensor scales of q, k and v (gate and up) each reach their own rows of the fused weight."""
    meant = write_fp8_checkpoint(checkpoint_factory("llama"), str(tmp_path / "fp8"))
    llm = LLM(str(tmp_path / "fp8"), device="cpu", dtype="float32", enforce_eager=True)
    linears = _linears(llm)
    assert len(linears) == 8
    for name, layer in linears.items():
        assert layer.weight.dtype == FP8_DTYPE and layer.weight_scale.shape == (layer.weight.shape[0],)
        prefix, _, fused = name.rpartition(".")
        expected = torch.cat([meant[f"{prefix}.{part}.weight"] for part in FUSED[fused]])
        assert torch.equal(layer.weight.float() * layer.weight_scale[:, None], expected), name
    outs = llm.generate(random_prompts(2, 4, 20, seed=2), SamplingParams(temperature=0, max_tokens=6), use_tqdm=False)
    assert all(len(o.outputs[0].token_ids) == 6 for o in outs)
    # random weights of its shapes (benchmarks): float8, quantized from random 16-bit ones
    dummy = LLM(str(tmp_path / "fp8"), device="cpu", dtype="float32", enforce_eager=True, load_format="dummy")
    assert all(layer.weight.dtype == FP8_DTYPE for layer in _linears(dummy).values())
    assert dummy.generate([[5, 6, 7]], SamplingParams(max_tokens=3, ignore_eos=True), use_tqdm=False)[0].finished


def test_16_bit_weights_quantized_at_load(checkpoint_factory):
    """load_weights(..., quantization="fp8"): every decoder linear per output channel."""
    from transformers import AutoConfig

    from nanovllm.models.checkpoint import load_weights
    from nanovllm.models.registry import model_class
    path = checkpoint_factory("llama")
    hf = AutoConfig.from_pretrained(path)
    plain, quantized = (model_class(hf, 64)(hf) for _ in range(2))
    load_weights(plain, path)
    load_weights(quantized, path, quantization="fp8")
    x = torch.randn(5, hf.hidden_size)
    for name, layer in quantized.named_modules():
        if isinstance(layer, _Linear):
            reference = plain.get_submodule(name)
            assert layer.weight.dtype == FP8_DTYPE
            w = reference.weight
            assert ((layer.weight.float() * layer.weight_scale[:, None] - w).abs()
                    <= w.abs().amax(1, keepdim=True) * 2**-4).all()
            inputs = x if layer.weight.shape[1] == hf.hidden_size else torch.randn(5, layer.weight.shape[1])
            exact = reference(inputs)
            assert (layer(inputs) - exact).norm() < 0.06 * exact.norm(), name


def test_llm_quantization_fp8_on_a_16_bit_checkpoint(checkpoint_factory, monkeypatch):
    """Every linear in float8; each projection's input quantized where it is made (the MLP's
    activation, the RMSNorms), with the tokens the projections' own quantization gives."""
    from nanovllm.layers.activation import SiluAndMul
    from nanovllm.quantization import fp8_linear
    path = checkpoint_factory("llama")
    llm = LLM(path, device="cpu", dtype="float32", enforce_eager=True, quantization="fp8")
    assert all(m.weight.dtype == FP8_DTYPE for m in _linears(llm).values())
    mlps = [m for m in llm.llm_engine.runner.model.modules() if hasattr(m, "down_proj")]
    assert mlps and all(isinstance(m.act, fp8_linear.SiluAndMulToFp8) for m in mlps)
    for layer in llm.llm_engine.runner.model.model.layers:
        assert isinstance(layer.input_layernorm, fp8_linear.RMSNormToFp8)
        assert isinstance(layer.post_attention_layernorm, fp8_linear.RMSNormToFp8)
    prompts, params = random_prompts(3, 4, 20, seed=4), SamplingParams(temperature=0, max_tokens=8, logprobs=1)
    fused = llm.generate(prompts, params, use_tqdm=False)
    del llm
    monkeypatch.setattr(fp8_linear, "fuse_input_quantization", lambda model: None)
    unfused = LLM(path, device="cpu", dtype="float32", enforce_eager=True, quantization="fp8")
    assert all(isinstance(m.act, SiluAndMul) for m in unfused.llm_engine.runner.model.modules()
               if hasattr(m, "down_proj"))
    expected = unfused.generate(prompts, params, use_tqdm=False)
    for a, b in zip(fused, expected):
        assert a.outputs[0].token_ids == b.outputs[0].token_ids
        assert a.outputs[0].cumulative_logprob == b.outputs[0].cumulative_logprob
