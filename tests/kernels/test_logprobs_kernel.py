"""The one-pass logsumexp / rank / top-k kernel against torch. In Triton's CPU interpreter without CUDA."""
import pytest
import torch

from nanovllm.kernels import triton_available

pytestmark = pytest.mark.skipif(not triton_available(), reason="triton is not installed")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def make_logits(dtype):
    gen = torch.Generator().manual_seed(1)
    logits = (torch.randn(5, 5000, generator=gen) * 4).to(dtype)     # several chunks, the last partial
    logits[1, 4000:] = float("-inf")                                  # masked tokens
    logits[2, :3] = logits[2].max() + 1                               # a three-way tie at the top
    logits[4, 4090] = logits[4, 4100] = logits[4, 17] = logits[4].max() + 1   # a tie across chunks
    return logits


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])   # bf16 is only loaded
def test_logsumexp_and_rank_match_torch(dtype):
    from nanovllm.kernels import logsumexp_and_rank
    logits = make_logits(dtype)
    tokens = torch.tensor([7, 123, 1, int(logits[3].float().argmin()), 4100])
    lse, rank = logsumexp_and_rank(logits.to(DEVICE), tokens.to(DEVICE))
    x = logits.float()
    torch.testing.assert_close(lse.cpu(), torch.logsumexp(x, -1), rtol=1e-5, atol=1e-5)
    expected_rank = (x >= x.gather(-1, tokens[:, None])).sum(-1)
    assert torch.equal(rank.cpu(), expected_rank)
    assert rank[2] == 3 and rank[3] == 5000 and rank[4] == 3          # ties rank low; the least likely is last


@pytest.mark.parametrize("dtype, chunk", [(torch.float32, 4096), (torch.float16, 512), (torch.bfloat16, 1024)])
def test_top_k_is_torch_topk_with_ties_to_the_lowest_id(dtype, chunk, monkeypatch):
    from nanovllm.kernels import logprobs, logprobs_and_top_k
    monkeypatch.setattr(logprobs, "CHUNK", chunk)
    logits = make_logits(dtype)
    tokens = torch.tensor([7, 123, 1, 9, 4100])
    x = logits.float()
    for k in (0, 1, 5, 20):
        lse, rank, top_ids = logprobs_and_top_k(logits.to(DEVICE), tokens.to(DEVICE), k)
        top_ids = top_ids.cpu()
        assert top_ids.shape == (5, k) and top_ids.dtype == torch.int64
        torch.testing.assert_close(lse.cpu(), torch.logsumexp(x, -1), rtol=1e-5, atol=1e-5)
        assert torch.equal(rank.cpu(), (x >= x.gather(-1, tokens[:, None])).sum(-1))
        # torch's values; among equal values, ascending ids (a stable sort of the row)
        expected = x.sort(dim=-1, descending=True, stable=True).indices[:, :k]
        assert torch.equal(top_ids, expected), k
    assert top_ids[2, :3].tolist() == [0, 1, 2] and top_ids[4, :3].tolist() == [17, 4090, 4100]


def test_top_k_with_fewer_finite_logits_than_k():
    from nanovllm.kernels import logprobs_and_top_k
    logits = torch.full((2, 30), float("-inf"))
    logits[0, [3, 8]] = torch.tensor([1.0, 2.0])
    logits[1] = torch.arange(30.0)
    _, _, top_ids = logprobs_and_top_k(logits.to(DEVICE), torch.tensor([3, 0]).to(DEVICE), 5)
    top_ids = top_ids.cpu()
    assert top_ids[0, :2].tolist() == [8, 3] and len(set(top_ids[0].tolist())) == 5    # then -inf ones, no repeats
    assert top_ids[1].tolist() == [29, 28, 27, 26, 25]
    _, _, all_ids = logprobs_and_top_k(logits[1:].to(DEVICE), torch.tensor([0]).to(DEVICE), 40)   # k > V
    assert all_ids.shape == (1, 30)
