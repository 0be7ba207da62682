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


# The floor (k >= FLOOR_MIN_K): a chunk does only as many rounds as it has tokens at or above a
# lower bound on its row's k-th largest key. "off" is the k-rounds-everywhere path.
FLOOR_MODES = {"off": dict(FLOOR_MIN_K=10**9), "group_max": dict(FLOOR_MIN_K=0)}


def set_floor_mode(monkeypatch, mode, chunk=256, group=16):
    from nanovllm.kernels import logprobs
    for name, value in dict(FLOOR_MODES[mode], CHUNK=chunk, GROUP=group).items():
        monkeypatch.setattr(logprobs, name, value)


def order_keys(x):
    """order_key in torch: float32 -> int32 in the same order."""
    bits = x.float().view(torch.int32)
    return torch.where(bits >= 0, bits, bits ^ 0x7FFFFFFF)


def many_chunk_logits(dtype):
    """12 chunks of 256 (192 groups of 16) per row, rows that make the floor's cases."""
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(7, 3000, generator=gen) * 2
    x[1, torch.arange(20) * 149 + 3] = 20 + torch.arange(20.0)            # the top 20 in 12 chunks
    x[2, 384:404] = 20 + torch.arange(20.0)                               # ... in one chunk, 2 groups
    x[3, [255, 256, 900, 5, 2999, 1500]] = 30.0                           # ties at the top and at the
    x[3, torch.arange(30) * 97 + 1] = 25.0                                # k-th place, across chunk borders
    x[3, [511, 512, 767, 768]] = 25.0
    x[4, :] = float("-inf")                                               # 7 finite: k=20 takes -inf ids
    x[4, [2990, 10, 700, 128, 127, 1800, 2400]] = torch.tensor([1.0, 5, 5, 3, 2, 7, 1])
    x[5, :] = float("-inf")                                               # nothing finite
    x[6, 2048:] = float("-inf")                                           # -inf chunks, a tie at the top
    x[6, [2047, 0, 1024]] = 12.0
    return x.to(dtype)


@pytest.mark.parametrize("mode", list(FLOOR_MODES))
@pytest.mark.parametrize("dtype", [torch.float32,     # 16-bit inputs (bf16 is only loaded) in the slow run
                                   pytest.param(torch.float16, marks=pytest.mark.slow),
                                   pytest.param(torch.bfloat16, marks=pytest.mark.slow)])
def test_top_k_over_many_chunks_matches_a_stable_sort(mode, dtype, monkeypatch):
    from nanovllm.kernels import logprobs_and_top_k
    set_floor_mode(monkeypatch, mode)
    logits = many_chunk_logits(dtype)
    x = logits.float()
    tokens = torch.tensor([5, 3, 390, 97, 700, 11, 0])
    expected_rank = (x >= x.gather(-1, tokens[:, None])).sum(-1)
    for k in (8, 20):          # (k = 1 with a floor: the test below)
        lse, rank, top_ids = logprobs_and_top_k(logits.to(DEVICE), tokens.to(DEVICE), k)
        torch.testing.assert_close(lse.cpu(), torch.logsumexp(x, -1), rtol=1e-5, atol=1e-5)
        assert torch.equal(rank.cpu(), expected_rank)
        expected = x.sort(dim=-1, descending=True, stable=True).indices[:, :k]
        assert torch.equal(top_ids.cpu(), expected), (mode, k)
    assert top_ids[3].tolist() == [5, 255, 256, 900, 1500, 2999, 1, 98, 195, 292, 389, 486, 511, 512, 583, 680,
                                   767, 768, 777, 874]
    assert top_ids[4, :9].tolist() == [1800, 10, 700, 128, 127, 2400, 2990, 0, 1]
    assert top_ids[5].tolist() == list(range(20)) and rank[5] == 3000


@pytest.mark.parametrize("k", [1, 5, 30, 31, 40])
def test_top_k_floor_when_k_reaches_the_vocabulary(k, monkeypatch):
    """V = 31: one chunk of 32, groups of 8 (4 groups: the group floor gives up above k = 4);
    k >= V: every token, and the threshold floor is below every key."""
    from nanovllm.kernels import logprobs_and_top_k
    for mode in FLOOR_MODES:
        set_floor_mode(monkeypatch, mode, chunk=16, group=8)
        logits = torch.full((2, 31), float("-inf"))
        logits[0, [3, 8, 30]] = torch.tensor([1.0, 2.0, 2.0])
        logits[1] = torch.arange(31.0) % 7
        _, rank, top_ids = logprobs_and_top_k(logits.to(DEVICE), torch.tensor([3, 0]).to(DEVICE), k)
        expected = logits.sort(dim=-1, descending=True, stable=True).indices[:, :k]
        assert torch.equal(top_ids.cpu(), expected), (mode, k)
        assert rank.tolist() == [3, 31]


def test_floor_is_a_close_lower_bound_on_the_kth_largest(monkeypatch):
    """Each row's floor is <= its k-th largest key (else top tokens would be lost), and close
    to it (else the kernel does many rounds): few more than k tokens at or above it."""
    from nanovllm.kernels import logprobs
    set_floor_mode(monkeypatch, "group_max")
    logits = many_chunk_logits(torch.float32)
    for k in (5, 20):
        floors = logprobs._row_floors(logits.to(DEVICE), k, 256, 12).cpu()
        keys = order_keys(logits)
        kth = keys.sort(dim=-1, descending=True).values[:, k - 1]
        assert (floors <= kth).all(), k
        at_or_above = (keys >= floors[:, None]).sum(-1)
        assert at_or_above[0] <= k + 4 and at_or_above[1] == k, (k, at_or_above)      # spread: near exact


def test_a_chunk_of_only_masked_tokens_warns_nothing(monkeypatch):
    """A chunk whose logits are all -inf has logsumexp -inf, found without taking log(0) (which
    Triton's interpreter reported as a RuntimeWarning for every such chunk)."""
    import warnings

    from nanovllm.kernels import logprobs, logsumexp_and_rank
    monkeypatch.setattr(logprobs, "CHUNK", 16)
    logits = torch.randn(2, 48)
    logits[0, 16:32] = float("-inf")          # the middle chunk of row 0
    logits[1, :] = float("-inf")
    logits[1, 40] = 0.0
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        lse, rank = logsumexp_and_rank(logits.to(DEVICE), torch.tensor([3, 40]).to(DEVICE))
    torch.testing.assert_close(lse.cpu(), torch.logsumexp(logits, -1), rtol=1e-5, atol=1e-5)
    assert rank.tolist() == [int((logits[0] >= logits[0, 3]).sum()), 1]
