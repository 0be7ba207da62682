"""EngineConfig's argument checks that run before the model is looked at: a wrong type or a
bad NANOVLLM_CPU_KVCACHE_GIB is a ValueError naming it (no model is needed to see them)."""
import numpy as np
import pytest

from nanovllm.config import EngineConfig


@pytest.mark.parametrize("value", ["x", None, True, [0.5], float("nan"), 0, 1.5])
def test_gpu_memory_utilization(value):
    with pytest.raises(ValueError, match=r"^gpu_memory_utilization must be a number in \(0, 1\], got "):
        EngineConfig("no-model-needed", gpu_memory_utilization=value)


@pytest.mark.parametrize("value", ["abc", 1.5, True, 2**64, -2**63 - 1])
def test_seed(value):
    with pytest.raises(ValueError, match=r"^seed must be an integer in \[-2\*\*63, 2\*\*64\), got "):
        EngineConfig("no-model-needed", seed=value)


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
                   dict(gpu_memory_utilization=1, seed=2**64 - 1)):
        with pytest.raises(Exception) as info:
            EngineConfig("/no/such/model/dir", **kwargs)
        assert "gpu_memory_utilization" not in str(info.value) and "seed" not in str(info.value)
