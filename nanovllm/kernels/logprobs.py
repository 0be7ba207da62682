"""Triton kernel: each row's log-sum-exp, one token's rank and the k most likely tokens, in one
pass over the logits (two for k >= FLOOR_MIN_K: a light one first, see "The floor" below).

Logprobs are logit - logsumexp(row). torch needs a float32 copy of the [B, V] logits for an
accurate logsumexp, another pass for the ranks and a topk (about 0.7 ms together at 256 x
151,936 bf16 on an H100, 0.4 of it the topk). Here the grid is (rows, chunks of CHUNK tokens),
so a 256-row batch runs ~10,000 programs and the read is one pass at full bandwidth. Each
program holds its chunk in registers and writes:
  the chunk's logsumexp (max + log(sum exp(x - max)));
  how many of its tokens are at least as likely as the given one (vLLM's rank: ties rank low);
  its top tokens, by rounds of "take the maximum, remove it" (a single max-reduction each:
  logit and token id are packed into one int64, so ties go to the lowest id).
Small torch ops on the device then merge the chunks: a logsumexp over them, a sum of the
counts, and a stable sort of the [rows, chunks * k] candidates (chunk order = id order, so
the lowest id still wins a tie). Slots a chunk leaves empty hold a key below every logit's.

The floor. A round is a reduction over the whole tile, so k rounds in every chunk cost ~k x V
work per row (k=20: 0.63 ms against 0.16 for k=0), although a row's top 20 lie in at most 20
of its 38 chunks, mostly one per chunk. Given a per-row lower bound F on the k-th largest
key, a chunk needs only min(k, #{its tokens with key >= F}) rounds: those tokens are its
largest, and every token of the row's top k is among them. The count comes with the rank
count in the same reduction. F comes from a light first kernel over the same grid, one
max-reduction per GROUP tokens (no exp, no int64, little register pressure: a plain
streaming read), and torch.topk over the row's V / GROUP group maxima: the k largest group
maxima are k distinct tokens, so the k-th of them is <= the row's k-th largest key, and
only groups holding two of the top tokens make F lower than that. At k=20 a row then does
~20 rounds in all (in ~16 chunks; the other ~22 skip even the int64 packing) instead of
38 x 20, for one light pass and a topk. (The exact k-th key from sampling_thresholds, one
program per row, was slower as a floor in the sweep: 0.52 against 0.44 ms.) Below FLOOR_MIN_K the k
rounds everywhere are cheaper than the first pass; k = 0 compiles without the top-k code.
bench_sampler.py --sweep times each choice. Keys everywhere are order_key(float32 value):
the same order as the values, except -0.0 < +0.0 (as before).
"""
import torch
import triton
import triton.language as tl

from nanovllm.kernels.sampling_filters import order_key

CHUNK = 4096        # tokens per program (the bench's --sweep changes these knobs)
NUM_WARPS = 8
GROUP = 256         # tokens per maximum in the floor's first pass
FLOOR_MIN_K = 8     # k from which the floor pays for its pass (~2-3 rounds' cost, estimated)

_NO_KEY = tl.constexpr(-2**31)    # no token: below order_key of every float32 (but an all-ones NaN)


@triton.jit
def _group_max_kernel(logits_ptr, stride_row, vocab_size, out_ptr, groups_per_row,
                      CHUNK: tl.constexpr, GROUP: tl.constexpr):
    """out[row, g] = the largest key among tokens g * GROUP ... (g + 1) * GROUP - 1 (_NO_KEY
    where none is in the vocabulary). Grid (rows, chunks), CHUNK // GROUP groups each."""
    row = tl.program_id(0).to(tl.int64)
    chunk = tl.program_id(1)
    groups = tl.arange(0, CHUNK // GROUP)
    cols = chunk * CHUNK + groups[:, None] * GROUP + tl.arange(0, GROUP)[None, :]
    x = tl.load(logits_ptr + row * stride_row + cols, mask=cols < vocab_size, other=float("-inf"))
    key = tl.where(cols < vocab_size, order_key(x.to(tl.float32)), _NO_KEY)
    tl.store(out_ptr + row * groups_per_row + chunk * (CHUNK // GROUP) + groups, tl.max(key, axis=1))


@triton.jit(do_not_specialize=["vocab_size", "k"])
def _logprobs_kernel(logits_ptr, stride_row, token_ptr, vocab_size, k, floor_ptr, lse_ptr, rank_ptr, top_key_ptr,
                     top_id_ptr, num_chunks, CHUNK: tl.constexpr, TOP_K: tl.constexpr, USE_FLOOR: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    chunk = tl.program_id(1)
    row_ptr = logits_ptr + row * stride_row
    cols = chunk * CHUNK + tl.arange(0, CHUNK)
    in_vocab = cols < vocab_size
    x = tl.load(row_ptr + cols, mask=in_vocab, other=float("-inf")).to(tl.float32)
    out = row * num_chunks + chunk

    top = tl.max(x, axis=0)
    safe = tl.where(top == float("-inf"), 0.0, top)
    total = tl.sum(tl.exp(x - safe), axis=0)
    # A chunk of -inf only sums to 0: its logsumexp is -inf (without taking log(0)).
    tl.store(lse_ptr + out, tl.where(total > 0, safe + tl.log(tl.maximum(total, 1e-30)), float("-inf")))
    chosen = tl.load(row_ptr + tl.load(token_ptr + row)).to(tl.float32)
    at_least_chosen = in_vocab & (x >= chosen)
    key = order_key(x)
    if USE_FLOOR:
        # Both counts from one reduction: the rank count in the low 16 bits, the number of
        # tokens with key >= floor in the high ones (each <= CHUNK <= 2^14: no carry, no overflow).
        above_floor = in_vocab & (key >= tl.load(floor_ptr + row))
        counts = tl.sum(at_least_chosen.to(tl.int32) + above_floor.to(tl.int32) * 65536, axis=0)
        tl.store(rank_ptr + out, counts & 0xFFFF)
        rounds = tl.minimum(k, counts >> 16)
    else:
        tl.store(rank_ptr + out, tl.sum(at_least_chosen.to(tl.int32), axis=0))
        rounds = k

    if TOP_K:
        if rounds > 0:
            # High 32 bits the logit's order key, low 32 bits (2^31 - 1 - id), so one max
            # picks the largest logit and, among equal ones, the lowest id.
            packed = key.to(tl.int64) * 4294967296 + (2147483647 - cols).to(tl.int64)
            packed = tl.where(in_vocab, packed, -9223372036854775807 - 1)
            for r in tl.range(0, rounds):
                best = tl.max(packed, axis=0)
                tl.store(top_key_ptr + out * k + r, (best >> 32).to(tl.int32))
                tl.store(top_id_ptr + out * k + r, (2147483647 - (best & 0xFFFFFFFF)).to(tl.int32))
                packed = tl.where(packed == best, -9223372036854775807 - 1, packed)
        for r in tl.range(rounds, k):                            # empty slots (the ids are never read)
            tl.store(top_key_ptr + out * k + r, _NO_KEY)


def _row_floors(logits: torch.Tensor, k: int, chunk: int, num_chunks: int) -> torch.Tensor | None:
    """[rows] int32 keys, each <= its row's k-th largest order_key (None: no floor to gain)."""
    rows, vocab_size = logits.shape
    group = min(GROUP, chunk)
    groups_per_row = num_chunks * (chunk // group)
    if k > groups_per_row:
        return None
    group_keys = torch.empty(rows, groups_per_row, dtype=torch.int32, device=logits.device)
    _group_max_kernel[(rows, num_chunks)](logits, logits.stride(0), vocab_size, group_keys, groups_per_row,
                                          CHUNK=chunk, GROUP=group, num_warps=NUM_WARPS)
    return group_keys.topk(k, dim=1).values[:, -1].contiguous()


def logprobs_and_top_k(logits: torch.Tensor, token_ids: torch.Tensor, k: int
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """logits [N, V] (rows contiguous), token_ids [N], k >= 0 (SamplingParams allows up to 20)
    -> (logsumexp [N] float32, the rank of each row's token [N] int64: how many logits are >=
    its logit, the ids of the k largest logits [N, k] int64, largest first, ties to the lowest id)."""
    if logits.dim() != 2 or logits.stride(1) != 1:
        raise ValueError(f"logits must be [rows, vocab] with contiguous rows, got {tuple(logits.shape)}")
    if CHUNK > 2**14:
        raise ValueError(f"CHUNK {CHUNK} > 2^14: the kernel's two packed counts would overflow")
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
        floors = _row_floors(logits, k, chunk, num_chunks) if k >= max(FLOOR_MIN_K, 1) else None
        # (without floors the kernel reads no floor: `rank` stands in, an int32 pointer as well)
        _logprobs_kernel[(rows, num_chunks)](logits, logits.stride(0), token_ids.contiguous(), vocab_size, k,
                                             rank if floors is None else floors, lse, rank, top_key, top_id,
                                             num_chunks, CHUNK=chunk, TOP_K=k > 0, USE_FLOOR=floors is not None,
                                             num_warps=NUM_WARPS)
    # Candidates are in (chunk, rank) order, i.e. by id among equal logits: a stable sort keeps it.
    order = top_key.sort(dim=1, descending=True, stable=True).indices[:, :k]
    return torch.logsumexp(lse, dim=1), rank.sum(dim=1), top_id.gather(1, order).long()


def logsumexp_and_rank(logits: torch.Tensor, token_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """logits [N, V] (rows contiguous), token_ids [N] -> (logsumexp [N] float32, the rank of
    each row's token [N] int64: how many logits are >= its logit)."""
    lse, rank, _ = logprobs_and_top_k(logits, token_ids, 0)
    return lse, rank
