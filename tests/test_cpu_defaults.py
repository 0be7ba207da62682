"""What runs by default on a CPU: the dtype "auto" picks (docs/cpu.md) and the KV cache's size."""
import pytest
import torch

import nanovllm.cpu_dtype as cpu_dtype_module
from nanovllm import LLM
from nanovllm.config import resolve_dtype
from nanovllm.engine.kv_cache_memory import block_bytes


class Config:
    def __init__(self, dtype, **extra):
        self.dtype = dtype
        self.__dict__.update(extra)


@pytest.mark.parametrize("bf16_instructions", [True, False])
def test_auto_dtype_on_a_cpu(monkeypatch, bf16_instructions):
    monkeypatch.setattr(cpu_dtype_module, "cpu_has_bf16_instructions", lambda: bf16_instructions)
    half = torch.bfloat16 if bf16_instructions else torch.float32
    assert resolve_dtype("auto", Config("float32"), "cpu") == torch.float32          # asked for by the file
    assert resolve_dtype("auto", Config("bfloat16"), "cpu") == half
    assert resolve_dtype("auto", Config("float16"), "cpu") == half                   # float16 prefill is slow on CPUs
    assert resolve_dtype("auto", Config("float32", gguf_quantized=True), "cpu") == half
    assert resolve_dtype("auto", Config("float32", quantization_config={"quant_method": "gptq"}), "cpu") == half
    for four_bits in ({"quant_method": "gguf", "bits": 4}, {"quant_method": "awq", "w_bit": 4}):   # int4 kernel
        assert resolve_dtype("auto", Config("float16", quantization_config=four_bits), "cpu") == torch.float32
    assert resolve_dtype("auto", Config("float16", quantization_config={"quant_method": "gptq", "bits": 8}),
                         "cpu") == half
    assert resolve_dtype("auto", Config("float16"), "cuda") == torch.float16        # the GPU keeps the file's
    assert resolve_dtype("auto", Config("bfloat16"), "cuda") == torch.bfloat16
    assert resolve_dtype("auto", Config("float32"), "cuda") == torch.float16        # but float32: vLLM's rule
    assert resolve_dtype("auto", Config("float32", model_type="gemma3_text"), "cuda") == torch.bfloat16
    assert resolve_dtype("float32", Config("float32"), "cuda") == torch.float32     # unless asked for
    assert resolve_dtype("float16", Config("bfloat16"), "cpu") == torch.float16      # an explicit dtype wins


def test_cpu_kv_cache_is_sized_to_need_and_refuses_clearly(tiny_qwen3, monkeypatch):
    monkeypatch.delenv("NANOVLLM_CPU_KVCACHE_GIB", raising=False)
    llm = LLM(tiny_qwen3, device="cpu", max_model_len=256, max_num_seqs=3, block_size=16)
    assert llm.llm_engine.block_manager.num_blocks == 3 * 256 // 16       # what 3 full-length sequences need
    runner = llm.llm_engine.runner
    one_sequence_gib = 256 // 16 * block_bytes(runner) / 2**30
    monkeypatch.setenv("NANOVLLM_CPU_KVCACHE_GIB", str(one_sequence_gib * 0.9))
    with pytest.raises(ValueError, match="less than one sequence of max_model_len=256"):
        LLM(tiny_qwen3, device="cpu", max_model_len=256)
    monkeypatch.setenv("NANOVLLM_CPU_KVCACHE_GIB", str(one_sequence_gib * 1.5))
    assert LLM(tiny_qwen3, device="cpu", max_model_len=256).llm_engine.block_manager.num_blocks == 24   # the cap


def test_the_cpu_kv_cache_takes_memory_only_as_it_is_written(tiny_qwen3, monkeypatch):
    def resident_mib():
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * 4096 / 2**20
    before = resident_mib()
    llm = LLM(tiny_qwen3, device="cpu", max_model_len=1024, max_num_seqs=256)
    cache = llm.llm_engine.runner.kv_cache
    cache_mib = cache.numel() * cache.element_size() / 2**20
    assert cache_mib > 100
    assert resident_mib() - before < cache_mib / 2     # untouched: (almost) nothing of it resident
