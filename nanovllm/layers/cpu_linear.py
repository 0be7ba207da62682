"""`linear`: F.linear, with float32 on a CPU sent to oneDNN (docs/cpu.md)."""
import functools

import torch
import torch.nn.functional as F


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear, except in float32 on a CPU: there oneDNN's matmul (the one torch already uses
    for bfloat16) instead of the default BLAS, which reads a weight of many output rows at under
    half the speed with few input rows (SmolLM2's LM head, one row: 10.1 vs 4.0 ms; docs/cpu.md).
    A compiled graph keeps F.linear: Inductor chooses its own matmuls (and cannot lower this op).
    So do tiny weights (the test models'), for which oneDNN's ~15 us a call costs more than it saves."""
    if (x.dtype == torch.float32 and x.device.type == "cpu" and weight.dtype == torch.float32
            and weight.numel() >= 1 << 16 and not torch.compiler.is_compiling() and _onednn_here()):
        lead = x.shape[:-1]
        y = torch.ops.mkldnn._linear_pointwise(x.reshape(-1, x.shape[-1]), weight, bias, "none", [], "")
        return y.reshape(*lead, y.shape[-1])
    return F.linear(x, weight, bias)


@functools.cache
def _onednn_here() -> bool:
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")
