"""Token embedding and LM head, split across ranks by vocabulary rows.

Each rank holds a contiguous slice of the (padded) vocabulary. The embedding looks up the
ids that fall in its slice and the ranks sum their results; the LM head computes logits
for its slice and rank 0 gathers the full row.
"""
import torch
import torch.nn.functional as F
from torch import nn

from nanovllm.distributed import all_reduce, gather_on_rank0, tp_rank, tp_size
from nanovllm.layers.cpu_linear import linear
from nanovllm.layers.linear import copy_checked


class VocabParallelEmbedding(nn.Module):
    def __init__(self, vocab_size: int, hidden_size: int):
        super().__init__()
        self.vocab_size = vocab_size
        # Pad so every rank gets the same number of rows (vocab sizes are rarely divisible).
        self.rows_per_rank = -(-vocab_size // tp_size())
        self.row_start = tp_rank() * self.rows_per_rank
        self.weight = nn.Parameter(torch.empty(self.rows_per_rank, hidden_size), requires_grad=False)
        self.weight.weight_loader = self.weight_loader

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id=None):
        rows = loaded[self.row_start:self.row_start + self.rows_per_rank]
        param.data.zero_()                        # padding rows stay zero
        copy_checked(param.data[:rows.shape[0]], rows)

    def forward(self, token_ids: torch.Tensor) -> torch.Tensor:
        if tp_size() == 1:
            return F.embedding(token_ids, self.weight)
        local = token_ids - self.row_start
        mine = (local >= 0) & (local < self.rows_per_rank)
        out = F.embedding(local.clamp(0, self.rows_per_rank - 1), self.weight)
        return all_reduce(out * mine.unsqueeze(-1))


class ParallelLMHead(VocabParallelEmbedding):
    """hidden [N, H] -> logits [N, vocab] on rank 0 (None on the other ranks)."""

    def forward(self, hidden: torch.Tensor) -> torch.Tensor | None:
        logits = gather_on_rank0(linear(hidden, self.weight))
        return None if logits is None else logits[:, :self.vocab_size]
