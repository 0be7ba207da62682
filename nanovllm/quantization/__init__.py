"""Quantized weights and KV cache.

    quant_config.py   which quantization a model runs with (checkpoint's quantization_config, LLM's argument)
    install.py        which linears stay quantized; swapping their weights before loading
    packing.py        small integers packed into int32 words (GPTQ's, AWQ's and nanovllm's orders)
    int_linear.py     4/8-bit integer weights with group scales and mins: nanovllm's layout, matmul
    gptq.py, awq.py   those checkpoint formats' tensors -> nanovllm's layout
    gguf_format.py    GGUF's Q4_0 / Q4_1 / Q8_0 blocks -> nanovllm's layout
    fp8_linear.py     float8 e4m3 weights with per-channel scales, activations scaled per token
    kv_cache.py       the float8 KV cache: its dtype, scales and the torch reference of its store

docs/quantization.md explains the formats and what each costs.
"""
from nanovllm.quantization.quant_config import SUPPORTED_QUANTIZATION, QuantConfig, resolve_quant_config

__all__ = ["SUPPORTED_QUANTIZATION", "QuantConfig", "resolve_quant_config"]
