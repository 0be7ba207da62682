"""Triton kernel: y = x @ W^T with W kept as 4- (or 8-) bit integers, unpacked and scaled in registers.

W is in nanovllm's quantized layout (nanovllm/quantization/int_linear.py): qweight int32 [N, K / p]
(p = 32 // bits values per word, packed along K), scales and mins [N, groups]; the weight is
w[n, k] = q[n, k] * scales[n, g(k)] + mins[n, g(k)], g(k) = k // group_size, or g_idx[k] where
GPTQ's act-order left a rank's groups scattered.

* A program computes a BLOCK_M x BLOCK_N tile of y, walking K in BLOCK_K steps. Each step loads
  BLOCK_K / p words per column, shifts the values out of them ([K/p, p, N] reshaped to [K, N]),
  scales them in float32 and multiplies in the activations' dtype on the tensor cores. Only the
  packed words cross the memory bus: that is the point of 4 bits in decode, which reads every
  weight once per step and little else.
* BLOCK_K divides the group size, so a step lies in one group: its scales and mins are one row
  of BLOCK_N values (the g_idx variant looks them up per input feature instead).
* Split-K: with few rows (decode batches) there are too few output tiles to fill the GPU, so K is
  cut into `split_k` ranges, each program writes a float32 partial tile, and the partials are summed.
"""
import functools

import torch
import triton
import triton.language as tl


@triton.jit
def _w4a16_kernel(
    x_ptr, qweight_ptr, scales_ptr, mins_ptr, g_idx_ptr, out_ptr,
    M, N, K, k_per_split,
    stride_xm, stride_xk,
    stride_qn, stride_qk,
    stride_sn, stride_sg,
    stride_mn, stride_mg,
    stride_os, stride_om, stride_on,
    BITS: tl.constexpr, GROUP_SIZE: tl.constexpr, HAS_G_IDX: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, IEEE: tl.constexpr,
):
    PACK: tl.constexpr = 32 // BITS
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid_k = tl.program_id(2)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = rows < M
    col_mask = cols < N
    words_k = tl.arange(0, BLOCK_K // PACK)                       # the step's words along K
    shifts = (tl.arange(0, PACK) * BITS)[None, :, None]           # [1, PACK, 1]

    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    k_start = pid_k * k_per_split
    k_end = tl.minimum(k_start + k_per_split, K)
    for k0 in range(k_start, k_end, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        k_mask = k < k_end
        x = tl.load(x_ptr + rows[:, None] * stride_xm + k[None, :] * stride_xk,
                    mask=row_mask[:, None] & k_mask[None, :], other=0.0)
        word_mask = ((k0 // PACK + words_k) * PACK < k_end)[:, None] & col_mask[None, :]
        words = tl.load(qweight_ptr + cols[None, :] * stride_qn + (k0 // PACK + words_k)[:, None] * stride_qk,
                        mask=word_mask, other=0)                  # [BLOCK_K / PACK, BLOCK_N]
        # value j of a word sits in bits BITS*j..: [words, PACK, N] -> [K, N] in K order
        q = (words[:, None, :] >> shifts) & ((1 << BITS) - 1)
        q = tl.reshape(q, [BLOCK_K, BLOCK_N]).to(tl.float32)
        if HAS_G_IDX:
            groups = tl.load(g_idx_ptr + k, mask=k_mask, other=0)
            both = k_mask[:, None] & col_mask[None, :]
            scale = tl.load(scales_ptr + cols[None, :] * stride_sn + groups[:, None] * stride_sg, mask=both, other=0.0)
            low = tl.load(mins_ptr + cols[None, :] * stride_mn + groups[:, None] * stride_mg, mask=both, other=0.0)
            w = q * scale.to(tl.float32) + low.to(tl.float32)
        else:
            group = k0 // GROUP_SIZE                              # BLOCK_K divides GROUP_SIZE
            scale = tl.load(scales_ptr + cols * stride_sn + group * stride_sg, mask=col_mask, other=0.0)
            low = tl.load(mins_ptr + cols * stride_mn + group * stride_mg, mask=col_mask, other=0.0)
            w = q * scale.to(tl.float32)[None, :] + low.to(tl.float32)[None, :]
        if IEEE:
            acc += tl.dot(x, w.to(x.dtype), input_precision="ieee")
        else:
            acc += tl.dot(x, w.to(x.dtype))
    out = out_ptr + pid_k * stride_os + rows[:, None] * stride_om + cols[None, :] * stride_on
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=row_mask[:, None] & col_mask[None, :])


@functools.lru_cache(maxsize=None)
def _num_sms(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _block_k(group_size: int, bits: int, largest: int) -> int | None:
    """The largest power of two from 16 to `largest` dividing group_size (None: there is none)."""
    block = largest
    while block >= max(16, 32 // bits):
        if group_size % block == 0:
            return block
        block //= 2
    return None


def default_split_k(tiles: int, k_steps: int, device: torch.device) -> int:
    """K ranges per output tile, so that tiles x split_k programs fill the GPU (about two per SM)."""
    target = 2 * _num_sms(device.index if device.index is not None else torch.cuda.current_device()) \
        if device.type == "cuda" else 4
    split = 1
    while split * 2 <= k_steps and tiles * split * 2 <= target:
        split *= 2
    return split


def w4a16_gemm(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, mins: torch.Tensor, bits: int,
               group_size: int, g_idx: torch.Tensor | None = None, split_k: int | None = None,
               config: dict | None = None) -> torch.Tensor:
    """x [M, K] @ the quantized weight [N, K]^T -> [M, N] in x's dtype.

    qweight int32 [N, K * bits / 32]; scales, mins [N, groups]; bits 4 or 8; group_size: input
    features per group (its groups contiguous), unless g_idx [K] gives each feature's group.
    `split_k`: K ranges summed at the end (default: enough programs to fill the GPU).
    `config` overrides BLOCK_M / BLOCK_N / BLOCK_K / num_warps / num_stages (for tuning).
    """
    M, K = x.shape
    N = qweight.shape[0]
    if bits not in (4, 8):
        raise ValueError(f"bits must be 4 or 8, got {bits}")
    if qweight.shape[1] * (32 // bits) != K:
        raise ValueError(f"qweight {tuple(qweight.shape)} holds {qweight.shape[1] * 32 // bits} {bits}-bit values "
                         f"per row, x has {K} features")
    if scales.shape != mins.shape or scales.shape[0] != N:
        raise ValueError(f"scales {tuple(scales.shape)} and mins {tuple(mins.shape)} must both be [{N}, groups]")
    cfg = {"BLOCK_M": 16 if M <= 16 else 32 if M <= 32 else 64, "BLOCK_N": 64 if M <= 32 else 128,
           "num_warps": 4, "num_stages": 3, **(config or {})}
    block_k = cfg.get("BLOCK_K") or _block_k(group_size, bits, 128 if M <= 32 else 64)
    if g_idx is None and (block_k is None or group_size % block_k):
        # groups too small (or odd) for one scale row per step: look each feature's group up instead
        g_idx = (torch.arange(K, device=x.device) // group_size).to(torch.int32)
    if block_k is None:
        block_k = 32
    out = torch.empty(M, N, dtype=x.dtype, device=x.device)
    if M == 0:
        return out
    tiles = triton.cdiv(M, cfg["BLOCK_M"]) * triton.cdiv(N, cfg["BLOCK_N"])
    k_steps = triton.cdiv(K, block_k)
    if split_k is None:
        split_k = default_split_k(tiles, k_steps, x.device) if M <= 64 else 1
    split_k = max(1, min(split_k, k_steps))
    k_per_split = triton.cdiv(k_steps, split_k) * block_k
    split_k = triton.cdiv(K, k_per_split)
    target = out if split_k == 1 else torch.empty(split_k, M, N, dtype=torch.float32, device=x.device)
    target_strides = (0, *out.stride()) if split_k == 1 else target.stride()
    grid = (triton.cdiv(M, cfg["BLOCK_M"]), triton.cdiv(N, cfg["BLOCK_N"]), split_k)
    _w4a16_kernel[grid](
        x, qweight, scales, mins, g_idx if g_idx is not None else qweight, target,
        M, N, K, k_per_split,
        *x.stride(), *qweight.stride(), *scales.stride(), *mins.stride(), *target_strides,
        BITS=bits, GROUP_SIZE=group_size, HAS_G_IDX=g_idx is not None,
        BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], BLOCK_K=block_k, IEEE=x.dtype == torch.float32,
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
    )
    if split_k > 1:
        out.copy_(target.sum(0))
    return out
