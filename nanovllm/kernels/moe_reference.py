"""Mixture of experts, one expert at a time in plain torch: the MoE layer on a CPU, and the
ground truth of the fused Triton kernel (fused_moe.py)."""
import torch
import torch.nn.functional as F


def fused_moe_reference(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, topk_weights: torch.Tensor,
                        topk_ids: torch.Tensor) -> torch.Tensor:
    """Mixture of experts, one expert at a time: the ground truth of kernels/fused_moe.py and
    the engine's MoE on the CPU.

    x [T, H]; w13 [E, 2I, H], each expert's gate rows then its up rows; w2 [E, H, I];
    topk_ids / topk_weights [T, K], the experts each token is routed to and their weights.
    out[t] = sum_k topk_weights[t, k] * w2[e] @ (silu(gate_e x_t) * up_e x_t), e = topk_ids[t, k].
    """
    out = torch.zeros_like(x)
    inter = w13.shape[1] // 2
    for expert in topk_ids.unique().tolist():        # ascending: experts that got no token are skipped
        token, slot = torch.where(topk_ids == expert)
        gate_up = x[token] @ w13[expert].t()
        hidden = F.silu(gate_up[:, :inter]) * gate_up[:, inter:]
        y = (hidden @ w2[expert].t()) * topk_weights[token, slot, None].to(x.dtype)
        out.index_add_(0, token, y)
    return out
