"""Kernel tests run on the GPU when there is one, else in Triton's CPU interpreter.

TRITON_INTERPRET=1 must be set before triton itself is imported: `@triton.jit` reads it when
a function is decorated, and triton's own library functions (tl.sum, tl.max, tl.cdiv, ...)
are decorated when `triton.language` is imported. nanovllm.kernels imports triton lazily,
on first use of a kernel, so setting it here is early enough even when other tests imported
nanovllm first, provided nothing imported triton before this file ran. When something did,
the kernel tests fail with a message saying so (set TRITON_INTERPRET=1 in the environment,
or in the top-level tests/conftest.py, to avoid it).
"""
import os
import sys

import pytest
import torch

_TOO_LATE = None
if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
    if "triton.language" in sys.modules:
        _TOO_LATE = ("triton was imported before tests/kernels/conftest.py could set "
                     "TRITON_INTERPRET=1, so its kernels cannot run in the CPU interpreter: "
                     "set TRITON_INTERPRET=1 in the environment or in tests/conftest.py")
    os.environ["TRITON_INTERPRET"] = "1"


@pytest.fixture(autouse=True)
def _triton_mode_check():
    if _TOO_LATE:
        pytest.fail(_TOO_LATE)
