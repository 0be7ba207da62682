"""The one-pass penalties kernel against the torch chain in layers/sampler.py. In Triton's
CPU interpreter without CUDA."""
import pytest
import torch

from nanovllm.kernels import triton_available
from nanovllm.layers.penalties import PenaltyInputs, apply_penalties
from nanovllm.layers.sampling_metadata import SamplingRow
from nanovllm.sampling_params import SamplingParams

pytestmark = pytest.mark.skipif(not triton_available(), reason="triton is not installed")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])   # bf16 is only loaded
@pytest.mark.parametrize("which", [
    dict(repetition_penalty=1.3), dict(frequency_penalty=0.4, presence_penalty=-0.7),
    dict(repetition_penalty=0.8, frequency_penalty=-0.2, presence_penalty=0.5),
])
def test_penalties_kernel_matches_torch(dtype, which):
    from nanovllm import kernels
    vocab = 5000                                     # two tiles, the last partial
    gen = torch.Generator().manual_seed(0)
    rows = []
    for i in range(3):                               # the last row has no penalty at all
        params = SamplingParams(temperature=0.8, **(which if i < 2 else {}))
        ids = torch.randint(0, vocab, (80,), generator=gen).tolist()
        rows.append(SamplingRow.of(params, ids, 30, (0,)))
    meta = PenaltyInputs.build(rows, vocab, torch.device("cpu"))
    logits = (torch.randn(3, vocab, generator=gen) * 3).to(dtype)
    expected = apply_penalties(logits.float(), meta)
    move = (lambda t: None if t is None else t.to(DEVICE))
    ours = kernels.apply_penalties(logits.to(DEVICE), move(meta.output_counts), move(meta.prompt_mask),
                                   move(meta.repetition_penalty), move(meta.frequency_penalty),
                                   move(meta.presence_penalty)).cpu()
    assert ours.dtype == torch.float32
    torch.testing.assert_close(ours, expected, rtol=1e-6, atol=1e-6)
    assert not torch.equal(ours[:2], logits[:2].float())       # the penalties did something
    assert torch.equal(ours[2], logits[2].float())             # and nothing to the plain row


def test_penalties_kernel_reads_table_rows():
    """The engine's form: counts and masks in a table with a row per sequence, `rows` mapping
    the batch's rows to it (engine/token_histograms.py)."""
    from nanovllm import kernels
    vocab = 300
    gen = torch.Generator().manual_seed(2)
    counts = torch.randint(0, 3, (5, vocab), generator=gen).float()
    mask = torch.rand(5, vocab, generator=gen) < 0.2
    rows = torch.tensor([3, 0, 4])
    logits = torch.randn(3, vocab, generator=gen) * 3
    penalty = torch.tensor([1.5, 1.2, 0.9])
    rows_meta = PenaltyInputs.build([SamplingRow.of(SamplingParams(repetition_penalty=1.5), [], 0, (0,))] * 3,
                                       vocab, torch.device("cpu"), (counts, mask, rows))
    assert rows_meta.count_rows is rows
    rows_meta.repetition_penalty = penalty
    rows_meta.frequency_penalty = rows_meta.presence_penalty = penalty - 1.0
    expected = apply_penalties(logits, rows_meta)
    ours = kernels.apply_penalties(logits.to(DEVICE), counts.to(DEVICE), mask.to(DEVICE), penalty.to(DEVICE),
                                   (penalty - 1.0).to(DEVICE), (penalty - 1.0).to(DEVICE), rows.to(DEVICE)).cpu()
    torch.testing.assert_close(ours, expected, rtol=1e-6, atol=1e-6)
    # and the table form is the gathered form
    gathered = PenaltyInputs.build([SamplingRow.of(SamplingParams(repetition_penalty=1.5), [], 0, (0,))] * 3,
                                      vocab, torch.device("cpu"), (counts[rows], mask[rows], torch.arange(3)))
    gathered.repetition_penalty, gathered.frequency_penalty = penalty, penalty - 1.0
    gathered.presence_penalty = penalty - 1.0
    torch.testing.assert_close(apply_penalties(logits, gathered), expected)


# The interpreter (numpy) reports the float32 overflow that the kernel then saturates.
@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")
def test_penalties_saturate_at_the_limit_as_torch():
    """Repetition penalties at float32's extremes push seen logits past its range: kernel and
    torch both stop at +-LOGIT_LIMIT, and a banned token's -inf stays -inf."""
    from nanovllm import kernels
    from nanovllm.layers.penalties import LOGIT_LIMIT
    vocab = 12
    logits = torch.tensor([3.0, -2.0, 0.0, -5.0, 1e30, -1e30, float("-inf"), 2.0, -1.0, 4.0, -3.0, 0.5])
    logits = logits.expand(2, -1).contiguous()
    rows = [SamplingRow.of(SamplingParams(repetition_penalty=r, frequency_penalty=2.0), list(range(vocab)), 8)
            for r in (1e-45, 3.4e38)]
    meta = PenaltyInputs.build(rows, vocab, torch.device("cpu"))
    expected = apply_penalties(logits, meta)
    move = (lambda t: t.to(DEVICE))
    ours = kernels.apply_penalties(logits.to(DEVICE), move(meta.output_counts), move(meta.prompt_mask),
                                   move(meta.repetition_penalty), move(meta.frequency_penalty),
                                   move(meta.presence_penalty), limit=LOGIT_LIMIT).cpu()
    torch.testing.assert_close(ours, expected, rtol=1e-6, atol=1e-6)     # (a GPU flushes -2.8e-45 to 0)
    assert (expected[:, 6] == float("-inf")).all()
    finite = torch.cat([expected[:, :6], expected[:, 7:]], dim=1)
    assert torch.isfinite(finite).all() and finite.abs().max() == LOGIT_LIMIT
    assert expected[0, 0] == LOGIT_LIMIT and expected[1, 1] == -LOGIT_LIMIT
