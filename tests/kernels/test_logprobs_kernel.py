"""The one-pass logsumexp-and-rank kernel against torch. In Triton's CPU interpreter without CUDA."""
import pytest
import torch

from nanovllm.kernels import triton_available

pytestmark = pytest.mark.skipif(not triton_available(), reason="triton is not installed")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])   # bf16 is only loaded
def test_logsumexp_and_rank_match_torch(dtype):
    from nanovllm.kernels import logsumexp_and_rank
    gen = torch.Generator().manual_seed(1)
    logits = (torch.randn(4, 5000, generator=gen) * 4).to(dtype)     # several tiles, the last partial
    logits[1, 4000:] = float("-inf")                                  # masked tokens
    logits[2, :3] = logits[2].max() + 1                               # a three-way tie at the top
    tokens = torch.tensor([7, 123, 1, int(logits[3].float().argmin())])
    lse, rank = logsumexp_and_rank(logits.to(DEVICE), tokens.to(DEVICE))
    x = logits.float()
    torch.testing.assert_close(lse.cpu(), torch.logsumexp(x, -1), rtol=1e-5, atol=1e-5)
    expected_rank = (x >= x.gather(-1, tokens[:, None])).sum(-1)
    assert torch.equal(rank.cpu(), expected_rank)
    assert rank[2] == 3 and rank[3] == 5000                           # ties rank low; the least likely is last
