"""Triton kernels: a mixture-of-experts MLP as two grouped GEMMs.

Each token goes to K of E experts (x [T, H] -> K (token, expert) pairs). A plain loop over
experts launches a few kernels per expert and reads each expert's weights once per launch;
with 128 experts that is hundreds of launches a layer. Here instead:

* The T*K pairs are sorted by expert (`align_by_expert`, a few torch ops on the device, no
  host sync) and each expert's run of pairs is padded to a multiple of BLOCK_M, so every tile
  of BLOCK_M sorted pairs belongs to one expert. Padding slots hold an out-of-range pair id.
  The number of tiles is bounded by cdiv(T*K, BLOCK_M) + E without reading the counts; tiles
  past the real total exit at once (so the grid depends on shapes only: graph-safe).
* Kernel 1, one grouped GEMM for gate and up: program (tile, column block) gathers its pairs'
  token rows of x and multiplies them by its expert's gate and up rows, and writes
  silu(gate) * up for those pairs: [T*K, I].
* Kernel 2, one grouped GEMM for down: the same tiles times the expert's down projection,
  scaled by each pair's routing weight: [T*K, H]; the K rows of each token are then summed.
Accumulation is in fp32. Reference: moe_reference.py's fused_moe_reference (a loop over experts).
"""
import torch
import triton
import triton.language as tl

# Tuning knobs (defaults, not tuned on hardware yet); benchmarks may override them.
DEFAULT_CONFIG = {"BLOCK_N": 64, "BLOCK_K": 64, "num_warps": 4, "num_stages": 2}


def align_by_expert(topk_ids: torch.Tensor, num_experts: int, block_m: int):
    """(sorted_pairs [max_tiles * block_m], tile_expert [max_tiles], num_padded [1]):
    pair ids (token * K + k) grouped by expert, each group padded with the id T*K to a multiple
    of block_m; the expert of each tile; how many slots the groups fill."""
    flat = topk_ids.flatten()
    pairs = flat.numel()
    counts = torch.zeros(num_experts, dtype=torch.int64, device=flat.device)
    counts.scatter_add_(0, flat.long(), torch.ones_like(flat, dtype=torch.int64))
    padded = (counts + block_m - 1) // block_m * block_m
    padded_ends = torch.cumsum(padded, 0)
    order = torch.argsort(flat, stable=True)               # pair ids, by expert
    expert_of = flat[order].long()
    rank = torch.arange(pairs, device=flat.device) - (torch.cumsum(counts, 0) - counts)[expert_of]
    max_tiles = min(pairs, triton.cdiv(pairs, block_m) + num_experts)
    sorted_pairs = torch.full((max_tiles * block_m,), pairs, dtype=torch.int32, device=flat.device)
    sorted_pairs[(padded_ends - padded)[expert_of] + rank] = order.to(torch.int32)
    tile_starts = torch.arange(max_tiles, device=flat.device) * block_m
    tile_expert = torch.searchsorted(padded_ends, tile_starts, right=True).clamp_(max=num_experts - 1)
    return sorted_pairs, tile_expert.to(torch.int32), padded_ends[-1:].to(torch.int32)


@triton.jit
def _gate_up_kernel(
    x_ptr, w_ptr, out_ptr, sorted_pairs_ptr, tile_expert_ptr, num_padded_ptr,
    num_pairs, hidden, inter,
    stride_xt, stride_xh, stride_we, stride_wn, stride_wh, stride_op, stride_oi,
    TOP_K: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    IEEE: tl.constexpr,
):
    tile = tl.program_id(0)
    if tile * BLOCK_M >= tl.load(num_padded_ptr):
        return                                   # a spare tile
    expert = tl.load(tile_expert_ptr + tile).to(tl.int64)
    pair = tl.load(sorted_pairs_ptr + tile * BLOCK_M + tl.arange(0, BLOCK_M))
    real = pair < num_pairs
    token = (pair // TOP_K).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < inter
    ks = tl.arange(0, BLOCK_K)
    x_rows = x_ptr + token[:, None] * stride_xt
    gate_rows = w_ptr + expert * stride_we + cols[None, :] * stride_wn          # [K, N] tiles of W^T
    up_rows = gate_rows + inter * stride_wn
    gate = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    up = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for k0 in range(0, hidden, BLOCK_K):
        k = k0 + ks
        a = tl.load(x_rows + k[None, :] * stride_xh, mask=real[:, None] & (k[None, :] < hidden), other=0.0)
        w_mask = (k[:, None] < hidden) & col_ok[None, :]
        wg = tl.load(gate_rows + k[:, None] * stride_wh, mask=w_mask, other=0.0)
        wu = tl.load(up_rows + k[:, None] * stride_wh, mask=w_mask, other=0.0)
        if IEEE:
            gate = tl.dot(a, wg, gate, input_precision="ieee")
            up = tl.dot(a, wu, up, input_precision="ieee")
        else:
            gate = tl.dot(a, wg, gate)
            up = tl.dot(a, wu, up)
    # silu(gate) * up, each rounded to the activations' dtype as the torch MLP rounds them
    dtype = out_ptr.dtype.element_ty
    gate = gate.to(dtype).to(tl.float32)
    hidden_act = (gate / (1.0 + tl.exp(-gate))).to(dtype) * up.to(dtype)
    tl.store(out_ptr + pair.to(tl.int64)[:, None] * stride_op + cols[None, :] * stride_oi, hidden_act,
             mask=real[:, None] & col_ok[None, :])


@triton.jit
def _down_kernel(
    a_ptr, w_ptr, out_ptr, weights_ptr, sorted_pairs_ptr, tile_expert_ptr, num_padded_ptr,
    num_pairs, hidden, inter,
    stride_ap, stride_ai, stride_we, stride_wn, stride_wi, stride_op, stride_oh,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, IEEE: tl.constexpr,
):
    tile = tl.program_id(0)
    if tile * BLOCK_M >= tl.load(num_padded_ptr):
        return
    expert = tl.load(tile_expert_ptr + tile).to(tl.int64)
    pair = tl.load(sorted_pairs_ptr + tile * BLOCK_M + tl.arange(0, BLOCK_M))
    real = pair < num_pairs
    pair64 = pair.to(tl.int64)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < hidden
    ks = tl.arange(0, BLOCK_K)
    a_rows = a_ptr + pair64[:, None] * stride_ap
    w_cols = w_ptr + expert * stride_we + cols[None, :] * stride_wn
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for k0 in range(0, inter, BLOCK_K):
        k = k0 + ks
        a = tl.load(a_rows + k[None, :] * stride_ai, mask=real[:, None] & (k[None, :] < inter), other=0.0)
        w = tl.load(w_cols + k[:, None] * stride_wi, mask=(k[:, None] < inter) & col_ok[None, :], other=0.0)
        if IEEE:
            acc = tl.dot(a, w, acc, input_precision="ieee")
        else:
            acc = tl.dot(a, w, acc)
    dtype = out_ptr.dtype.element_ty
    routing = tl.load(weights_ptr + pair64, mask=real, other=0.0).to(dtype)
    y = acc.to(dtype) * routing[:, None]
    tl.store(out_ptr + pair64[:, None] * stride_op + cols[None, :] * stride_oh, y, mask=real[:, None] & col_ok[None, :])


def fused_moe(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, topk_weights: torch.Tensor,
              topk_ids: torch.Tensor, *, config: dict | None = None) -> torch.Tensor:
    """x [T, H]; w13 [E, 2I, H] (gate rows, then up rows); w2 [E, H, I]; topk_weights and
    topk_ids [T, K]. Returns [T, H] in x's dtype (as moe_reference.fused_moe_reference)."""
    tokens, hidden = x.shape
    num_experts, two_inter, _ = w13.shape
    inter = two_inter // 2
    if w13.shape[2] != hidden or two_inter % 2 or w2.shape != (num_experts, hidden, inter):
        raise ValueError(f"fused_moe: x {tuple(x.shape)}, w13 {tuple(w13.shape)} and w2 {tuple(w2.shape)} "
                         f"do not fit together")
    if topk_ids.shape != topk_weights.shape or topk_ids.shape[0] != tokens:
        raise ValueError(f"fused_moe: topk_ids {tuple(topk_ids.shape)} and topk_weights "
                         f"{tuple(topk_weights.shape)} must both be [tokens={tokens}, top_k]")
    top_k = topk_ids.shape[1]
    num_pairs = tokens * top_k
    if num_pairs == 0:
        return torch.zeros_like(x)
    cfg = {**DEFAULT_CONFIG, **(config or {})}
    # small tiles when each expert gets few pairs (decode), larger ones for prompts
    block_m = cfg.get("BLOCK_M") or (16 if num_pairs <= 32 * num_experts else 64)
    sorted_pairs, tile_expert, num_padded = align_by_expert(topk_ids, num_experts, block_m)
    max_tiles = tile_expert.shape[0]
    ieee = x.dtype == torch.float32
    launch = dict(num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])

    activated = torch.empty(num_pairs, inter, dtype=x.dtype, device=x.device)
    block_n = min(cfg["BLOCK_N"], max(16, triton.next_power_of_2(inter)))
    block_k = min(cfg["BLOCK_K"], max(16, triton.next_power_of_2(hidden)))
    _gate_up_kernel[(max_tiles, triton.cdiv(inter, block_n))](
        x, w13, activated, sorted_pairs, tile_expert, num_padded, num_pairs, hidden, inter,
        *x.stride(), *w13.stride(), *activated.stride(),
        TOP_K=top_k, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, IEEE=ieee, **launch)

    per_pair = torch.empty(num_pairs, hidden, dtype=x.dtype, device=x.device)
    block_n = min(cfg["BLOCK_N"], max(16, triton.next_power_of_2(hidden)))
    block_k = min(cfg["BLOCK_K"], max(16, triton.next_power_of_2(inter)))
    _down_kernel[(max_tiles, triton.cdiv(hidden, block_n))](
        activated, w2, per_pair, topk_weights.contiguous().view(-1), sorted_pairs, tile_expert, num_padded,
        num_pairs, hidden, inter, *activated.stride(), *w2.stride(), *per_pair.stride(),
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, IEEE=ieee, **launch)
    return per_pair.view(tokens, top_k, hidden).sum(dim=1)
