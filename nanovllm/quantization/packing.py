"""Small integers packed into int32 words, as GPTQ, AWQ and nanovllm's own quantized weights store them.

A word holds 32 // bits values: value i of a word sits in bits [bits * i, bits * (i + 1)). `order`
names which of the word's values lands where: AWQ's GEMM layout puts columns 0..7 of a group of
eight into slots 0, 2, 4, 6, 1, 3, 5, 7 (so `order=AWQ_ORDER`); GPTQ and nanovllm keep them in order.
"""
import torch

# AWQ (GEMM layout): slot i of a word holds value AWQ_ORDER[i] of its group of eight.
AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)


def values_per_word(bits: int) -> int:
    if bits not in (4, 8):
        raise ValueError(f"bits must be 4 or 8, got {bits}")
    return 32 // bits


def pack_int32(values: torch.Tensor, bits: int, dim: int, order: tuple[int, ...] | None = None) -> torch.Tensor:
    """Pack unsigned `bits`-bit integers along `dim` (its length a multiple of 32 // bits) into int32."""
    per_word = values_per_word(bits)
    values = values.movedim(dim, -1).to(torch.int64)
    if values.shape[-1] % per_word:
        raise ValueError(f"{values.shape[-1]} values do not fill whole {per_word}-value words")
    groups = values.reshape(*values.shape[:-1], -1, per_word)
    if order is not None:
        groups = groups[..., list(order)]           # slot i takes value order[i]
    shifts = torch.arange(per_word, device=values.device) * bits
    words = (groups << shifts).sum(-1)              # < 2**32: fits int64
    words = torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)
    return words.movedim(-1, dim).contiguous()


def unpack_int32(words: torch.Tensor, bits: int, dim: int, order: tuple[int, ...] | None = None) -> torch.Tensor:
    """The inverse of pack_int32: int32 words -> their values (uint8 for bits <= 8), `dim` widened."""
    per_word = values_per_word(bits)
    words = words.movedim(dim, -1)
    shifts = torch.arange(per_word, device=words.device, dtype=torch.int32) * bits
    # An arithmetic shift of a negative word drags its sign bit along; the mask drops it again.
    slots = (words.unsqueeze(-1) >> shifts) & ((1 << bits) - 1)
    if order is not None:
        slots = slots[..., list(torch.tensor(order).argsort())]   # value j sits in slot order.index(j)
    values = slots.reshape(*words.shape[:-1], -1).to(torch.uint8)
    return values.movedim(-1, dim).contiguous()
