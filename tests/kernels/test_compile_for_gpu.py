"""Every Triton kernel compiles for an H100 (sm_90), checked on a machine without a GPU.

The interpreter tests run the kernels' logic but not the compiler, which is stricter about
types (a loop-carried value changing type, an out-of-range constant, ...). Here each kernel
wrapper is called once under the interpreter, its launches are recorded (argument types,
constexpr values), and a separate Python process, in which @triton.jit kernels are real
JIT functions, compiles each launch for GPUTarget("cuda", 90, 32), also with bfloat16 in
place of float16 (the models' dtype, which the interpreter cannot run).
"""
import json
import os
import subprocess
import sys

import pytest
import torch

from nanovllm.kernels import triton_available

pytestmark = [pytest.mark.slow,  # compiles for sm_90 (minutes on 2 cores): in CI's slow pass
              pytest.mark.skipif(torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") != "1"
                                 or not triton_available(),
                                 reason="checks the compiler from the CPU interpreter's recordings")]

_TYPES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16", torch.int32: "i32",
          torch.int64: "i64", torch.bool: "i1", torch.uint8: "u8", torch.int8: "i8",
          torch.float8_e4m3fn: "fp8e4nv"}


def _launch_all_kernels():
    """One representative call of every kernel wrapper (small CPU inputs)."""
    from nanovllm import kernels
    from tests.kernels.test_kernels import make_paged_batch
    h = torch.float16
    x = torch.randn(5, 64, dtype=h)
    kernels.rms_norm(x, torch.ones(64, dtype=h), 1e-6)
    kernels.add_rms_norm(x, x.clone(), torch.ones(64, dtype=h), 1e-6)
    kernels.silu_and_mul(torch.randn(5, 96, dtype=h))
    qkv = torch.randn(5, 8 * 32, dtype=h)
    q, k, _ = qkv.split([4 * 32, 2 * 32, 2 * 32], dim=-1)
    cos_sin = torch.randn(16, 32)
    positions = torch.arange(5)
    kernels.rotary_(q.view(5, 4, 32), k.view(5, 2, 32), cos_sin, positions)
    kernels.rotary_(q.view(5, 4, 32), k.view(5, 2, 32), cos_sin, positions, torch.ones(32, dtype=h),
                    torch.ones(32, dtype=h), 1e-6)
    logits = torch.randn(3, 50, dtype=h)
    temperature, greedy = torch.ones(3), torch.tensor([False, True, False])
    keys = kernels.sampling_thresholds(logits, temperature, torch.tensor([5, 0, 0]), torch.tensor([1.0, 0.9, 0.5]),
                                       torch.tensor([0.0, 0.1, 0.0]))
    kernels.sampling_thresholds(logits, temperature, torch.tensor([5, 0, 3]), None, None)    # top-k only
    kernels.sampling_thresholds(logits, temperature, None, None, torch.tensor([0.0, 0.1, 0.2]))   # min-p only
    kernels.gumbel_sample(logits, temperature, greedy, 1)
    counts, seen = torch.zeros(3, 50), torch.zeros(3, 50, dtype=torch.bool)
    kernels.apply_penalties(logits, counts, seen, temperature, temperature, temperature)
    kernels.apply_penalties(logits, counts, None, None, temperature, temperature)
    kernels.apply_penalties(logits, counts, seen, temperature, None, None, torch.tensor([2, 0, 1]))
    kernels.logsumexp_and_rank(logits, torch.tensor([0, 4, 49]))
    kernels.logprobs_and_top_k(logits, torch.tensor([0, 4, 49]), 5)
    from nanovllm.kernels import logprobs       # k >= FLOOR_MIN_K: group maxima, then the floored kernel
    for wide in (torch.randn(2, 3000, dtype=h), torch.randn(2, 3000)):
        kernels.logprobs_and_top_k(wide, torch.tensor([0, 2999]), min(max(logprobs.FLOOR_MIN_K, 10), 16))
    kernels.greedy_sample(logits)
    kernels.gumbel_sample(logits, temperature, greedy, 1, keys)
    batch = make_paged_batch([20, 9], [5, 1], 4, 2, 32, 16, dtype=h)
    kernels.paged_prefill_attention(batch["q"], batch["k_cache"], batch["v_cache"], batch["cu_seqlens_q"],
                                    batch["seq_lens"], batch["block_tables"], 5, 0.2)
    decode = make_paged_batch([20, 9], [1, 1], 4, 2, 32, 16, dtype=h)
    for splits in (1, 2):
        kernels.paged_decode_attention(decode["q"], decode["k_cache"], decode["v_cache"], decode["seq_lens"],
                                       decode["block_tables"], 0.2, num_splits=splits)
    kernels.quantize_rows_fp8(torch.randn(3, 64, dtype=h))
    kernels.quantize_rows_fp8(torch.randn(1, 9000, dtype=h))        # two passes
    kernels.silu_and_mul_fp8(torch.randn(5, 96, dtype=h))
    kernels.rms_norm_fp8(x, torch.ones(64, dtype=h), 1e-6)
    kernels.add_rms_norm_fp8(x, x.clone(), torch.ones(64, dtype=h), 1e-6)
    kernels.silu_and_mul_fp8(torch.randn(1, 18000, dtype=h))        # two passes
    kv = torch.randn(3, 2, 32, dtype=h)
    kernels.store_kv_cache(kv, kv, torch.zeros(2, 16, 2, 32, dtype=h), torch.zeros(2, 16, 2, 32, dtype=h),
                           torch.tensor([0, 5, -1]))


def _arg_type(value):
    if isinstance(value, torch.Tensor):
        return "*" + _TYPES[value.dtype]
    if isinstance(value, bool):
        return "i1"
    if isinstance(value, int):
        return "i32" if -2**31 <= value < 2**31 else "i64"
    if isinstance(value, float):
        return "fp32"
    raise TypeError(f"no Triton type for {value!r}")


def _record_launches(monkeypatch) -> list[dict]:
    import inspect

    import triton.language as tl
    from triton.runtime.interpreter import InterpretedFunction
    launches, run = [], InterpretedFunction.run

    def recording_run(self, *args, grid, warmup, **kwargs):
        params = inspect.signature(self.fn).parameters
        bound = dict(zip(self.arg_names, args), **kwargs)
        signature, constexprs = {}, {}
        for name, param in params.items():
            value = bound[name] if name in bound else param.default
            if param.annotation in (tl.constexpr, "tl.constexpr"):
                signature[name], constexprs[name] = "constexpr", value
            else:
                signature[name] = _arg_type(value)
        launches.append(dict(module=self.fn.__module__, name=self.fn.__name__, signature=signature,
                             constexprs=constexprs))
        return run(self, *args, grid=grid, warmup=warmup, **kwargs)

    monkeypatch.setattr(InterpretedFunction, "run", recording_run)
    _launch_all_kernels()
    unique = {json.dumps(launch, sort_keys=True) for launch in launches}
    with_bf16 = {u.replace('"*fp16"', '"*bf16"') for u in unique}
    return [json.loads(u) for u in sorted(unique | with_bf16)]


_COMPILE = """
import importlib, json, sys, warnings
warnings.filterwarnings("ignore")
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
for launch in json.load(sys.stdin):
    kernel = getattr(importlib.import_module(launch["module"]), launch["name"])
    try:
        triton.compile(ASTSource(fn=kernel, signature=launch["signature"], constexprs=launch["constexprs"]),
                       target=GPUTarget("cuda", 90, 32))
    except Exception as e:
        print(f"FAILED {launch['module']}.{launch['name']} {launch['signature']}: {e}")
print("compiled", flush=True)
"""


def test_every_kernel_compiles_for_sm90(monkeypatch):
    launches = _record_launches(monkeypatch)
    names = {launch["name"] for launch in launches}
    assert len(names) >= 9, names          # every kernel above was launched
    # each also launched early (pdl.py), as on an H100 (the interpreter runs them with PDL off)
    launches += [{**launch, "constexprs": {**launch["constexprs"], "PDL": True}}
                 for launch in launches if launch["constexprs"].get("PDL") is False]
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    done = subprocess.run([sys.executable, "-c", _COMPILE], input=json.dumps(launches), env=env,
                          capture_output=True, text=True, timeout=240)
    failures = [line for line in done.stdout.splitlines() if line.startswith("FAILED")]
    assert done.returncode == 0 and "compiled" in done.stdout, done.stderr[-3000:]
    assert not failures, "\n".join(failures)


_COMPILE_GLUON = """
import itertools, warnings
warnings.filterwarnings("ignore")
import triton
from triton.backends.compiler import GPUTarget
from triton.experimental.gluon._runtime import GluonASTSource
from nanovllm.kernels import w4a16_gemv
kernel = w4a16_gemv._w4a16_gemv_gluon_kernel
types = dict(x_ptr="*i32", qweight_ptr="*i32", scales_ptr="*bf16", mins_ptr="*bf16", out_ptr="*bf16",
             partials_ptr="*fp32", counters_ptr="*i32")
for (group_size, K), (rows, sn, warps, split, pdl), gated in itertools.product(
        [(32, 576), (64, 1536), (128, 2048), (256, 1024)], [(1, 4, 4, True, True), (2, 2, 8, False, False)],
        [False, True]):
    shape = w4a16_gemv.gemv_shape(group_size, K, warps)
    constexprs = dict(GROUP_SIZE=group_size, R=rows, SN=sn, SPLIT=split, GATED=gated, PDL=pdl, **shape)
    signature = {name: "constexpr" if name in constexprs else types.get(name, "i32") for name in kernel.arg_names}
    try:
        ptx = triton.compile(GluonASTSource(kernel, signature, constexprs), target=GPUTarget("cuda", 90, 32),
                             options={"num_warps": warps}).asm["ptx"]
        assert ("griddepcontrol.wait" in ptx) == pdl, "waits for the kernel ahead exactly when launched early"
    except Exception as e:
        print(f"FAILED {constexprs}: {str(e)[-500:]}")
print("compiled", flush=True)
"""


def test_gluon_gemv_compiles_for_sm90():
    """The Gluon GEMV (no interpreter can run it) compiles for an H100 for each kind of group it
    takes (32, 64, 128 and a multiple of 128 values, the last walked 128 at a time), at 1 and 2
    rows, with and without split-K and early launch, with and without the gated activation;
    tests/gpu checks its results."""
    from nanovllm.kernels import w4a16_gemv
    if not w4a16_gemv.gluon_available():
        pytest.skip("this triton has no Gluon")
    _compile_in_a_process(_COMPILE_GLUON)


_COMPILE_GLUON_MMA = """
import itertools, warnings
warnings.filterwarnings("ignore")
import triton
from triton.backends.compiler import GPUTarget
from triton.experimental.gluon._runtime import GluonASTSource
from nanovllm.kernels import w4a16_mma
kernel = w4a16_mma._w4a16_mma_kernel
types = dict(x_ptr="*bf16", qweight_ptr="*i32", scales_ptr="*bf16", mins_ptr="*bf16", out_ptr="*bf16",
             partials_ptr="*fp32", counters_ptr="*i32")
for (group_size, K), (rows, t, split, pdl) in itertools.product(
        [(32, 576), (64, 1536), (128, 2048), (2048, 2048)],
        [(8, 2, True, True), (16, 1, False, False), (32, 2, True, True), (64, 2, True, False)]):
    nb = w4a16_mma.step_values(group_size, K) // 16
    constexprs = dict(L3=w4a16_mma.words_layout(nb, t), XB=w4a16_mma.x_layout(nb), GROUP_SIZE=group_size, NB=nb,
                      T=t, MN=rows, SPLIT=split, PDL=pdl)
    signature = {name: "constexpr" if name in constexprs else types.get(name, "i32") for name in kernel.arg_names}
    try:
        ptx = triton.compile(GluonASTSource(kernel, signature, constexprs), target=GPUTarget("cuda", 90, 32),
                             options={"num_warps": 4}).asm["ptx"]
        assert "wgmma.mma_async" in ptx, "no warpgroup MMA"
        assert ("griddepcontrol.wait" in ptx) == pdl, "waits for the kernel ahead exactly when launched early"
    except Exception as e:
        print(f"FAILED {group_size, K, rows, t, split, pdl}: {str(e)[-500:]}")
print("compiled", flush=True)
"""


def test_gluon_mma_compiles_for_sm90():
    """The Gluon tensor-core kernel (w4a16_mma.py) compiles for an H100 for groups of 32, 64, 128
    values and per channel, 8 to 64 rows, 64 or 128 columns a program, with and without split-K and
    early launch. Compiling also proves what the kernel's speed rests on: the unpacked weights are
    already in the layout of wgmma's A operand (its convert_layout asserts that no data moves);
    tests/gpu checks its results."""
    from nanovllm.kernels import w4a16_mma
    if not hasattr(w4a16_mma, "_w4a16_mma_kernel"):
        pytest.skip("this triton has no Gluon for Hopper")
    _compile_in_a_process(_COMPILE_GLUON_MMA)


def _compile_in_a_process(script: str) -> None:
    """Run a compile script where TRITON_INTERPRET is unset (Gluon and real JIT functions)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=240)
    failures = [line for line in done.stdout.splitlines() if line.startswith("FAILED")]
    assert done.returncode == 0 and "compiled" in done.stdout, done.stderr[-3000:]
    assert not failures, "\n".join(failures)
