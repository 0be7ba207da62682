"""Programmatic dependent launch (kernels/pdl.py) in the code compiled for sm_90, without a GPU.

A kernel launched early must not write memory before it waits for the kernel ahead
(`griddepcontrol.wait`), nor read what that kernel writes, and lets the next one launch only after
that. Before it waits the W4A16 GEMV only prefetches its weights, the rotary kernel reads the
positions and its cos/sin table, and decode attention reads the lengths and block tables and
prefetches keys and values; the others touch no memory. Each launch is recorded under the interpreter (where
PDL is off), switched on, and compiled for GPUTarget("cuda", 90, 32)."""
import re

import pytest
import torch

from nanovllm.kernels import triton_available

pytestmark = [pytest.mark.slow,  # compiles for sm_90 (minutes on 2 cores): in CI's slow pass
              pytest.mark.skipif(torch.cuda.is_available() or not triton_available(),
                                 reason="checks the compiler from the CPU interpreter's recordings")]

MEMORY_ACCESS = re.compile(r"^\s*(@%p\d+\s+)?(ld\.global|cp\.async\.|st\.global|atom\.|red\.)", re.M)
WRITE = re.compile(r"^\s*(@%p\d+\s+)?(st\.global|atom\.|red\.)", re.M)
LOAD = re.compile(r"^\s*(@%p\d+\s+)?ld\.global", re.M)
# Kernels that read inputs written before the kernel ahead ran, before they wait for it (pdl.py)
READ_BEFORE_WAITING = {"_rotary_kernel", "_decode_split_kernel"}


def _recorded(monkeypatch, launch_kernels) -> dict[str, dict]:
    """The bfloat16 launch of each kernel `launch_kernels` calls, by name, with PDL switched on."""
    from tests.kernels import test_compile_for_gpu as compile_check
    monkeypatch.setattr(compile_check, "_launch_all_kernels", launch_kernels)
    launches = {}
    for launch in compile_check._record_launches(monkeypatch):
        if "*fp16" not in launch["signature"].values():
            assert launch["constexprs"]["PDL"] is False     # never on under the interpreter
            launch["constexprs"]["PDL"] = True
            launches.setdefault(launch["name"], launch)
    return launches


def _gemv():
    from nanovllm.kernels.w4a16_gemm import w4a16_gemm
    from tests.kernels.test_w4a16_gemm import random_quantized
    qweight, scales, mins, _ = random_quantized(64, 512, 4, 128, False, torch.float16)
    w4a16_gemm(torch.randn(1, 512, dtype=torch.float16), qweight, scales, mins, 4, 128, split_k=2,
               config={"GEMV": True})


def test_gemv_prefetches_its_weights_then_waits_before_any_other_memory_access(monkeypatch):
    from tests.kernels.test_fp8_codegen import _ptx
    launch = _recorded(monkeypatch, _gemv)["_w4a16_gemv_kernel"]
    assert launch["constexprs"]["SPLIT"]           # the partials and the arrival counter too
    ptx = _ptx(launch)
    wait = ptx.index("griddepcontrol.wait")
    assert ptx[:wait].count("prefetch.global.L2") >= 3        # words, scales, mins
    assert not MEMORY_ACCESS.search(ptx[:wait]), MEMORY_ACCESS.search(ptx[:wait]).group(0)
    after = [m.group(2) for m in MEMORY_ACCESS.finditer(ptx[wait:])]
    assert {"cp.async.", "atom."} <= set(after), after
    launch["constexprs"]["PDL"] = False
    assert "griddepcontrol" not in (off := _ptx(launch)) and "prefetch" not in off


def _decode_chain():
    """The other kernels of a decode step's layer, each launched once."""
    from nanovllm import kernels
    from tests.kernels.test_kernels import make_paged_batch
    h = torch.float16
    x = torch.randn(3, 64, dtype=h)
    kernels.rms_norm(x, torch.ones(64, dtype=h), 1e-6)
    kernels.silu_and_mul(torch.randn(3, 96, dtype=h))
    qk = torch.randn(3, 6, 32, dtype=h)
    kernels.rotary_(qk[:, :4], qk[:, 4:], torch.randn(16, 32), torch.arange(3))
    decode = make_paged_batch([20, 9], [1, 1], 4, 2, 32, 16, dtype=h)
    kernels.store_kv_cache(decode["q"][:, :2], decode["q"][:, 2:], decode["k_cache"], decode["v_cache"],
                           torch.tensor([3, 40]))
    kernels.paged_decode_attention(decode["q"], decode["k_cache"], decode["v_cache"], decode["seq_lens"],
                                   decode["block_tables"], 0.2, num_splits=2)


@pytest.mark.parametrize("name", ["_rms_norm_kernel", "_silu_and_mul_kernel", "_rotary_kernel", "_store_kv_kernel",
                                  "_decode_split_kernel", "_decode_merge_kernel", "_w4a16_gemv_kernel"])
def test_each_kernel_waits_before_touching_memory_then_lets_the_next_launch(monkeypatch, name):
    from tests.kernels.test_fp8_codegen import _ptx
    launch = _recorded(monkeypatch, lambda: (_decode_chain(), _gemv()))[name]
    ptx = _ptx(launch)
    wait, signal = ptx.index("griddepcontrol.wait"), ptx.index("griddepcontrol.launch_dependents")
    assert wait < signal
    early = WRITE if name in READ_BEFORE_WAITING else MEMORY_ACCESS
    assert not early.search(ptx[:wait]), early.search(ptx[:wait]).group(0)
    assert MEMORY_ACCESS.search(ptx[wait:])


def test_rotary_and_decode_attention_read_their_inputs_before_waiting(monkeypatch):
    """The rotary kernel reads the position and cos/sin (3 loads) and decode attention the length
    and block table (2) and prefetches its first tile's keys and values before waiting; their
    other loads (q, k, v, the cache) come after it."""
    from tests.kernels.test_fp8_codegen import _ptx
    launches = _recorded(monkeypatch, _decode_chain)
    for name, loads_first in (("_rotary_kernel", 3), ("_decode_split_kernel", 2)):
        ptx = _ptx(launches[name])
        wait = ptx.index("griddepcontrol.wait")
        assert len(LOAD.findall(ptx[:wait])) == loads_first, (name, LOAD.findall(ptx[:wait]))
        assert LOAD.search(ptx[wait:]) and WRITE.search(ptx[wait:])
    decode = _ptx(launches["_decode_split_kernel"])
    assert decode[:decode.index("griddepcontrol.wait")].count("prefetch.global.L2") >= 2


def test_with_the_early_launches_off_no_launch_option_is_passed(monkeypatch):
    """triton before 3.4 refuses an unknown launch option (`launch_pdl`): off, it is not given."""
    from triton.runtime.interpreter import InterpretedFunction
    options, run = [], InterpretedFunction.run

    def recording_run(self, *args, grid, warmup, **kwargs):
        options.append((self.fn.__name__, set(kwargs)))
        return run(self, *args, grid=grid, warmup=warmup, **kwargs)
    monkeypatch.setattr(InterpretedFunction, "run", recording_run)
    _decode_chain()
    _gemv()
    assert len({name for name, _ in options}) == 7
    assert all("launch_pdl" not in given and "PDL" in given for _, given in options), options
