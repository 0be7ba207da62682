"""Gluon kernel: the 4-bit product for 2 to 32 rows of bfloat16 activations, on Hopper's tensor cores.

out^T [N, M] = W [N, K] . x^T [K, M] with warpgroup MMAs (wgmma, sm_90): the weight is the A
operand, 64 of its columns a warpgroup, and the few rows of x are the other side, 8 to 64 wide, so
a 4-row product is padded to 8 rows, not to wgmma's 64. The weight is unpacked in registers
straight into the layout wgmma reads A from: no round trip through shared memory, which is what
held the Triton tensor-core kernel back. x^T, the B operand, is staged in shared memory a step at
a time. How the unpacking lands in place is an order of K (`_dot_order`), told in
docs/quantization.md; docs/benchmarks.md has the figures.

Gluon runs on NVIDIA GPUs only (no interpreter): tests/gpu compares it with the reference, and
tests/kernels compiles it for sm_90 on a CPU.
"""
import functools
import logging

import torch
import triton
from triton.errors import TritonError

from nanovllm.kernels import split_k as split_k_module
from nanovllm.kernels.pdl import pdl_options, wait_for_previous
from nanovllm.kernels.w4a16_gemv import gl, gluon, gluon_imported, thread_barrier

logger = logging.getLogger(__name__)

try:
    from triton.experimental.gluon.language.nvidia.hopper import fence_async_shared, warpgroup_mma
except ImportError:
    warpgroup_mma = None

_COMPILES = True     # set False if this triton's Gluon cannot build the kernel


def words_layout(NB: int, T: int):
    """A step's weights [64T columns, 2NB words, 8 values]: each thread holds NB/2 consecutive words
    of columns r, r + 8 (and r + 64 with T = 2), and all 8 values of each; the columns spread over
    lanes and warps as wgmma's A operand spreads its rows."""
    reg = [[0, 0, 1], [0, 0, 2], [0, 0, 4]]
    word = 1
    while word < NB // 2:
        reg.append([0, word, 0])
        word *= 2
    reg.append([8, 0, 0])
    if T == 2:
        reg.append([64, 0, 0])
    lane = [[0, NB // 2, 0], [0, NB, 0], [1, 0, 0], [2, 0, 0], [4, 0, 0]]
    return gl.DistributedLinearLayout(reg, lane, [[16, 0, 0], [32, 0, 0]], [], [64 * T, 2 * NB, 8])


def x_layout(NB: int):
    """A step's x [rows, 16NB]: 8 consecutive values of a row a thread (one 16-byte load)."""
    return gl.BlockedLayout([1, 8], [32 // (2 * NB), 2 * NB], [4, 1], [1, 0])


if gluon_imported() and warpgroup_mma is not None:
    from nanovllm.kernels.w4a16_gemv import split_k_sum     # (a Gluon function, defined with Gluon)

    @gluon.jit
    def _dot_order(t, ROWS: gl.constexpr, NB: gl.constexpr):
        """[ROWS, 16NB] in K order -> in the dot's order. k = 8 (NB/2 c + b1) + 4 b0 + 2 h + p (value
        4 b0 + 2 h + p of word NB/2 c + b1) goes to position 16 (2 b1 + b0) + 8 h + 2 c + p, where
        wgmma's A operand has it in lane c (mod 4) of the warp: the lane that loaded the word."""
        t = gl.reshape(t, [ROWS, 4, NB // 2, 2, 2, 2])           # [row, c, b1, b0, h, p]
        t = gl.permute(t, [0, 2, 3, 4, 1, 5])                    # [row, b1, b0, h, c, p]
        return gl.reshape(t, [ROWS, 16 * NB])

    @gluon.jit
    def _pair_order(t, ROWS: gl.constexpr, BK: gl.constexpr):
        """[ROWS, BK] in K order -> in _unpack's order: within each word's 8 values, 0, 4, 1, 5, 2, 6,
        3, 7 (a thread holds a word's 8 values of x: a renaming of its registers)."""
        t = gl.reshape(t, [ROWS, BK // 8, 2, 4])
        return gl.reshape(gl.permute(t, [0, 1, 3, 2]), [ROWS, BK])

    @gluon.jit
    def _unpack(words, L3: gl.constexpr):
        """[R, W] int32 words -> [R, W, 8] bfloat16 values 128 + q, in the order 0, 4, 1, 5, ... of
        the word's values (_pair_order). One LOP3 drops values i and i + 4 (bits 4i and 16 + 4i of
        the word shifted down 4i) into the mantissas of two bfloat16 128s, whose last bit is worth 1:
        with the 128s left in (the kernel takes 128 sum x off with the mins), a word takes 3 shifts
        and 4 LOP3s, against 21 instructions to make each value q exactly in float32 and round it."""
        v = gl.arange(0, 8, layout=gl.SliceLayout(0, gl.SliceLayout(1, L3)))
        shift = gl.expand_dims(gl.expand_dims((v // 2) * 4, 0), 1)
        src = gl.expand_dims(words, 2) >> shift          # positions 2i and 2i + 1: the word >> 4i
        return gl.inline_asm_elementwise("lop3.b32 $0, $1, 0x000F000F, 0x43004300, 0xEA;", "=r,r,r", [src],
                                         dtype=gl.bfloat16, is_pure=True, pack=2)

    @gluon.jit
    def _w4a16_mma_kernel(
        x_ptr, qweight_ptr, scales_ptr, mins_ptr, out_ptr, partials_ptr, counters_ptr,
        M, N, K, k_per_split, words_per_split, split_k,
        stride_xm, stride_qn, stride_sn, stride_mn, stride_om,
        L3: gl.constexpr, XB: gl.constexpr, GROUP_SIZE: gl.constexpr, NB: gl.constexpr, T: gl.constexpr,
        MN: gl.constexpr, SPLIT: gl.constexpr, PDL: gl.constexpr,
    ):
        # A program: R = 64T weight columns, all M rows (MN, a power of two >= 8), one K range, in
        # steps of BK = 16NB values within one group.
        R: gl.constexpr = 64 * T
        BK: gl.constexpr = 16 * NB
        MMA: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                      instr_shape=[16, MN, 16])
        DOT_A: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=MMA, k_width=2)
        LW: gl.constexpr = gl.SliceLayout(2, L3)
        LS: gl.constexpr = gl.SliceLayout(1, MMA)
        pid_n = gl.program_id(0)
        pid_k = gl.program_id(1)
        k_start = pid_k * k_per_split
        steps = gl.minimum(k_per_split, K - k_start) // BK

        cols = pid_n * R + gl.arange(0, R, layout=gl.SliceLayout(1, LW))
        words_k = pid_k * words_per_split + gl.arange(0, 2 * NB, layout=gl.SliceLayout(0, LW))
        # (the last tile re-reads column N - 1, rows past M re-read row M - 1; stores are masked)
        w_ptrs = qweight_ptr + gl.expand_dims(gl.minimum(cols, N - 1), 1) * stride_qn + gl.expand_dims(words_k, 0)
        xm = gl.arange(0, MN, layout=gl.SliceLayout(1, XB))
        xk = k_start + gl.arange(0, BK, layout=gl.SliceLayout(0, XB))
        x_ptrs = x_ptr + gl.expand_dims(gl.minimum(xm, M - 1), 1) * stride_xm + gl.expand_dims(xk, 0)
        s_cols = gl.minimum(pid_n * R + gl.arange(0, R, layout=LS), N - 1)
        s_ptrs = scales_ptr + s_cols * stride_sn
        m_ptrs = mins_ptr + s_cols * stride_mn
        group = k_start // GROUP_SIZE

        words = gl.load(w_ptrs)               # the weights do not depend on the kernel ahead (pdl.py)
        wait_for_previous(PDL)
        x = gl.load(x_ptrs)
        scale = gl.load(s_ptrs + group)
        low = gl.load(m_ptrs + group)
        x_smem = gl.allocate_shared_memory(gl.bfloat16, [MN, BK], gl.NVMMASharedLayout.get_default_for(
            [MN, BK], gl.bfloat16))
        acc = gl.zeros([R, MN], gl.float32, MMA)
        zero = gl.zeros([R, MN], gl.float32, MMA)
        for step in range(0, steps):
            # the next step's loads go out before this step's work
            more = step + 1 < steps
            w_ptrs += BK // 8
            x_ptrs += BK
            group = (k_start + (step + 1) * BK) // GROUP_SIZE
            words_next = gl.load(w_ptrs, mask=more)
            x_next = gl.load(x_ptrs, mask=more)
            scale_next = gl.load(s_ptrs + group, mask=more)
            low_next = gl.load(m_ptrs + group, mask=more)

            thread_barrier()                  # every warp is done with the last step's x_smem
            x_smem.store(_dot_order(_pair_order(x, MN, BK), MN, NB))
            fence_async_shared()
            q = gl.reshape(_unpack(words, L3), [R, BK])                                # in pair order
            q = gl.convert_layout(_dot_order(q, R, NB), DOT_A, assert_trivial=True)   # already in place
            part = warpgroup_mma(q, x_smem.permute((1, 0)), zero, use_acc=False)
            # within a group: sum_k x w = scale * sum_k x (128 + q) + (min - 128 scale) * sum_k x
            x_sum = gl.convert_layout(gl.sum(x.to(gl.float32), axis=1), gl.SliceLayout(0, MMA))
            scale32 = scale.to(gl.float32)
            acc += part * gl.expand_dims(scale32, 1) + \
                gl.expand_dims(low.to(gl.float32) - 128.0 * scale32, 1) * gl.expand_dims(x_sum, 0)
            words = words_next
            x = x_next
            scale = scale_next
            low = low_next

        out_n = gl.expand_dims(pid_n * R + gl.arange(0, R, layout=LS), 1)
        out_m = gl.expand_dims(gl.arange(0, MN, layout=gl.SliceLayout(0, MMA)), 0)
        mask = (out_m < M) & (out_n < N)
        out_ptrs = out_ptr + out_m * stride_om + out_n
        if not SPLIT:
            gl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=mask)
        else:       # the tile's last program sums the partials in K order
            last, total = split_k_sum(acc, partials_ptr, out_m * N + out_n, mask, counters_ptr + pid_n, pid_k,
                                      split_k, M * N)
            if last:
                gl.store(out_ptrs, total.to(out_ptr.dtype.element_ty), mask=mask)


# w4a16_gemm sends bfloat16 products of GLUON_MMA_MIN_ROWS to GLUON_MMA_MAX_ROWS rows here, on sm_90,
# with split-K for ~split_per_sm programs an SM, and T x 64 columns a program up to wide_max_rows rows
# (padded to 8, 16, 32), 64 columns above. On an H100, from HBM, Llama-3.1-8B's four linears took
# 75-82 us at 2-16 rows against 93-240 us for the kernels before it, Llama-3.2-1B's 32-43 us against
# 38-86 (docs/benchmarks.md, 2026-12-07 and -08). At 32 rows a 128-column program spills registers
# with triton 3.6 (a 288-byte stack a thread; none at 16 rows, nor with 64 columns), and 64 columns
# were the faster for Llama-3.2-1B (58.8 against 63.1 us for the four; for Llama-3.1-8B 128 were).
# A layer with few 128-column tiles takes 64 columns even below wide_max_rows where 128 would leave
# a program fewer than min_steps steps of K, or split-K partials (float32, written and read back)
# of more than max_partials times the weight's bytes (columns_and_split).
# 33-64 rows pass the tests but were not timed.
GLUON_MMA_MIN_ROWS = 2
GLUON_MMA_MAX_ROWS = 32
GLUON_MMA_CONFIG = {"T": 2, "wide_max_rows": 16, "split_per_sm": 2, "min_steps": 2, "max_partials": 0.25}


def set_gluon_mma_rows(low: int, high: int) -> None:
    """For benchmarks: this kernel from `low` to `high` rows (0 0: never)."""
    global GLUON_MMA_MIN_ROWS, GLUON_MMA_MAX_ROWS
    GLUON_MMA_MIN_ROWS, GLUON_MMA_MAX_ROWS = low, high


def step_values(group_size: int, K: int) -> int | None:
    """K values a step (a whole number of 16-value MMAs within one group), or None where the
    weight's groups do not allow one."""
    for step in (128, 64, 32):
        if group_size % step == 0 and K % step == 0:
            return step
    return None


def launch_constexprs(M: int, K: int, group_size: int, config: dict | None = None) -> dict | None:
    """The kernel's compile-time settings for M rows of a K-feature weight (T, MN, NB, layouts...),
    or None where its groups allow no step."""
    step = step_values(group_size, K)
    if step is None:
        return None
    cfg = {**GLUON_MMA_CONFIG, **(config or {})}
    if cfg["T"] not in (1, 2):
        raise ValueError(f"T (64-column blocks a program) must be 1 or 2, got {cfg['T']}")
    mn = max(8, triton.next_power_of_2(M))
    t = cfg["T"] if mn <= cfg["wide_max_rows"] else 1
    nb = step // 16
    return dict(L3=words_layout(nb, t), XB=x_layout(nb), GROUP_SIZE=group_size, NB=nb, T=t, MN=mn)


def columns_and_split(t: int, M: int, N: int, K: int, step: int, device: torch.device,
                      cfg: dict) -> tuple[int, int]:
    """(T, split_k) by default, from the widest T the settings allow (launch_constexprs): 128 columns
    a program (T = 2) unless split-K would then leave a program fewer than min_steps steps or write
    float32 partials (2 x 4 bytes a row and column of each K range, against half a byte a weight)
    above max_partials times the weight's bytes; then 64. Llama-3.2-1B's o projection at 16 rows,
    for one: 16 tiles of 128 columns, split 16 ways, one step each and partials twice its weight."""
    split = split_k_module.default_split_k(triton.cdiv(N, 64 * t), K // step, device, cfg["split_per_sm"])
    if t == 2 and (K // step < cfg["min_steps"] * split or 16 * split * M > cfg["max_partials"] * K):
        t = 1
        split = split_k_module.default_split_k(triton.cdiv(N, 64), K // step, device, cfg["split_per_sm"])
    return t, split


def gluon_mma(x, qweight, scales, mins, bits, group_size, g_idx, split_k, config) -> torch.Tensor | None:
    """w4a16_gemm's product through this kernel, or None where it does not apply (config
    GLUON_MMA: 1 to 64 rows whatever the defaults say), or where this triton's Gluon cannot compile
    it (then the other kernels from then on)."""
    M, K = x.shape
    low, high = (1, 64) if config and config.get("GLUON_MMA") else (GLUON_MMA_MIN_ROWS, min(GLUON_MMA_MAX_ROWS, 64))
    if not (max(low, 1) <= M <= high and x.is_cuda and bits == 4 and g_idx is None and x.dtype == torch.bfloat16
            and x.stride(1) == 1 and qweight.stride(1) == 1 and scales.stride(1) == 1 and mins.stride(1) == 1
            and _COMPILES and warpgroup_mma is not None and gluon_imported()
            and _is_hopper(x.device.index if x.device.index is not None else torch.cuda.current_device())):
        return None
    cfg = {**GLUON_MMA_CONFIG, **(config or {})}
    constexprs = launch_constexprs(M, K, group_size, cfg)
    if constexprs is None:
        return None
    step = 16 * constexprs["NB"]
    N = qweight.shape[0]
    if split_k is None:
        t, split_k = columns_and_split(constexprs["T"], M, N, K, step, x.device, cfg)
        if t != constexprs["T"]:
            constexprs = launch_constexprs(M, K, group_size, {**cfg, "T": t})
    tiles = triton.cdiv(N, 64 * constexprs["T"])
    k_per_split, split_k = split_k_module.k_ranges(K, step, split_k)
    out = torch.empty(M, N, dtype=x.dtype, device=x.device)
    partials, counters = split_k_module.split_buffers(out, split_k, tiles)
    try:
        _w4a16_mma_kernel[(tiles, split_k)](
            x, qweight, scales, mins, out, partials, counters, M, N, K, k_per_split, k_per_split // 8, split_k,
            x.stride(0), qweight.stride(0), scales.stride(0), mins.stride(0), out.stride(0),
            SPLIT=split_k > 1, num_warps=4, **constexprs, **pdl_options(x.device))
    except TritonError as e:    # Gluon's API still moves (checked with triton 3.6 and 3.9); also ptxas, resources
        _turn_off(e)
        return None
    return out


@functools.lru_cache(maxsize=None)
def _is_hopper(device_index: int) -> bool:
    return torch.cuda.get_device_capability(device_index) == (9, 0)       # wgmma is sm_90's alone


def _turn_off(error: TritonError) -> None:
    global _COMPILES
    _COMPILES = False
    logger.warning("the Gluon 4-bit MMA kernel does not compile with triton %s (%s); using the Triton kernels",
                   triton.__version__, str(error).splitlines()[-1] if str(error) else type(error).__name__)
