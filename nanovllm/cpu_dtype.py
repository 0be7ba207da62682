"""The dtype `dtype="auto"` picks. The checkpoint's (`dtype` in transformers 5, `torch_dtype` in
4.x) on a GPU, but for a float32 one (a GGUF file's config says float32) float16 as vLLM does,
or bfloat16 for Gemma 3, whose activations overflow float16. On a CPU (docs/cpu.md says why):
- 4-bit integer weights run in float32: their matmuls are bfloat16 inside torch's int4 kernel
  anyway, and the rest stays exact;
- another 16-bit or quantized checkpoint (a GGUF file's included) in bfloat16 where the CPU has
  bf16 instructions, else in float32;
- a float32 checkpoint stays float32.
"""
import torch

from nanovllm.config_checks import DTYPES


def auto_dtype(hf_config, device: str) -> torch.dtype:
    saved = getattr(hf_config, "dtype", None) or getattr(hf_config, "torch_dtype", None) or "float32"
    if isinstance(saved, str):
        saved = DTYPES.get(saved, torch.float32)
    if device == "cpu":
        return cpu_auto_dtype(saved, hf_config)
    if saved != torch.float32:
        return saved
    return torch.bfloat16 if getattr(hf_config, "model_type", None) in ("gemma3", "gemma3_text") else torch.float16


def cpu_auto_dtype(saved: torch.dtype, hf_config) -> torch.dtype:
    """`saved`: the checkpoint's dtype."""
    quantization = getattr(hf_config, "quantization_config", None) or {}
    if not isinstance(quantization, dict):
        quantization = quantization.to_dict()
    if quantization.get("bits", quantization.get("w_bit")) == 4:
        return torch.float32
    quantized = quantization or getattr(hf_config, "gguf_quantized", False)
    if saved != torch.float32 or quantized:
        return torch.bfloat16 if cpu_has_bf16_instructions() else torch.float32
    return saved


def cpu_has_bf16_instructions() -> bool:
    """AVX512-BF16 or AMX on x86 (Linux's /proc/cpuinfo flags), BF16 on Arm (Linux, macOS)."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = {word for line in f if line.startswith(("flags", "Features")) for word in line.split()}
        return bool(flags & {"avx512_bf16", "amx_bf16", "bf16"})
    except OSError:
        pass
    import platform
    import subprocess
    if platform.system() == "Darwin":
        out = subprocess.run(["sysctl", "-n", "hw.optional.arm.FEAT_BF16"], capture_output=True, text=True)
        return out.stdout.strip() == "1"
    return False
