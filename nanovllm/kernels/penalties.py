"""Triton kernel: the repetition, frequency and presence penalties in one pass.

The torch version (layers/sampler.py: `apply_penalties`) is a chain of whole-[B, V] ops, each
reading and writing every logit (about 1.4 ms at 256 x 151,936 on an H100); here each logit
is read once with its count and prompt flag, penalised, and written once as float32.
  repetition (HF)      a token seen in the prompt or output: logit / r if > 0, else logit * r
  frequency, presence  (OpenAI) logit - f * count - p * (count > 0), over output tokens
The result saturates at +-limit instead of overflowing; a -inf logit (a banned token) stays -inf.
"""
import torch
import triton
import triton.language as tl


@triton.jit
def _penalties_kernel(logits_ptr, counts_ptr, prompt_mask_ptr, rows_ptr, out_ptr, repetition_ptr, frequency_ptr,
                      presence_ptr, vocab_size, stride_logits, stride_counts, stride_mask, limit,
                      REPETITION: tl.constexpr, FREQUENCY: tl.constexpr, ROWS: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    table_row = row
    if ROWS:
        table_row = tl.load(rows_ptr + row).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    inside = cols < vocab_size
    logit = tl.load(logits_ptr + row * stride_logits + cols, mask=inside).to(tl.float32)
    x = logit
    count = tl.load(counts_ptr + table_row * stride_counts + cols, mask=inside, other=0.0)
    if REPETITION:
        seen = (tl.load(prompt_mask_ptr + table_row * stride_mask + cols, mask=inside, other=0) != 0) | (count > 0)
        r = tl.load(repetition_ptr + row)
        x = tl.where(seen, tl.where(x > 0, x / r, x * r), x)
    if FREQUENCY:
        x = x - tl.load(frequency_ptr + row) * count - tl.load(presence_ptr + row) * (count > 0).to(tl.float32)
    x = tl.where(logit == float("-inf"), logit, tl.minimum(tl.maximum(x, -limit), limit))
    tl.store(out_ptr + row * vocab_size + cols, x, mask=inside)


def apply_penalties(logits: torch.Tensor, output_counts: torch.Tensor, prompt_mask: torch.Tensor | None,
                    repetition: torch.Tensor | None, frequency: torch.Tensor | None,
                    presence: torch.Tensor | None, table_rows: torch.Tensor | None = None,
                    limit: float = 2.0 ** 120) -> torch.Tensor:
    """logits [B, V] (any float dtype), output_counts [B, V] float32, prompt_mask [B, V] bool
    (None without repetition); per-row penalties [B] float32, or None when no row uses them
    (frequency and presence come together) -> new [B, V] float32 logits, within +-limit
    where finite before. `table_rows` [B]: the counts and mask are tables, and logits row i
    goes with their row table_rows[i]."""
    rows, vocab_size = logits.shape
    out = torch.empty(rows, vocab_size, dtype=torch.float32, device=logits.device)
    if rows == 0:
        return out
    dummy = out                         # stands in for a pointer the kernel does not read
    prompt_mask = dummy if prompt_mask is None else prompt_mask.view(torch.uint8)
    for t in (logits, output_counts, prompt_mask):
        if t.stride(1) != 1:
            raise ValueError("apply_penalties needs rows with contiguous columns")
    BLOCK = 4096
    _penalties_kernel[(rows, triton.cdiv(vocab_size, BLOCK))](
        logits, output_counts, prompt_mask, table_rows if table_rows is not None else dummy, out,
        repetition if repetition is not None else dummy, frequency if frequency is not None else dummy,
        presence if presence is not None else dummy, vocab_size, logits.stride(0), output_counts.stride(0),
        prompt_mask.stride(0), limit, REPETITION=repetition is not None, FREQUENCY=frequency is not None,
        ROWS=table_rows is not None, BLOCK=BLOCK)
    return out
