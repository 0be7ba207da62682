"""The sampler's logprobs: of the raw logits (before penalties, temperature and filters), with
vLLM's ranks, on the torch path and the fused one (Triton; in the interpreter on a CPU)."""
import pytest
import torch

from nanovllm.layers.logprobs import gather_logprobs
from tests.test_sampler import CPU, KERNEL_DEVICE, fixed_logits, row, sample


@pytest.mark.parametrize("fused", [False, True])
def test_logprobs_are_raw_log_softmax_with_ranks(fused):
    torch.manual_seed(3)
    logits = fixed_logits(6, seed=9)
    rows = [row(temperature=0.5, logprobs=5, top_k=4, repetition_penalty=1.5, output=[3, 3]),
            row(temperature=0.0, logprobs=0),
            row(temperature=1.0),                       # no logprobs: still gets the batch's k
            row(temperature=1.8, logprobs=3, presence_penalty=1.0, output=[7]),
            row(temperature=1.0, logprobs=20),
            row(temperature=0.0)]
    out = sample(fused, logits, rows)
    lp = out.logprobs
    ref = torch.log_softmax(logits, -1)
    k = 20
    assert lp.top_ids.shape == (6, k) and lp.top_logprobs.shape == (6, k)
    assert lp.top_ids.dtype == torch.int64 and lp.token_ranks.dtype == torch.int64
    assert lp.token_logprobs.dtype == torch.float32
    assert torch.equal(lp.token_ids, out.sampled_token_ids)
    torch.testing.assert_close(lp.token_logprobs, ref.gather(1, out.sampled_token_ids[:, None])[:, 0])
    order = ref.argsort(-1, descending=True)
    assert torch.equal(lp.top_ids, order[:, :k])
    torch.testing.assert_close(lp.top_logprobs, ref.gather(1, order[:, :k]))
    ranks = (order == out.sampled_token_ids[:, None]).float().argmax(-1) + 1
    assert torch.equal(lp.token_ranks, ranks)
    assert lp.token_ranks[1] == 1 and lp.token_ranks[5] == 1  # greedy rows


@pytest.mark.parametrize("fused", [False, True])
def test_gather_logprobs_for_given_tokens(fused):
    logits = fixed_logits(5, seed=10)
    targets = torch.tensor([0, 5, 63, 17, 2])
    # Ties with the target: vLLM's rank counts every token at least as likely as it (the
    # token itself and its equals), so a tie ranks low; "1 + the more likely ones" would not.
    logits[0, [7, 40]] = logits[0, 0].item()
    logits[3, 9] = logits[3, 17].item()
    logprobs = torch.log_softmax(logits, -1)
    device = KERNEL_DEVICE if fused else CPU
    out = gather_logprobs(logprobs.to(device), targets.to(device), 0, fused)
    assert out.top_ids.shape == (5, 0)
    torch.testing.assert_close(out.token_logprobs.cpu(), logprobs[torch.arange(5), targets])
    target_logprobs = logprobs[torch.arange(5), targets][:, None]
    ranks = (logprobs >= target_logprobs).sum(-1)
    assert torch.equal(out.token_ranks.cpu(), ranks)
    more_likely = (logprobs > target_logprobs).sum(-1)
    assert ranks[0] == more_likely[0] + 3 and ranks[3] == more_likely[3] + 2   # the ties count
