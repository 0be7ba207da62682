"""The fused MoE kernels (two grouped GEMMs over tokens sorted by expert) against the torch
loop over experts (moe_reference.fused_moe_reference). Without CUDA they run in Triton's CPU
interpreter, in float32 and float16, at small sizes."""
import pytest
import torch

from nanovllm.kernels import triton_available
from nanovllm.kernels.moe_reference import fused_moe_reference

pytestmark = pytest.mark.skipif(not triton_available(), reason="triton is not installed")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def routed(tokens: int, experts: list[list[int]], num_experts: int, hidden: int, inter: int, dtype, seed=0):
    """Random x and weights; token t goes to experts[t % len(experts)] with random weights."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, hidden, generator=gen)
    w13 = torch.randn(num_experts, 2 * inter, hidden, generator=gen) / hidden ** 0.5
    w2 = torch.randn(num_experts, hidden, inter, generator=gen) / inter ** 0.5
    ids = torch.tensor([experts[t % len(experts)] for t in range(tokens)])
    weights = torch.rand(ids.shape, generator=gen)
    to = lambda t: t.to(DEVICE, dtype)  # noqa: E731
    return to(x), to(w13), to(w2), to(weights), ids.to(DEVICE)


CASES = {
    # name: (tokens, routing pattern, experts, hidden, intermediate, config)
    # expert 0 takes nearly every token, 1..2 a few, 3 and 5 none (uneven; empty experts)
    "uneven_empty_experts": (21, [[0, 1], [0, 2], [0, 4], [4, 0], [1, 0]], 6, 32, 48, {}),
    # one token (a decode step), top-4
    "one_token_top4": (1, [[5, 2, 7, 0]], 8, 64, 32, {}),
    # large tiles (prompt-sized): a single tile per expert, many padding slots; K blocks < hidden
    "block_m64_small_k": (40, [[1, 3], [3, 2], [2, 1]], 4, 48, 40, {"BLOCK_M": 64, "BLOCK_K": 16, "BLOCK_N": 16}),
}


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_fused_moe_matches_reference(case, dtype):
    from nanovllm.kernels.fused_moe import fused_moe
    tokens, pattern, num_experts, hidden, inter, config = CASES[case]
    x, w13, w2, weights, ids = routed(tokens, pattern, num_experts, hidden, inter, dtype)
    out = fused_moe(x, w13, w2, weights, ids, config=config)
    ref = fused_moe_reference(x.float(), w13.float(), w2.float(), weights.float(), ids)
    assert out.shape == x.shape and out.dtype == dtype and torch.isfinite(out).all()
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(out.float(), ref, atol=tol, rtol=tol)


def test_align_by_expert_groups_and_pads():
    from nanovllm.kernels.fused_moe import align_by_expert
    ids = torch.tensor([[2, 0], [2, 3], [0, 2], [2, 2]], device=DEVICE)   # expert 1 gets nothing
    sorted_pairs, tile_expert, num_padded = align_by_expert(ids, num_experts=4, block_m=2)
    # expert 0: pairs 1, 4 | expert 2: pairs 0, 2, 5, 6, 7 (+1 pad) | expert 3: pair 3 (+1 pad)
    assert int(num_padded) == 10
    pad = ids.numel()
    assert sorted_pairs[:10].tolist() == [1, 4, 0, 2, 5, 6, 7, pad, 3, pad]
    assert tile_expert[:5].tolist() == [0, 2, 2, 2, 3]
    assert (sorted_pairs[10:] == pad).all()


def test_fused_moe_rejects_mismatched_shapes():
    from nanovllm.kernels.fused_moe import fused_moe
    x, w13, w2, weights, ids = routed(4, [[0, 1]], 2, 32, 16, torch.float32)
    with pytest.raises(ValueError, match="do not fit"):
        fused_moe(x, w13, w2[:, :, :8], weights, ids)
    with pytest.raises(ValueError, match="top_k"):
        fused_moe(x, w13, w2, weights[:, :1], ids)
