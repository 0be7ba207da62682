"""Logprobs of chosen tokens and the top k, as tensors (the sampler's and the prompt's);
engine/logprob_rows.py turns them into vLLM's {token_id: Logprob} per token."""
from dataclasses import dataclass

import torch

from nanovllm import kernels
from nanovllm.device_copy import to_device


@dataclass
class LogprobsTensors:
    """Per row: the sampled (or given) token and the k most likely tokens."""
    token_ids: torch.Tensor       # [N] int64
    token_logprobs: torch.Tensor  # [N] float32
    token_ranks: torch.Tensor     # [N] int64, 1 = most likely
    top_ids: torch.Tensor         # [N, k] int64
    top_logprobs: torch.Tensor    # [N, k] float32


def gather_logprobs(logits: torch.Tensor, token_ids: torch.Tensor, k: int, fused: bool = False) -> LogprobsTensors:
    """`logits` [N, V] (raw, any float dtype), `token_ids` [N]: each token's logprob and rank,
    and the top k. A logprob is logit - logsumexp(row), in float32; ranks and the top k are
    found on the logits themselves (log-softmax keeps their order), so no [N, V] float32
    log-softmax is written. `fused`: the logsumexp, ranks and top k from one Triton pass
    (kernels/logprobs.py; its top k breaks ties by the lowest id). Also used by the engine
    for prompt logprobs."""
    token_ids = token_ids.long()
    token_logits = logits.gather(-1, token_ids[:, None])                        # [N, 1]
    if fused and k <= _FUSED_MAX_TOP_K:
        logsumexp, token_ranks, top_ids = kernels.logprobs_and_top_k(logits.contiguous(), token_ids, k)
        logsumexp, top_logits = logsumexp[:, None], logits.gather(-1, top_ids)
    else:
        if fused:
            logsumexp, token_ranks = kernels.logsumexp_and_rank(logits.contiguous(), token_ids)
            logsumexp = logsumexp[:, None]
        else:
            logsumexp = torch.logsumexp(logits.float(), dim=-1, keepdim=True)        # [N, 1]
            # Rank as vLLM counts it: how many tokens are at least as likely (ties rank low).
            token_ranks = (logits >= token_logits).sum(-1)
        top_logits, top_ids = logits.topk(min(k, logits.shape[-1]), dim=-1)
    return LogprobsTensors(token_ids, (token_logits.float() - logsumexp).squeeze(-1), token_ranks, top_ids,
                           top_logits.float() - logsumexp)


# The kernel finds the top k by k max-reductions per chunk: fine for SamplingParams' limit (20).
_FUSED_MAX_TOP_K = 32


def gather_prompt_logprobs(logits: torch.Tensor, prompt_rows: dict[int, tuple[int, int]], batch,
                           fused: bool = False) -> dict[int, LogprobsTensors]:
    """Prompt logprobs of a step: `prompt_rows` maps sequence i of the batch to (its first
    logits row, how many): the rows of its chunk's positions, each scored on the token after it."""
    out = {}
    for i, (first_row, count) in prompt_rows.items():
        seq, first = batch.seqs[i], batch.starts[i]
        targets = to_device(torch.tensor(seq.token_ids[first + 1:first + 1 + count]), logits.device)
        out[i] = gather_logprobs(logits[first_row:first_row + count], targets, seq.params.prompt_logprobs, fused)
    return out
