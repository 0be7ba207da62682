"""The float8-cache decode kernel's code for sm_90, checked on a machine without a GPU.

What made a float8 cache slower than a bf16 one was in the generated code, not in the results:
a second, scalar, float16 -> bfloat16 conversion of every cached value, and a value tile
transposed in shared memory one byte per load. This compiles the decode kernel as a bfloat16
model launches it (the launch recorded under the interpreter, then compiled for
GPUTarget("cuda", 90, 32) in a process without TRITON_INTERPRET) and reads the PTX.
"""
import json
import os
import re
import subprocess
import sys

import pytest
import torch

from nanovllm.kernels import triton_available

pytestmark = [pytest.mark.slow,  # compiles for sm_90 (minutes on 2 cores): in CI's slow pass
              pytest.mark.skipif(torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") != "1"
                                 or not triton_available(),
                                 reason="checks the compiler from the CPU interpreter's recordings")]

_COMPILE_PTX = """
import importlib, json, sys, warnings
warnings.filterwarnings("ignore")
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
launch = json.load(sys.stdin)
kernel = getattr(importlib.import_module(launch["module"]), launch["name"])
compiled = triton.compile(ASTSource(fn=kernel, signature=launch["signature"], constexprs=launch["constexprs"]),
                          target=GPUTarget("cuda", 90, 32))
sys.stdout.write(compiled.asm["ptx"])
"""


def _bf16_decode_launch(monkeypatch, config):
    from nanovllm.kernels import paged_decode_attention
    from tests.kernels import test_compile_for_gpu as compile_check
    from tests.kernels.test_kernels import make_paged_batch

    def launch():
        batch = make_paged_batch([40, 9], [1, 1], 4, 2, 64, 16, torch.bfloat16, cache_dtype=torch.float8_e4m3fn)
        # a float32 output: the interpreter cannot store bfloat16 (irrelevant here: only the launch counts)
        paged_decode_attention(batch["q"], batch["k_cache"], batch["v_cache"], batch["seq_lens"],
                               batch["block_tables"], 0.2, num_splits=1, out=torch.empty(2, 4, 64),
                               k_scale=torch.tensor([0.5]), v_scale=torch.tensor([0.5]), config=config)

    monkeypatch.setitem(compile_check._TYPES, torch.float8_e4m3fn, "fp8e4nv")
    monkeypatch.setattr(compile_check, "_launch_all_kernels", launch)
    launches = [x for x in compile_check._record_launches(monkeypatch) if x["name"] == "_decode_split_kernel"
                and x["signature"]["q_ptr"] == "*bf16"]
    assert len(launches) == 1
    return launches[0]


def _ptx(launch) -> str:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    done = subprocess.run([sys.executable, "-c", _COMPILE_PTX], input=json.dumps(launch), env=env,
                          capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def test_float8_decode_converts_pairwise_to_float16_and_transposes_16_bit_pairs(monkeypatch):
    launch = _bf16_decode_launch(monkeypatch, None)
    assert launch["constexprs"]["FP16_MMA"] and launch["constexprs"]["V_PAIRS"]
    launch["constexprs"]["INLINE_ASM"] = True       # as on a GPU (the recording ran in the interpreter)
    ptx = _ptx(launch)
    assert "cvt.rn.f16x2.e4m3x2" in ptx
    assert not re.search(r"cvt(\.\w+)*\.bf16\.f16", ptx), "a float16 -> bfloat16 conversion per value"
    assert not re.search(r"ld\.shared(\.\w+)*\.[bu]8\b", ptx), "byte-wise shared-memory loads"
    assert re.search(r"ldmatrix\.sync\.aligned\.m8n8\.x\d\.trans\.shared\.b16", ptx)
    assert "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32" in ptx


def test_without_value_pairs_the_tile_is_transposed_bytewise(monkeypatch):
    """What V_PAIRS avoids (so that the check above can fail)."""
    launch = _bf16_decode_launch(monkeypatch, {"V_PAIRS": False})
    assert not launch["constexprs"]["V_PAIRS"]
    assert re.search(r"ld\.shared(\.\w+)*\.[bu]8\b", _ptx(launch))
