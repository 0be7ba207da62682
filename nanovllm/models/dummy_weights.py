"""load_format="dummy": random weights of a model's shapes, so benchmarks need no checkpoint."""
import dataclasses

import torch
from torch import nn

from nanovllm.quantization import QuantConfig
from nanovllm.quantization.install import finish_quantized_linears, quantize_linears


def init_dummy_weights(model: nn.Module, seed: int = 0, quant: QuantConfig | None = None) -> None:
    """load_format="dummy": random weights of the right shapes (benchmarks need no checkpoint).
    Small values keep activations finite; norms stay at one. With `quant` the decoder's linears
    are quantized: FP8 from the random 16-bit weights; GPTQ/AWQ/GGUF as random integers whose
    scales and zeros give weights in the same small range."""
    if quant is not None and quant.method == "fp8":
        quant = dataclasses.replace(quant, serialized=False)   # float8 from the random 16-bit weights
    if quant is not None:
        quantize_linears(model, quant, None)
    for i, (name, p) in enumerate(model.named_parameters()):
        gen = torch.Generator(device=p.device).manual_seed(seed + i)
        kind = name.rsplit(".", 1)[-1]
        if "norm" in name:
            p.data.fill_(1.0)
        elif kind == "qweight":             # every bit of every int32 word random
            p.data.copy_(torch.randint(-2**31, 2**31, p.shape, generator=gen, device=p.device))
        elif kind == "g_idx":               # contiguous groups, as create_weights made them
            continue
        elif kind in ("scales", "qzeros", "mins"):
            middle = 2 ** (quant.bits - 1)  # weights (q - middle) * scale in [-0.02, 0.02)
            p.data.fill_({"scales": 0.02 / middle, "qzeros": middle, "mins": -0.02}[kind])
        else:
            p.data.uniform_(-0.02, 0.02, generator=gen)
    if quant is not None:
        finish_quantized_linears(model)
