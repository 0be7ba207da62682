"""Triton kernel: each row's log-sum-exp and one token's rank, in one pass over the logits.

Logprobs are logit - logsumexp(row). torch needs a float32 copy of the [B, V] logits for an
accurate logsumexp and another pass for the ranks (about 0.9 ms together at 256 x 151,936
bf16 on an H100); here each program streams its row once, keeping a running max and sum
per lane (the online softmax's rescaling), and counts the tokens at least as likely as the
given one (vLLM's rank: ties rank low).
"""
import torch
import triton
import triton.language as tl


@triton.jit
def _logsumexp_rank_kernel(logits_ptr, stride_row, token_ptr, lse_ptr, rank_ptr, vocab_size, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    row_ptr = logits_ptr + row * stride_row
    chosen = tl.load(row_ptr + tl.load(token_ptr + row)).to(tl.float32)
    run_max = tl.full([BLOCK], float("-inf"), tl.float32)
    run_sum = tl.zeros([BLOCK], tl.float32)
    rank = tl.zeros([BLOCK], tl.int32)
    for start in tl.range(0, vocab_size, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        x = tl.load(row_ptr + cols, mask=cols < vocab_size, other=float("-inf")).to(tl.float32)
        new_max = tl.maximum(run_max, x)
        safe = tl.where(new_max == float("-inf"), 0.0, new_max)      # a lane with only -inf so far
        run_sum = run_sum * tl.exp(run_max - safe) + tl.exp(x - safe)
        run_max = new_max
        rank += ((x >= chosen) & (cols < vocab_size)).to(tl.int32)
    top = tl.max(run_max, axis=0)
    total = tl.sum(run_sum * tl.exp(run_max - top), axis=0)
    tl.store(lse_ptr + row, top + tl.log(total))
    tl.store(rank_ptr + row, tl.sum(rank, axis=0).to(tl.int64))


def logsumexp_and_rank(logits: torch.Tensor, token_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """logits [N, V] (rows contiguous), token_ids [N] -> (logsumexp [N] float32, the rank of
    each row's token [N] int64: how many logits are >= its logit)."""
    if logits.dim() != 2 or logits.stride(1) != 1:
        raise ValueError(f"logits must be [rows, vocab] with contiguous rows, got {tuple(logits.shape)}")
    rows, vocab_size = logits.shape
    lse = torch.empty(rows, dtype=torch.float32, device=logits.device)
    rank = torch.empty(rows, dtype=torch.int64, device=logits.device)
    if rows:
        _logsumexp_rank_kernel[(rows,)](logits, logits.stride(0), token_ids.contiguous(), lse, rank, vocab_size,
                                        BLOCK=min(2048, triton.next_power_of_2(vocab_size)), num_warps=8)
    return lse, rank
