"""Triton kernels: y = x @ W^T with W kept as 4- (or 8-) bit integers, unpacked and scaled in registers.

W is in nanovllm's quantized layout (nanovllm/quantization/int_linear.py): qweight int32 [N, K / p]
(p = 32 // bits values per word, packed along K), scales and mins [N, groups]; the weight is
w[n, k] = q[n, k] * scales[n, g(k)] + mins[n, g(k)], g(k) = k // group_size, or g_idx[k] where
GPTQ's act-order left a rank's groups scattered.

Decode reads every weight once per step and little else, so what counts is how fast the packed
words stream in. The earlier single kernel spent ~10 instructions a weight in its loop (counted in
its sm_90 SASS), where an H200's bandwidth leaves time for about 4: unpacking, not the bus, was the
limit. Both kernels therefore:
* scale after summing: within one group, sum_k x[k] * w[n, k] = scales[n, g] * sum_k x[k] * q[n, k]
  + mins[n, g] * sum_k x[k], so a weight costs its unpacking and one multiply-add; the scale and min
  are applied once per group and column (a K step never crosses a group: BLOCK_K divides the group).
  The integer products are exact, so this is at least as accurate as scaling each weight first.
* clamp the last tile's columns instead of masking the loads (the stores are masked).

Two kernels, picked by the number of rows (see `_config`):
* `_w4a16_gemv_kernel`, for a few rows: no tensor cores. Each program takes up to 8 rows and
  BLOCK_N columns; value j of every word is shifted out as a float with the bit trick in
  `unpack_value` (int_unpack.py) once, and multiplied by x[k] of each row in float32 (one program a row
  unpacked every weight once per row: a verifying step's 8 rows cost 1.5x a decode step).
* `_w4a16_dot_kernel`, for more rows: the integers, unpacked with the same trick, go to the
  tensor cores as the activations' dtype (exact: 0..255) and tl.dot sums them against x. With
  g_idx (scattered groups) each weight is scaled before the dot instead.

With few output tiles both cut K into ranges summed within the launch (split_k.py). On sm_90 (H100,
H200) bfloat16 products of 2 to 32 rows go to w4a16_mma.py's Gluon tensor-core kernel instead, and
on any GPU those of 1 and 2 rows that it does not take to w4a16_gemv.py's Gluon GEMV (at 2 rows
the gated ones: it makes the activation too).

On sm_90 and later the GEMV is launched before the kernel ahead of it has finished and pulls its
weights into L2 meanwhile (programmatic dependent launch, pdl.py).
"""
import torch
import triton
import triton.language as tl

from nanovllm import kernels
from nanovllm.kernels import w4a16_gemv, w4a16_mma
from nanovllm.kernels.int_unpack import word_dots, word_dots_f16
from nanovllm.kernels.pdl import pdl_options, prefetch_l2, wait_for_previous
from nanovllm.kernels.split_k import default_split_k, finish_tile, k_ranges, split_buffers


@triton.jit
def _w4a16_gemv_kernel(
    x_ptr, qweight_ptr, scales_ptr, mins_ptr, out_ptr, partials_ptr, counters_ptr,
    M, N, K, k_per_split, split_k,
    stride_xm, stride_qn, stride_sn, stride_mn, stride_om,
    BITS: tl.constexpr, GROUP_SIZE: tl.constexpr, SPLIT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, NUM_STAGES: tl.constexpr,
    HALF_UNPACK: tl.constexpr, PDL: tl.constexpr,
):
    PACK: tl.constexpr = 32 // BITS
    WORDS: tl.constexpr = BLOCK_K // PACK
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid_k = tl.program_id(2)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    safe_rows = tl.minimum(rows, M - 1)                           # rows past M re-read row M-1
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    safe_cols = tl.minimum(cols, N - 1)                           # the last tile re-reads column N-1
    words_k = tl.arange(0, WORDS)
    k_start = pid_k * k_per_split                                 # K % BLOCK_K == 0: every step is whole
    k_len = tl.minimum(k_per_split, K - k_start)
    w_ptrs = qweight_ptr + safe_cols[:, None] * stride_qn + (k_start // PACK + words_k)[None, :]
    # x of value 0 of each word, for each row: [BLOCK_M, WORDS]
    x_ptrs = x_ptr + safe_rows[:, None] * stride_xm + k_start + words_k[None, :] * PACK
    s_ptrs = scales_ptr + safe_cols * stride_sn
    m_ptrs = mins_ptr + safe_cols * stride_mn
    if PDL:     # launched early (pdl.py): the weights do not depend on the kernel ahead, x does
        for k0 in range(0, k_len, 1024 // BITS):                  # 128 bytes of each column's words
            prefetch_l2(qweight_ptr + safe_cols * stride_qn + (k_start + k0) // PACK)
        prefetch_l2(s_ptrs + k_start // GROUP_SIZE)
        prefetch_l2(m_ptrs + k_start // GROUP_SIZE)
    wait_for_previous(PDL)
    # summed over the words once at the end: a sum per step took a shuffle across threads each step
    acc = tl.zeros([BLOCK_M, BLOCK_N, WORDS], dtype=tl.float32)
    # tl.range(num_stages=): loops without tl.dot are software-pipelined only when asked
    for k0 in tl.range(0, k_len, BLOCK_K, num_stages=NUM_STAGES):
        words = tl.load(w_ptrs)                                   # [BLOCK_N, WORDS]
        if HALF_UNPACK:
            dots, x_sum = word_dots_f16(words, x_ptrs, BLOCK_M, WORDS)
        else:
            dots, x_sum = word_dots(words, x_ptrs, BITS, BLOCK_M, BLOCK_N, WORDS)
        group = (k_start + k0) // GROUP_SIZE                      # BLOCK_K divides GROUP_SIZE
        scale = tl.load(s_ptrs + group).to(tl.float32)
        low = tl.load(m_ptrs + group).to(tl.float32)
        acc += dots * scale[None, :, None] + low[None, :, None] * x_sum[:, None, :]
        w_ptrs += WORDS
        x_ptrs += BLOCK_K
    finish_tile(tl.sum(acc, axis=2), out_ptr + rows[:, None] * stride_om + cols[None, :],
                 (rows[:, None] < M) & (cols[None, :] < N), partials_ptr, rows[:, None] * N + cols[None, :], M * N,
                 counters_ptr + pid_m * tl.num_programs(1) + pid_n, pid_k, split_k, SPLIT)


@triton.jit
def _w4a16_dot_kernel(
    x_ptr, qweight_ptr, scales_ptr, mins_ptr, g_idx_ptr, out_ptr, partials_ptr, counters_ptr,
    M, N, K, k_per_split, split_k,
    stride_xm, stride_xk,
    stride_qn, stride_qk,
    stride_sn, stride_sg,
    stride_mn, stride_mg,
    stride_om, stride_on,
    BITS: tl.constexpr, GROUP_SIZE: tl.constexpr, HAS_G_IDX: tl.constexpr, EVEN_K: tl.constexpr,
    SPLIT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, IEEE: tl.constexpr,
):
    PACK: tl.constexpr = 32 // BITS
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid_k = tl.program_id(2)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = rows < M
    safe_cols = tl.minimum(cols, N - 1)                           # the last tile re-reads column N-1
    words_k = tl.arange(0, BLOCK_K // PACK)                       # the step's words along K
    shifts = (tl.arange(0, PACK) * BITS)[None, :, None]           # [1, PACK, 1]
    value = tl.arange(0, PACK)                                    # unpack_value's constants, per value
    low_half = (value < 16 // BITS)[None, :, None]
    positions = (value % (16 // BITS)) * BITS
    fields = (((1 << BITS) - 1) << positions)[None, :, None]
    units = (1 << (23 - positions)).to(tl.float32)[None, :, None]

    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    k_start = pid_k * k_per_split
    k_end = tl.minimum(k_start + k_per_split, K)
    for k0 in range(k_start, k_end, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        w_idx = k0 // PACK + words_k
        w_ptrs = qweight_ptr + safe_cols[None, :] * stride_qn + w_idx[:, None] * stride_qk
        if EVEN_K:
            x = tl.load(x_ptr + rows[:, None] * stride_xm + k[None, :] * stride_xk, mask=row_mask[:, None], other=0.0)
            words = tl.load(w_ptrs)                               # [BLOCK_K / PACK, BLOCK_N]
        else:
            k_mask = k < k_end
            x = tl.load(x_ptr + rows[:, None] * stride_xm + k[None, :] * stride_xk,
                        mask=row_mask[:, None] & k_mask[None, :], other=0.0)
            words = tl.load(w_ptrs, mask=(w_idx * PACK < k_end)[:, None], other=0)
        if HAS_G_IDX:       # each input feature its own group: scale every weight before the dot
            # value j of a word sits in bits BITS*j..: [words, PACK, N] -> [K, N] in K order
            q = (words[:, None, :] >> shifts) & ((1 << BITS) - 1)
            q = tl.reshape(q, [BLOCK_K, BLOCK_N])
            groups = tl.load(g_idx_ptr + k, mask=k < k_end, other=0)
            scale = tl.load(scales_ptr + safe_cols[None, :] * stride_sn + groups[:, None] * stride_sg)
            low = tl.load(mins_ptr + safe_cols[None, :] * stride_mn + groups[:, None] * stride_mg)
            w = (q.to(tl.float32) * scale.to(tl.float32) + low.to(tl.float32)).to(x.dtype)
            if IEEE:
                acc += tl.dot(x, w, input_precision="ieee")
            else:
                acc += tl.dot(x, w)
        else:               # one group per step: integers into the dot, scale and min after it
            # (as unpack_value, for all PACK values at once: a plain int -> float conversion is a
            # quarter-rate instruction on Hopper, the mantissa trick two full-rate ones)
            mantissa = tl.where(low_half, words[:, None, :], words[:, None, :] >> 16) & fields | 0x3F800000
            q = mantissa.to(tl.float32, bitcast=True) * units - units
            q = tl.reshape(q, [BLOCK_K, BLOCK_N]).to(x.dtype)
            if IEEE:
                part = tl.dot(x, q, input_precision="ieee")
            else:
                part = tl.dot(x, q)
            group = k0 // GROUP_SIZE                              # BLOCK_K divides GROUP_SIZE
            scale = tl.load(scales_ptr + safe_cols * stride_sn + group * stride_sg).to(tl.float32)
            low = tl.load(mins_ptr + safe_cols * stride_mn + group * stride_mg).to(tl.float32)
            x_sum = tl.sum(x.to(tl.float32), axis=1)
            acc += part * scale[None, :] + x_sum[:, None] * low[None, :]
    finish_tile(acc, out_ptr + rows[:, None] * stride_om + cols[None, :] * stride_on,
                 row_mask[:, None] & (cols < N)[None, :], partials_ptr, rows[:, None] * N + cols[None, :], M * N,
                 counters_ptr + pid_m * tl.num_programs(1) + pid_n, pid_k, split_k, SPLIT)


def _block_k(group_size: int, bits: int, largest: int) -> int | None:
    """The largest power of two from 16 to `largest` dividing group_size (None: there is none)."""
    block = largest
    while block >= max(16, 32 // bits):
        if group_size % block == 0:
            return block
        block //= 2
    return None


# Defaults by rows (benchmarks/bench_w4a16.py --sweep measures them; its summary says what to set).
# split_per_sm: the programs per SM that split-K aims for (0: never split; see default_split_k).
# GEMV_MAX_ROWS: up to this many rows, the CUDA-core kernel (GEMV_BLOCK_M rows a program). Since
# d80db87 (partial sums per word, reduced once) it beats the tensor-core kernel on Llama-3.2-1B's
# four linears at 2, 4 and 8 rows on an H200: 71 against 79 us for the four at 8 rows, 48 against
# 79 at 4 (docs/benchmarks.md). (Weights of up to 2M values, the demo model's, had it to 8 already.)
# Its BLOCK_N of 64 columns: 4 warps hold 1024 words a step, 8 per thread as two 16-byte loads.
GEMV_MAX_ROWS = 8
GEMV_BLOCK_M = 8
GEMV_CONFIG = {"BLOCK_N": 64, "BLOCK_K": 128, "num_warps": 4, "num_stages": 3, "split_per_sm": 2}
# On a GPU, 4-bit values through float16 (word_dots_f16) for programs of up to this many rows. Its
# loop in sm_90 SASS (GEMV_CONFIG): 365 against 429 instructions at 1 row, 475 / 557 at 2, 702 / 778
# at 4, but 1,176 / 1,118 at 8 (each row's share of x outweighs the cheaper unpacking there). On an
# H100 it took a 4-bit Llama-3.2-1B's batch-1 decode step from 1.24 to 1.13 ms, its GEMVs in the step
# from 11.2 to 9.4 us a launch (docs/benchmarks.md, 2026-12-07; --half-unpack-max-rows 0 turns it off).
HALF_UNPACK_MAX_ROWS = 4
# The tensor-core kernel, by the rows it is given (first entry whose max_rows >= M). BLOCK_M is at
# least 16 (tl.dot's smallest); a wide BLOCK_N spreads the unpacking of a word over more columns.
DOT_CONFIGS = [
    (16, {"BLOCK_M": 16, "BLOCK_N": 128, "BLOCK_K": 128, "num_warps": 4, "num_stages": 3, "split_per_sm": 2}),
    (32, {"BLOCK_M": 32, "BLOCK_N": 64, "BLOCK_K": 128, "num_warps": 4, "num_stages": 3, "split_per_sm": 2}),
    (64, {"BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_K": 64, "num_warps": 4, "num_stages": 3, "split_per_sm": 2}),
    (None, {"BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_K": 64, "num_warps": 4, "num_stages": 3, "split_per_sm": 0}),
]


def _dot_config(M: int) -> dict:
    return next(cfg for max_rows, cfg in DOT_CONFIGS if max_rows is None or M <= max_rows)


def set_gemv_max_rows(rows: int) -> None:
    """For benchmarks: the CUDA-core kernel up to `rows` rows."""
    global GEMV_MAX_ROWS
    GEMV_MAX_ROWS = rows


def set_half_unpack_max_rows(rows: int) -> None:
    """For benchmarks: the float16 unpacking of 4-bit values in programs of up to `rows` rows."""
    global HALF_UNPACK_MAX_ROWS
    HALF_UNPACK_MAX_ROWS = rows


def _config(M: int) -> dict:
    """The default launch settings for M rows; BLOCK_M is the tensor-core kernel's, for when the
    GEMV kernel cannot take the weight (scattered groups)."""
    if M <= GEMV_MAX_ROWS:
        return {"GEMV": True, "BLOCK_M": _dot_config(M)["BLOCK_M"], **GEMV_CONFIG}
    return {"GEMV": False, **_dot_config(M)}


def w4a16_gemm(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, mins: torch.Tensor, bits: int,
               group_size: int, g_idx: torch.Tensor | None = None, split_k: int | None = None,
               config: dict | None = None, gated: bool = False) -> torch.Tensor:
    """x [M, K] @ the quantized weight [N, K]^T -> [M, N] in x's dtype; `gated`: the product's
    halves are a gated MLP's gate and up, and the result silu(gate) * up [M, N / 2] (the Gluon GEMV
    makes it in its last step; elsewhere the activation's kernel follows the product).

    qweight int32 [N, K * bits / 32]; scales, mins [N, groups]; bits 4 or 8; group_size: input
    features per group (its groups contiguous), unless g_idx [K] gives each feature's group.
    `split_k`: K ranges summed at the end (default: enough programs to fill the GPU).
    `config` overrides the defaults (for tuning): GLUON (the Gluon GEMV, with SN, num_warps and
    split_per_sm), GLUON_MMA (the Gluon tensor-core kernel, with T and split_per_sm), GEMV (the
    CUDA-core kernel, if the groups allow it), BLOCK_M (tensor-core kernel only), BLOCK_N, BLOCK_K,
    num_warps, num_stages, split_per_sm, HALF_UNPACK (the CUDA-core kernel's float16 unpacking of
    4-bit values, on a GPU).
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
    if not gated and (config is None or config.get("GLUON_MMA")):
        out = w4a16_mma.gluon_mma(x, qweight, scales, mins, bits, group_size, g_idx, split_k, config)
        if out is not None:
            return out
    if config is None or config.get("GLUON"):
        out = w4a16_gemv.gluon_gemv(x, qweight, scales, mins, bits, group_size, g_idx, split_k, config, gated)
        if out is not None:
            return out
    if gated:
        no_gluon = None if config is None else {**config, "GLUON": False}
        # (kernels.silu_and_mul, not an import of its module, whose name the function shares)
        return kernels.silu_and_mul(w4a16_gemm(x, qweight, scales, mins, bits, group_size, g_idx, split_k, no_gluon))
    cfg = {**_config(M), **(config or {})}
    out = torch.empty(M, N, dtype=x.dtype, device=x.device)
    if M == 0:
        return out
    block_k = cfg.get("BLOCK_K") or _block_k(group_size, bits, 128 if M <= 32 else 64)
    if block_k is not None and group_size % block_k:
        block_k = _block_k(group_size, bits, block_k)
    if g_idx is None and block_k is None:
        # groups too small (or odd) for one scale row per step: look each feature's group up instead
        g_idx = (torch.arange(K, device=x.device) // group_size).to(torch.int32)
    if block_k is None:
        block_k = 32
    gemv = cfg["GEMV"] and g_idx is None and K % block_k == 0 and x.stride(1) == 1 and qweight.stride(1) == 1 \
        and scales.stride(1) == 1 and mins.stride(1) == 1
    # The CUDA-core kernel takes up to GEMV_BLOCK_M rows a program, unpacking each weight once for them.
    block_m = min(GEMV_BLOCK_M, triton.next_power_of_2(M)) if gemv else cfg["BLOCK_M"]
    block_n = cfg["BLOCK_N"]
    row_tiles, col_tiles = triton.cdiv(M, block_m), triton.cdiv(N, block_n)
    k_steps = triton.cdiv(K, block_k)
    if split_k is None:
        split_k = default_split_k(row_tiles * col_tiles, k_steps, x.device, cfg.get("split_per_sm", 2))
    k_per_split, split_k = k_ranges(K, block_k, split_k)
    split = split_k > 1
    partials, counters = split_buffers(out, split_k, row_tiles * col_tiles)
    grid = (row_tiles, col_tiles, split_k)
    if gemv:
        _w4a16_gemv_kernel[grid](
            x, qweight, scales, mins, out, partials, counters,
            M, N, K, k_per_split, split_k,
            x.stride(0), qweight.stride(0), scales.stride(0), mins.stride(0), out.stride(0),
            BITS=bits, GROUP_SIZE=group_size, SPLIT=split, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k,
            NUM_STAGES=cfg["num_stages"], HALF_UNPACK=cfg.get("HALF_UNPACK", block_m <= HALF_UNPACK_MAX_ROWS)
            and bits == 4 and x.is_cuda, num_warps=cfg["num_warps"], **pdl_options(x.device),
        )
    else:
        _w4a16_dot_kernel[grid](
            x, qweight, scales, mins, g_idx if g_idx is not None else qweight, out, partials, counters,
            M, N, K, k_per_split, split_k,
            *x.stride(), *qweight.stride(), *scales.stride(), *mins.stride(), *out.stride(),
            BITS=bits, GROUP_SIZE=group_size, HAS_G_IDX=g_idx is not None, EVEN_K=K % block_k == 0, SPLIT=split,
            BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, IEEE=x.dtype == torch.float32,
            num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
        )
    return out
