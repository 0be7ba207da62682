"""Triton kernel: each row's log-sum-exp, one token's rank and the k most likely tokens, in one
pass over the logits.

Logprobs are logit - logsumexp(row). torch needs a float32 copy of the [B, V] logits for an
accurate logsumexp, another pass for the ranks and a topk (about 0.7 ms together at 256 x
151,936 bf16 on an H100, 0.4 of it the topk). Here the grid is (rows, chunks of CHUNK tokens),
so a 256-row batch runs ~10,000 programs and the read is one pass at full bandwidth. Each
program holds its chunk in registers and writes:
  the chunk's logsumexp (max + log(sum exp(x - max)));
  how many of its tokens are at least as likely as the given one (vLLM's rank: ties rank low);
  its k largest tokens, by k rounds of "take the maximum, remove it" (a single max-reduction
  each: logit and token id are packed into one int64, so ties go to the lowest id).
Small torch ops on the device then merge the chunks: a logsumexp over them, a sum of the
counts, and a stable sort of the [rows, chunks * k] candidates (chunk order = id order, so
the lowest id still wins a tie). k up to 20 (SamplingParams' max_logprobs).
"""
import torch
import triton
import triton.language as tl

from nanovllm.kernels.sampling_filters import order_key

CHUNK = 4096        # tokens per program (the bench's --sweep changes these two)
NUM_WARPS = 8


@triton.jit(do_not_specialize=["vocab_size", "k"])
def _logprobs_kernel(logits_ptr, stride_row, token_ptr, vocab_size, k, lse_ptr, rank_ptr, top_key_ptr, top_id_ptr,
                     num_chunks, CHUNK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    chunk = tl.program_id(1)
    row_ptr = logits_ptr + row * stride_row
    cols = chunk * CHUNK + tl.arange(0, CHUNK)
    in_vocab = cols < vocab_size
    x = tl.load(row_ptr + cols, mask=in_vocab, other=float("-inf")).to(tl.float32)
    out = row * num_chunks + chunk

    top = tl.max(x, axis=0)
    safe = tl.where(top == float("-inf"), 0.0, top)             # a chunk of -inf only: sum 0, log -inf
    tl.store(lse_ptr + out, safe + tl.log(tl.sum(tl.exp(x - safe), axis=0)))
    chosen = tl.load(row_ptr + tl.load(token_ptr + row)).to(tl.float32)
    tl.store(rank_ptr + out, tl.sum((in_vocab & (x >= chosen)).to(tl.int32), axis=0))

    # The k largest: high 32 bits the logit's order key, low 32 bits (2^31 - 1 - id), so one
    # max picks the largest logit and, among equal ones, the lowest id.
    packed = order_key(x).to(tl.int64) * 4294967296 + (2147483647 - cols).to(tl.int64)
    packed = tl.where(in_vocab, packed, -9223372036854775807 - 1)
    for r in tl.range(0, k):
        best = tl.max(packed, axis=0)
        tl.store(top_key_ptr + out * k + r, (best >> 32).to(tl.int32))
        tl.store(top_id_ptr + out * k + r, (2147483647 - (best & 0xFFFFFFFF)).to(tl.int32))
        packed = tl.where(packed == best, -9223372036854775807 - 1, packed)


def logprobs_and_top_k(logits: torch.Tensor, token_ids: torch.Tensor, k: int
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """logits [N, V] (rows contiguous), token_ids [N], 0 <= k <= 20 -> (logsumexp [N] float32,
    the rank of each row's token [N] int64: how many logits are >= its logit, the ids of the
    k largest logits [N, k] int64, largest first, ties to the lowest id)."""
    if logits.dim() != 2 or logits.stride(1) != 1:
        raise ValueError(f"logits must be [rows, vocab] with contiguous rows, got {tuple(logits.shape)}")
    rows, vocab_size = logits.shape
    k = min(k, vocab_size)
    chunk = min(CHUNK, triton.next_power_of_2(vocab_size))
    num_chunks = triton.cdiv(vocab_size, chunk)
    device = logits.device
    lse = torch.empty(rows, num_chunks, dtype=torch.float32, device=device)
    rank = torch.empty(rows, num_chunks, dtype=torch.int32, device=device)
    top_key = torch.empty(rows, num_chunks * k, dtype=torch.int32, device=device)
    top_id = torch.empty(rows, num_chunks * k, dtype=torch.int32, device=device)
    if rows:
        _logprobs_kernel[(rows, num_chunks)](logits, logits.stride(0), token_ids.contiguous(), vocab_size, k, lse,
                                             rank, top_key, top_id, num_chunks, CHUNK=chunk, num_warps=NUM_WARPS)
    # Candidates are in (chunk, rank) order, i.e. by id among equal logits: a stable sort keeps it.
    order = top_key.sort(dim=1, descending=True, stable=True).indices[:, :k]
    return torch.logsumexp(lse, dim=1), rank.sum(dim=1), top_id.gather(1, order).long()


def logsumexp_and_rank(logits: torch.Tensor, token_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """logits [N, V] (rows contiguous), token_ids [N] -> (logsumexp [N] float32, the rank of
    each row's token [N] int64: how many logits are >= its logit)."""
    lse, rank, _ = logprobs_and_top_k(logits, token_ids, 0)
    return lse, rank
