"""EngineConfig's argument checks that run before the model is looked at: a wrong type or a
bad NANOVLLM_CPU_KVCACHE_GIB is a ValueError naming it (no model is needed to see them)."""
import re

import numpy as np
import pytest
import torch

from nanovllm.config import EngineConfig


@pytest.mark.parametrize("value", ["x", None, True, [0.5], float("nan"), 0, 1.5])
def test_gpu_memory_utilization(value):
    with pytest.raises(ValueError, match=r"^gpu_memory_utilization must be a number in \(0, 1\], got "):
        EngineConfig("no-model-needed", gpu_memory_utilization=value)


@pytest.mark.parametrize("value", ["abc", 1.5, True, 2**64, -2**63 - 1])
def test_seed(value):
    with pytest.raises(ValueError, match=r"^seed must be an integer in \[-2\*\*63, 2\*\*64\), got "):
        EngineConfig("no-model-needed", seed=value)


@pytest.mark.parametrize("name, value", [
    ("block_size", 3), ("block_size", 512), ("block_size", 0), ("block_size", 16.0), ("block_size", True),
    ("calculate_kv_scales", "yes"), ("calculate_kv_scales", 1),
    ("enforce_eager", "False"), ("trust_remote_code", 0), ("disable_log_stats", None),
    ("enable_prefix_caching", "false"), ("enable_chunked_prefill", 1),
    ("tensor_parallel_size", 0), ("data_parallel_size", -1), ("max_num_seqs", True), ("max_num_seqs", 2.0),
    ("max_model_len", 0), ("max_num_batched_tokens", "4096"), ("num_gpu_blocks_override", 1.5)])
def test_range_checks_name_the_argument(name, value):
    with pytest.raises(ValueError, match=rf"^{name} must be .*, got {re.escape(repr(value))}\.$"):
        EngineConfig("no-model-needed", **{name: value})


def test_ranges_accept_their_valid_values():
    from nanovllm.config_checks import RANGES
    valid = dict(block_size=[1, 16, 256, np.int64(32)], calculate_kv_scales=[True, False],
                 tensor_parallel_size=[1, 2], data_parallel_size=[1, 8], max_num_seqs=[1, 256],
                 max_model_len=[None, 1, 4096], max_num_batched_tokens=[None, 8192],
                 num_gpu_blocks_override=[None, 7], gpu_memory_utilization=[0.5, 1], seed=[0, -2**63],
                 enforce_eager=[True, False], trust_remote_code=[True, False], disable_log_stats=[True, False],
                 enable_prefix_caching=[None, True, False], enable_chunked_prefill=[None, True, False])
    assert set(valid) == set(RANGES)
    for name, values in valid.items():
        for value in values:
            assert RANGES[name][0](value), (name, value)


@pytest.mark.parametrize("value", ["0", "abc", "-1", "nan", "inf"])
def test_cpu_kv_cache_gib_variable(value, monkeypatch):
    monkeypatch.setenv("NANOVLLM_CPU_KVCACHE_GIB", value)
    with pytest.raises(ValueError) as info:
        EngineConfig("no-model-needed", device="cpu")
    message = str(info.value)
    assert message.startswith("NANOVLLM_CPU_KVCACHE_GIB must be a positive number of GiB") and repr(value) in message
    assert "gpu_memory_utilization" not in message


def test_valid_values_pass_the_checks(monkeypatch):
    """Valid values get past the argument checks (to the model lookup, which fails here)."""
    from nanovllm.engine.kv_cache_memory import cpu_kv_cache_gib
    monkeypatch.setenv("NANOVLLM_CPU_KVCACHE_GIB", "0.5")
    assert cpu_kv_cache_gib() == 0.5
    monkeypatch.setenv("NANOVLLM_CPU_KVCACHE_GIB", "")        # empty: no cap (sized to need)
    assert cpu_kv_cache_gib() is None
    for kwargs in (dict(gpu_memory_utilization=np.float32(0.5), seed=np.int64(3)), dict(seed=None),
                   dict(gpu_memory_utilization=1, seed=2**64 - 1), dict(dtype=torch.float16)):
        with pytest.raises(Exception) as info:
            EngineConfig("/no/such/model/dir", **kwargs)
        assert not any(name in str(info.value) for name in ("gpu_memory_utilization", "seed", "dtype"))
    with pytest.raises(ValueError, match="dtype must be one of"):
        EngineConfig("/no/such/model/dir", dtype=torch.float8_e4m3fn)
