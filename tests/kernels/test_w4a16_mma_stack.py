"""The Gluon tensor-core kernel's default settings keep every value in registers: no stack, no
spills to local memory (slower, and a CUDA context reserves local memory for its largest user).
Compiled for sm_90 with the installed triton, on any machine: with triton 3.6 the 128-column
program at 32 rows had a 288-byte stack, with 3.9 none. Its results are tested in tests/gpu."""
import pytest

from tests.kernels.test_compile_for_gpu import _compile_in_a_process

_NO_STACK = """
import itertools, os, re, subprocess, tempfile, warnings
warnings.filterwarnings("ignore")
import triton
from triton.backends.compiler import GPUTarget
from triton.experimental.gluon._runtime import GluonASTSource
from nanovllm.kernels import w4a16_mma
kernel = w4a16_mma._w4a16_mma_kernel
cuobjdump = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
types = dict(x_ptr="*bf16", qweight_ptr="*i32", scales_ptr="*bf16", mins_ptr="*bf16", out_ptr="*bf16",
             partials_ptr="*fp32", counters_ptr="*i32")
rows = range(w4a16_mma.GLUON_MMA_MIN_ROWS, w4a16_mma.GLUON_MMA_MAX_ROWS + 1)
# (with split-K only: its epilogue holds the most registers, ptxas counted no fewer with it at any setting)
for (group_size, K), M in itertools.product([(32, 576), (64, 1536), (128, 2048)],
                                            sorted({max(8, triton.next_power_of_2(m)) for m in rows})):
    constexprs = dict(w4a16_mma.launch_constexprs(M, K, group_size), SPLIT=True, PDL=True)
    signature = {name: "constexpr" if name in constexprs else types.get(name, "i32") for name in kernel.arg_names}
    cubin = triton.compile(GluonASTSource(kernel, signature, constexprs), target=GPUTarget("cuda", 90, 32),
                           options={"num_warps": 4}).asm["cubin"]
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        usage = subprocess.run([cuobjdump, "-res-usage", f.name], capture_output=True, text=True).stdout
    found = re.search(r"REG:\\d+ STACK:(\\d+) .*LOCAL:(\\d+)", usage)
    if found is None or found.groups() != ("0", "0"):
        print(f"FAILED group {group_size}, {M} rows, T {constexprs['T']}: "
              f"{found.group(0) if found else usage!r}")
print("compiled", flush=True)
"""


def test_default_settings_spill_nothing():
    from nanovllm.kernels import w4a16_mma
    if not hasattr(w4a16_mma, "_w4a16_mma_kernel"):
        pytest.skip("this triton has no Gluon for Hopper")
    _compile_in_a_process(_NO_STACK)
