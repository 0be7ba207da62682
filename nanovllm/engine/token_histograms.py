"""Per-sequence token histograms kept on the device, for the repetition/frequency/presence
penalties.

The penalties need, for every row of a batch, how often each vocabulary id occurs in the
sequence's output and whether it occurs in its prompt: [B, V] tensors. Rebuilding them from
every sequence's ids each step is host work that grows with the tokens generated (6.6 ms a
step at 256 sequences of 500 tokens on an H100's host, benchmarks/bench_sampler.py). Here a
sequence gets a row of a device table the first time it samples with a penalty, built from
its ids once; after that each step only adds the token it sampled, on the device.

The table has a row per sequence that can run at once (max_num_seqs). A sequence that needs a
row when all are taken takes a finished sequence's, else the least recently used one outside
its batch (a preempted sequence's); an evicted sequence that samples again gets its row
rebuilt from its ids.
"""
from collections import OrderedDict

import torch

from nanovllm.device_copy import to_device
from nanovllm.layers.penalties import flat_token_indices


class TokenHistograms:
    def __init__(self, vocab_size: int, capacity: int, device: torch.device):
        self.vocab_size, self.capacity, self.device = vocab_size, capacity, device
        self.rows: OrderedDict[int, int] = OrderedDict()   # seq_id -> row, least recently used first
        self.owners: dict[int, object] = {}                 # seq_id -> its Sequence (is it finished?)
        self.output_counts: torch.Tensor | None = None      # [capacity, V] float32
        self.prompt_mask: torch.Tensor | None = None        # [capacity, V] bool

    def reserve(self) -> None:
        """Allocate the table now (on a GPU: before the KV cache takes the free memory)."""
        if self.output_counts is None:
            self.output_counts = torch.zeros(self.capacity, self.vocab_size, dtype=torch.float32, device=self.device)
            self.prompt_mask = torch.zeros(self.capacity, self.vocab_size, dtype=torch.bool, device=self.device)

    def gather(self, seqs: list) -> torch.Tensor:
        """The seqs' rows [B] (on the device) in `output_counts` / `prompt_mask`, giving rows
        to those that have none. The rows stay theirs until a later gather evicts them."""
        if len(seqs) > self.capacity:
            raise ValueError(f"{len(seqs)} sequences in a batch, but token histograms for {self.capacity}")
        self.reserve()
        in_batch = {seq.seq_id for seq in seqs}
        rows, fresh = [], []
        for seq in seqs:
            row = self.rows.pop(seq.seq_id, None)
            if row is None:
                row = self._free_row(in_batch)
                fresh.append((row, seq))
            self.rows[seq.seq_id] = row                      # now the most recently used
            self.owners[seq.seq_id] = seq
            rows.append(row)
        if fresh:
            self._build([row for row, _ in fresh], [seq for _, seq in fresh])
        return to_device(torch.tensor(rows, dtype=torch.int64), self.device)

    def record(self, index: torch.Tensor, sampled: torch.Tensor) -> None:
        """Count the tokens just sampled (sampled[i] for the sequence in row index[i])."""
        self.output_counts.index_put_((index, sampled), torch.ones_like(sampled, dtype=torch.float32),
                                      accumulate=True)

    def _free_row(self, in_batch: set[int]) -> int:
        """A free row, else one taken from a finished sequence, else from the least recently
        used sequence outside the batch (a preempted one: rebuilt if it comes back)."""
        if len(self.rows) < self.capacity:
            used = set(self.rows.values())
            return next(r for r in range(self.capacity) if r not in used)
        candidates = [seq_id for seq_id in self.rows if seq_id not in in_batch]
        victim = next((i for i in candidates if getattr(self.owners[i], "is_finished", False)), candidates[0])
        del self.owners[victim]
        return self.rows.pop(victim)

    def _build(self, rows: list[int], seqs: list) -> None:
        """Rows from the sequences' ids, all in one scatter per table."""
        index = to_device(torch.tensor(rows, dtype=torch.int64), self.device)
        self.output_counts[index] = 0
        self.prompt_mask[index] = False
        outputs = [seq.token_ids[seq.num_prompt_tokens:] for seq in seqs]
        prompts = [seq.token_ids[:seq.num_prompt_tokens] for seq in seqs]
        flat = flat_token_indices(rows, outputs, self.vocab_size, self.device)
        self.output_counts.view(-1).index_add_(0, flat, torch.ones(flat.shape, device=self.device))
        self.prompt_mask.view(-1)[flat_token_indices(rows, prompts, self.vocab_size, self.device)] = True
