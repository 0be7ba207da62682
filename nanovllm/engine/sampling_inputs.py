"""What the sampler gets each step besides the logits: the batch's SamplingMetadata (built once
per batch composition, with the penalties' token counts kept on the device by TokenHistograms)
and each row's seed.

Seeding, the same on every device: a seeded request's draw of the token at position p uses
random numbers keyed by (seed + completion index, p) alone, so its tokens do not depend on the
batch, the schedule or preemption. On a GPU the fused sampler turns the key into a Philox stream,
on a CPU into a torch generator; speculative decoding keys its draws the same way."""
from collections.abc import Collection

import torch

from nanovllm.engine.scheduler import ScheduledBatch
from nanovllm.engine.token_histograms import TokenHistograms
from nanovllm.layers.penalties import uses_penalties
from nanovllm.layers.sampling_metadata import SamplingMetadata, SamplingRow


class SamplingInputs:
    def __init__(self, vocab_size: int, max_num_seqs: int, device: torch.device, reserve_histograms: bool = False):
        self.vocab_size, self.device = vocab_size, device
        self.histograms = TokenHistograms(vocab_size, max_num_seqs, device)
        if reserve_histograms:                  # on a GPU: before the KV cache takes the free memory
            self.histograms.reserve()
        # (the batch's seq ids, its SamplingMetadata, its histogram rows): see metadata()
        self.cached: tuple[list[int] | None, SamplingMetadata | None, torch.Tensor | None] = (None, None, None)

    def metadata(self, seqs: list, eos_ids: Collection[int]) -> SamplingMetadata:
        """The batch's metadata (and, if it uses penalties, its rows in the token histograms,
        where `record` then counts the tokens sampled). Built once per batch composition: decode
        steps keep the same sequences for many steps in a row. Penalties read the histograms,
        which change in place on the device, so such metadata stays valid too; only min_tokens
        makes it change from step to step."""
        key = [seq.seq_id for seq in seqs]
        if key == self.cached[0]:
            return self.cached[1]
        histogram_rows = token_counts = None
        if any(uses_penalties(s.params) for s in seqs):
            histogram_rows = self.histograms.gather(seqs)
            token_counts = (self.histograms.output_counts, self.histograms.prompt_mask, histogram_rows)
        meta = SamplingMetadata.build(
            [SamplingRow.of(s.params, known_tokens(s), s.num_prompt_tokens, eos_ids,
                            counts_kept=histogram_rows is not None) for s in seqs],
            self.vocab_size, self.device, token_counts)
        reusable = not any(s.params.min_tokens for s in seqs)
        self.cached = (key if reusable else None, meta, histogram_rows)
        return meta

    def record(self, sampled: torch.Tensor) -> None:
        """Count the tokens sampled for the batch of the last `metadata` call, if it uses penalties."""
        if self.cached[2] is not None:
            self.histograms.record(self.cached[2], sampled)


def row_seeds(batch: ScheduledBatch) -> torch.Tensor:
    """This step's seed for each sampling row, on the host: a seeded request's keyed by the
    position of the token drawn; the other rows' fresh from torch's global generator."""
    base, seeds = int(torch.randint(0, 2**62, ())), []
    for seq, start, n, samples in zip(batch.seqs, batch.starts, batch.num_new_tokens, batch.samples):
        if samples:
            seed = seq.params.seed
            seeds.append(base + len(seeds) if seed is None else stream_seed(seed + seq.index, start + n))
    return torch.tensor(seeds, dtype=torch.int64)


def draw_generator(seq, position: int, device: torch.device, stream: int) -> torch.Generator | None:
    """A generator for a seeded sequence's draws of the token at `position` (None if unseeded:
    torch's global generator then). `stream` keeps apart draws for one position that are not
    the sampler's (speculative decoding's proposals and acceptance tests)."""
    if seq.params.seed is None:
        return None
    return torch.Generator(device).manual_seed(stream_seed(seq.params.seed + seq.index, position, stream))


def known_tokens(seq) -> list[int]:
    """seq's tokens before the one this step draws. min_tokens counts them: a token of the step
    before, still in flight (seq.num_in_flight is then 2), counts too (its value does not matter)."""
    if seq.num_in_flight > 1 and seq.params.min_tokens:
        return seq.token_ids + [-1] * (seq.num_in_flight - 1)
    return seq.token_ids


def stream_seed(seed: int, position: int, stream: int = 0) -> int:
    """A 62-bit seed from (seed, position, stream), mixed (splitmix64) so that neighbouring
    seeds and positions give unrelated keys."""
    z = (seed * 0x9E3779B97F4A7C15 + position + 1 + (stream << 48)) & (2**64 - 1)
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & (2**64 - 1)
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & (2**64 - 1)
    return (z ^ (z >> 31)) >> 2
