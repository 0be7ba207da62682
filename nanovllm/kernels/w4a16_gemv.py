"""Gluon kernel: the 4-bit GEMV for one or two rows of bfloat16 activations (batch-1 decode).

The same product as w4a16_gemm.py's GEMV (its layout and its scale-after-summing), written in
Gluon, Triton's language with explicit layouts, so that each thread's share of x sits in the
registers next to its words: the Triton kernel exchanged x through shared memory at every step
(two barriers a step). Here nothing crosses threads until the end of the program, each step's
loads are issued before the previous step's arithmetic, and a thread's x is reused for the SN
columns it holds. docs/quantization.md tells the layout; docs/benchmarks.md the figures.

Gluon runs on NVIDIA GPUs only (no interpreter): tests/gpu compares it with the reference, and
tests/kernels compiles it for sm_90 on a CPU.
"""
import logging

import torch
import triton
from triton.errors import TritonError

from nanovllm.kernels import split_k as split_k_module
from nanovllm.kernels.pdl import gdc_wait, pdl_options, wait_for_previous

logger = logging.getLogger(__name__)

try:
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    thread_barrier = getattr(gl, "thread_barrier", None) or getattr(gl, "barrier", None)   # (renamed in 3.7)
except ImportError:         # triton before 3.4: w4a16_gemm keeps to its Triton kernels
    gluon = gl = thread_barrier = None


_COMPILES = True     # set False if this triton's Gluon (an experimental API) cannot build the kernel
_GATED_COMPILES = True      # the same for its gated variant alone (its epilogue reshapes a sliced layout)


def gluon_imported() -> bool:
    """Has this triton the Gluon pieces the 4-bit kernels use (this one and w4a16_mma.py)?"""
    return gluon is not None and thread_barrier is not None and gdc_wait is not None


def gluon_available() -> bool:
    return gluon_imported() and _COMPILES


if gluon_available():

    @gluon.jit
    def _indices_3d(A: gl.constexpr, B: gl.constexpr, C: gl.constexpr, layout: gl.constexpr):
        """aranges along each dimension of a [A, B, C] tensor in `layout`, broadcastable to it."""
        a = gl.arange(0, A, layout=gl.SliceLayout(1, gl.SliceLayout(2, layout)))
        b = gl.arange(0, B, layout=gl.SliceLayout(0, gl.SliceLayout(2, layout)))
        c = gl.arange(0, C, layout=gl.SliceLayout(0, gl.SliceLayout(1, layout)))
        return (gl.expand_dims(gl.expand_dims(a, 1), 2), gl.expand_dims(gl.expand_dims(b, 0), 2),
                gl.expand_dims(gl.expand_dims(c, 0), 1))

    @gluon.jit
    def _bf16_low(pairs):
        return (pairs << 16).to(gl.float32, bitcast=True)

    @gluon.jit
    def _bf16_high(pairs):
        return (pairs & -65536).to(gl.float32, bitcast=True)

    @gluon.jit
    def _pair_products(d, even_src, EVEN_POS: gl.constexpr, odd_src, ODD_POS: gl.constexpr, x_pair, one_bits,
                       FIRST: gl.constexpr):
        """d (or nothing, FIRST) + a word's values at bits EVEN_POS of even_src and ODD_POS of odd_src
        times the bf16 pair x_pair (its low and high halves). unpack_value's mantissa trick
        (int_unpack.py); `one_bits` (1.0's bits, 0x3F800000) comes as an argument so that each
        mask-and-or is one LOP3 with a register operand."""
        UNIT_E: gl.constexpr = float(1 << (23 - EVEN_POS))
        UNIT_O: gl.constexpr = float(1 << (23 - ODD_POS))
        q_e = ((even_src & (15 << EVEN_POS)) | one_bits).to(gl.float32, bitcast=True) * UNIT_E - UNIT_E
        q_o = ((odd_src & (15 << ODD_POS)) | one_bits).to(gl.float32, bitcast=True) * UNIT_O - UNIT_O
        if FIRST:
            d = q_e * gl.expand_dims(_bf16_low(x_pair), 1)
        else:
            d += q_e * gl.expand_dims(_bf16_low(x_pair), 1)
        d += q_o * gl.expand_dims(_bf16_high(x_pair), 1)
        return d

    @gluon.jit
    def split_k_sum(tile, partials_ptr, offsets, mask, counter_ptr, pid_k, split_k, partial_stride):
        """split_k.finish_tile's protocol for the Gluon kernels: store this program's float32 partial
        at `offsets` of slice pid_k; returns whether this is the tile's last program to arrive and,
        if so, the partials' sum in K order (the counter then reset for the next launch)."""
        gl.store(partials_ptr + pid_k * partial_stride + offsets, tile, mask=mask)
        thread_barrier()                      # every thread's partial stored before the tile counts in
        arrived = gl.atomic_add(counter_ptr, 1, sem="acq_rel", scope="gpu")
        last = arrived == split_k - 1
        total = gl.zeros_like(tile)
        if last:
            for s in range(0, split_k):       # .cg: from L2, where the other programs' stores are
                total += gl.load(partials_ptr + s * partial_stride + offsets, mask=mask, other=0.0,
                                 cache_modifier=".cg")
            gl.atomic_xchg(counter_ptr, 0)
        return last, total

    @gluon.jit
    def _weight_rows(pid_n, n, N, BN: gl.constexpr, GATED: gl.constexpr):
        """Column n of tile pid_n: its weight row (clamped: the last tile re-reads the last row, its
        stores are masked) and whether it exists. GATED: the tile's columns alternate gate and up,
        the activation's column j taking the gate at row j and the up at row N/2 + j."""
        if GATED:
            j = pid_n * (BN // 2) + n // 2
            return (n % 2) * (N // 2) + gl.minimum(j, N // 2 - 1), j < N // 2
        col = pid_n * BN + n
        return gl.minimum(col, N - 1), col < N

    @gluon.jit
    def _store_tile(tile, out_ptr, rows, n, pid_n, M, N, stride_om, R: gl.constexpr, BN: gl.constexpr,
                    GATED: gl.constexpr):
        """The finished [R, BN] tile into the output; GATED: silu(gate) * up of its column pairs,
        rounded as the GEMV's output and kernels/silu_and_mul.py round them apart."""
        dtype: gl.constexpr = out_ptr.dtype.element_ty
        if GATED:
            y = tile.to(dtype).to(gl.float32)
            gate, up = gl.split(gl.reshape(y, [R, BN // 2, 2]))
            j, _ = gl.split(gl.reshape(pid_n * (BN // 2) + n // 2 + rows * 0, [R, BN // 2, 2]))
            rows, _ = gl.split(gl.reshape(rows + n * 0, [R, BN // 2, 2]))
            silu = (gate / (1.0 + gl.exp(-gate))).to(dtype).to(gl.float32)
            gl.store(out_ptr + rows * stride_om + j, (silu * up).to(dtype), mask=(rows < M) & (j < N // 2))
        else:
            cols = pid_n * BN + n
            gl.store(out_ptr + rows * stride_om + cols, tile.to(dtype), mask=(rows < M) & (cols < N))

    @gluon.jit
    def _w4a16_gemv_gluon_kernel(
        x_ptr, qweight_ptr, scales_ptr, mins_ptr, out_ptr, partials_ptr, counters_ptr,
        M, N, K, k_per_split, words_per_split, split_k, one_bits,
        stride_xm, stride_qn, stride_sn, stride_mn, stride_om,
        GROUP_SIZE: gl.constexpr, GROUP_STEP: gl.constexpr, R: gl.constexpr,
        SN: gl.constexpr, TN: gl.constexpr, WN: gl.constexpr, SW: gl.constexpr, TW: gl.constexpr,
        WG: gl.constexpr, SPLIT: gl.constexpr, GATED: gl.constexpr, PDL: gl.constexpr,
    ):
        # A program: R rows, BN columns, one K range, in steps of WG groups of GROUP_STEP values.
        # Tensor dims: (row, column, group of the step, word of the group); x also (pair of the word).
        # A thread holds SN columns x SW words (16 bytes a column) and those words' x for R rows.
        LA: gl.constexpr = gl.BlockedLayout([R, SN, 1, SW], [1, TN, 1, TW], [1, WN, WG, 1], [3, 2, 1, 0])
        LX: gl.constexpr = gl.BlockedLayout([R, SN, 1, SW, 4], [1, TN, 1, TW, 1], [1, WN, WG, 1, 1],
                                            [4, 3, 2, 1, 0])
        LW: gl.constexpr = gl.SliceLayout(0, LA)                       # [BN, G, WPG] packed words
        LX_PAIR: gl.constexpr = gl.SliceLayout(1, LA)                  # [R, G, WPG] one bf16 pair a word
        LX_ROWS: gl.constexpr = gl.SliceLayout(1, LX)                  # [R, G, WPG, 4] x as int32 pairs
        LS: gl.constexpr = gl.SliceLayout(0, gl.SliceLayout(3, LA))    # [BN, G] scales, mins
        LO: gl.constexpr = gl.SliceLayout(2, gl.SliceLayout(3, LA))    # [R, BN] the output tile
        BN: gl.constexpr = SN * TN * WN
        WPG: gl.constexpr = SW * TW
        K_STEP: gl.constexpr = WG * GROUP_STEP
        pid_n = gl.program_id(0)
        pid_k = gl.program_id(1)
        k_start = pid_k * k_per_split
        steps = gl.minimum(k_per_split, K - k_start) // K_STEP

        n, g, w = _indices_3d(BN, WG, WPG, LW)
        w_rows, _ = _weight_rows(pid_n, n, N, BN, GATED)
        w_ptrs = qweight_ptr + w_rows * stride_qn + g * (GROUP_STEP // 8) + w + pid_k * words_per_split
        g, w, p = _indices_3d(WG, WPG, 4, gl.SliceLayout(0, LX_ROWS))
        rows = gl.arange(0, R, layout=gl.SliceLayout(1, gl.SliceLayout(2, gl.SliceLayout(3, LX_ROWS))))
        rows = gl.expand_dims(gl.expand_dims(gl.expand_dims(rows, 1), 2), 3)
        x_ptrs = (x_ptr + gl.minimum(rows, M - 1) * stride_xm
                  + gl.expand_dims(g * (GROUP_STEP // 2) + w * 4 + p, 0) + k_start // 2)
        s_cols, _ = _weight_rows(pid_n, gl.arange(0, BN, layout=gl.SliceLayout(1, LS)), N, BN, GATED)
        s_ptrs = scales_ptr + gl.expand_dims(s_cols, 1) * stride_sn
        m_ptrs = mins_ptr + gl.expand_dims(s_cols, 1) * stride_mn
        group = (k_start + gl.expand_dims(gl.arange(0, WG, layout=gl.SliceLayout(0, LS)) * GROUP_STEP, 0)) \
            // GROUP_SIZE

        words = gl.load(w_ptrs)               # the weights do not depend on the kernel ahead (pdl.py)
        wait_for_previous(PDL)
        x = gl.load(x_ptrs)
        scale = gl.load(s_ptrs + group)
        low = gl.load(m_ptrs + group)
        acc = gl.zeros([R, BN, WG, WPG], gl.float32, LA)
        for step in range(0, steps):
            # the next step's loads go out before this step's arithmetic (registers, not shared memory)
            more = step + 1 < steps
            w_ptrs += K_STEP // 8
            x_ptrs += K_STEP // 2
            if K_STEP % GROUP_SIZE == 0:
                group += K_STEP // GROUP_SIZE
            else:
                group = (k_start + (step + 1) * K_STEP + gl.expand_dims(
                    gl.arange(0, WG, layout=gl.SliceLayout(0, LS)) * GROUP_STEP, 0)) // GROUP_SIZE
            words_next = gl.load(w_ptrs, mask=more)
            x_next = gl.load(x_ptrs, mask=more)
            scale_next = gl.load(s_ptrs + group, mask=more)
            low_next = gl.load(m_ptrs + group, mask=more)

            # word value j pairs with x[8 * word + j]: pair p of x holds values 2p (low half) and 2p + 1
            evens, odds = gl.split(gl.reshape(x, [R, WG, WPG, 2, 2]))
            x0, x2 = gl.split(evens)
            x1, x3 = gl.split(odds)
            x0 = gl.convert_layout(x0, LX_PAIR, assert_trivial=True)
            x1 = gl.convert_layout(x1, LX_PAIR, assert_trivial=True)
            x2 = gl.convert_layout(x2, LX_PAIR, assert_trivial=True)
            x3 = gl.convert_layout(x3, LX_PAIR, assert_trivial=True)
            # value j at bits 4j; a mantissa holds bits 0-22, so values 5-7 are shifted down first
            w0 = gl.expand_dims(words, 0)
            w16 = w0 >> 16
            d = _pair_products(None, w0, 0, w0, 4, x0, one_bits, True)
            d = _pair_products(d, w0, 8, w0, 12, x1, one_bits, False)
            d = _pair_products(d, w0, 16, w16, 4, x2, one_bits, False)
            d = _pair_products(d, w16, 8, w16, 12, x3, one_bits, False)
            x_sum = (_bf16_low(x0) + _bf16_high(x0) + _bf16_low(x1) + _bf16_high(x1)
                     + _bf16_low(x2) + _bf16_high(x2) + _bf16_low(x3) + _bf16_high(x3))
            acc += d * gl.expand_dims(gl.expand_dims(scale.to(gl.float32), 0), 3)
            acc += gl.expand_dims(gl.expand_dims(low.to(gl.float32), 0), 3) * gl.expand_dims(x_sum, 1)
            words = words_next
            x = x_next
            scale = scale_next
            low = low_next

        tile = gl.sum(gl.sum(acc, axis=3), axis=2)                    # [R, BN]
        out_rows = gl.expand_dims(gl.arange(0, R, layout=gl.SliceLayout(1, LO)), 1)
        out_n = gl.expand_dims(gl.arange(0, BN, layout=gl.SliceLayout(0, LO)), 0)
        if not SPLIT:
            _store_tile(tile, out_ptr, out_rows, out_n, pid_n, M, N, stride_om, R, BN, GATED)
        else:       # the tile's last program sums the partials in K order
            cols, exists = _weight_rows(pid_n, out_n, N, BN, GATED)
            last, total = split_k_sum(tile, partials_ptr, out_rows * N + cols, (out_rows < M) & exists,
                                      counters_ptr + pid_n, pid_k, split_k, M * N)
            if last:
                _store_tile(total, out_ptr, out_rows, out_n, pid_n, M, N, stride_om, R, BN, GATED)


def gemv_shape(group_size: int, K: int, num_warps: int) -> dict | None:
    """The layout constants for this weight (None: the kernel cannot take it). A step covers WG
    groups of GROUP_STEP values (a group of more than 128 values is walked 128 at a time);
    a thread's 4 words are 16 contiguous bytes of a column."""
    if group_size in (32, 64):
        step = group_size
    elif group_size % 128 == 0:
        step = 128
    else:
        return None
    if K % step:
        return None
    wg = num_warps
    while wg > 1 and K % (wg * step):
        wg //= 2
    words = step // 8
    return dict(GROUP_STEP=step, SW=4, TW=words // 4, TN=32 // (words // 4), WG=wg, WN=num_warps // wg)


# w4a16_gemm sends bfloat16 rows up to GLUON_GEMV_MAX_ROWS here (the kernel takes at most 2: its
# x registers spill beyond), with these settings: SN columns a thread, split-K for ~split_per_sm
# programs an SM. On an H100 at one row it read Llama-3.2-1B's four linears from HBM in 27.0 us
# against the Triton GEMV's 37.9 (the best of four settings, this one); at two rows 38.3 against
# 39.8, and a 2-sequence decode step took 1.048 against 1.068 ms (docs/benchmarks.md, 2026-12-07).
# On sm_90 w4a16_mma.py's tensor-core kernel takes 2-row products first (34.6 us for the four), but
# not gated ones.
GLUON_GEMV_MAX_ROWS = 2
GLUON_GEMV_CONFIG = {"SN": 4, "num_warps": 4, "split_per_sm": 4}


def set_gluon_gemv_max_rows(rows: int) -> None:
    """For benchmarks: the Gluon GEMV up to `rows` rows (0: never)."""
    global GLUON_GEMV_MAX_ROWS
    GLUON_GEMV_MAX_ROWS = rows


def gluon_gemv(x, qweight, scales, mins, bits, group_size, g_idx, split_k, config,
               gated: bool = False) -> torch.Tensor | None:
    """w4a16_gemm's product through this kernel, or None where it does not apply (config GLUON:
    up to 2 rows whatever GLUON_GEMV_MAX_ROWS says), or where this triton's Gluon cannot compile
    it (then the Triton kernels from then on). `gated`: the product is a gated MLP's gate and up
    halves [M, 2I], and the result silu(gate) * up [M, I] (layers/activation.py)."""
    M, K = x.shape
    max_rows = 2 if config and config.get("GLUON") else min(GLUON_GEMV_MAX_ROWS, 2)
    if not (0 < M <= max_rows and x.is_cuda and bits == 4 and g_idx is None and x.dtype == torch.bfloat16
            and x.stride(1) == 1 and x.stride(0) % 2 == 0 and x.storage_offset() % 2 == 0   # (read as int32 pairs)
            and qweight.stride(1) == 1 and scales.stride(1) == 1 and mins.stride(1) == 1 and gluon_available()):
        return None
    cfg = {**GLUON_GEMV_CONFIG, **(config or {})}
    shape = gemv_shape(group_size, K, cfg["num_warps"])
    if shape is None:
        return None
    N = qweight.shape[0]
    if gated and (N % 2 or cfg["SN"] % 2 or not _GATED_COMPILES):     # (a thread's columns: whole pairs)
        return None
    block_n = cfg["SN"] * shape["TN"] * shape["WN"]
    tiles = triton.cdiv(N // 2, block_n // 2) if gated else triton.cdiv(N, block_n)
    k_step = shape["WG"] * shape["GROUP_STEP"]
    if split_k is None:
        split_k = split_k_module.default_split_k(tiles, K // k_step, x.device, cfg["split_per_sm"])
    k_per_split, split_k = split_k_module.k_ranges(K, k_step, split_k)
    out = torch.empty(M, N // 2 if gated else N, dtype=x.dtype, device=x.device)
    partials, counters = split_k_module.split_buffers(out, split_k, tiles, columns=N)
    launched = _launch((tiles, split_k), x.view(torch.int32), qweight, scales, mins, out, partials, counters,
                       M, N, K, k_per_split, k_per_split // 8, split_k, 0x3F800000,
                       x.stride(0) // 2, qweight.stride(0), scales.stride(0), mins.stride(0), out.stride(0),
                       GROUP_SIZE=group_size, R=triton.next_power_of_2(M), SN=cfg["SN"], SPLIT=split_k > 1, GATED=gated,
                       num_warps=cfg["num_warps"], **shape, **pdl_options(x.device))
    return out if launched else None


def _launch(grid, *args, **kwargs) -> bool:
    """Launch the kernel; False, a warning (once) and the kernel (or only its gated variant) off
    from then on where this triton's Gluon cannot compile it."""
    global _COMPILES, _GATED_COMPILES
    try:
        _w4a16_gemv_gluon_kernel[grid](*args, **kwargs)
    except TritonError as e:    # Gluon's API still moves (checked with triton 3.6 and 3.9); also ptxas, resources
        if kwargs.get("GATED"):
            _GATED_COMPILES = False
        else:
            _COMPILES = False
        logger.warning("the Gluon 4-bit GEMV does not compile with triton %s (%s); using the Triton GEMV",
                       triton.__version__, str(e).splitlines()[-1] if str(e) else type(e).__name__)
        return False
    return True
