"""Long prompts, with at most a short cached context (AttentionMetadata.dense_spans): TritonBackend
attends them from the step's own keys and values and the context's (torch's dense attention: cuDNN
on a GPU) and the sequences around them through the varlen kernel; together they equal the
reference over the paged batch."""
import numpy as np
import pytest
import torch

from nanovllm.engine import inputs
from nanovllm.layers import attention_backends
from nanovllm.kernels import triton_available
from nanovllm.layers.attention import AttentionMetadata
from tests.kernels.test_kernels import DEVICE, make_paged_batch, reference, rel_err, tolerance

pytestmark = pytest.mark.skipif(not triton_available(), reason="triton is not installed")


def new_tokens(batch, q_lens):
    """Each new token's K, V (as the step computed them: here, read from the cache) and slot."""
    k_cache, v_cache, tables = batch["k_cache"], batch["v_cache"], batch["block_tables"]
    block_size, ks, vs, slots = k_cache.shape[1], [], [], []
    for b, (seq_len, n) in enumerate(zip(batch["seq_lens"].tolist(), q_lens)):
        pos = torch.arange(seq_len - n, seq_len, device=k_cache.device)
        blocks = tables[b, pos // block_size].long()
        ks.append(k_cache[blocks, pos % block_size])
        vs.append(v_cache[blocks, pos % block_size])
        slots.append(blocks * block_size + pos % block_size)
    return torch.cat(ks), torch.cat(vs), torch.cat(slots)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_dense_spans_from_the_new_keys_equal_the_paged_batch(dtype):
    from nanovllm.layers.attention_backends import TritonBackend
    # fresh, a chunk after a short context, a decode, fresh, fresh, a chunk after a long cached prefix:
    # the kernel runs between dense spans and after them
    seq_lens, q_lens = [30, 40, 9, 23, 20, 28], [30, 28, 1, 23, 20, 6]
    batch = make_paged_batch(seq_lens, q_lens, 4, 2, 32, 16, dtype)
    scale = 32 ** -0.5
    expected = reference(batch, scale)
    k, v, slots = new_tokens(batch, q_lens)
    meta = AttentionMetadata(slots, batch["cu_seqlens_q"], batch["seq_lens"], batch["block_tables"],
                             max_seqlen_q=30, max_seqlen_k=40, is_decode=False,
                             dense_spans=((0, 0, 30, 0), (1, 30, 58, 12), (3, 59, 82, 0), (4, 82, 102, 0)))
    backend = TritonBackend()
    backend.store(k, v, batch["k_cache"], batch["v_cache"], meta)
    dense = not (batch["q"].is_cuda and dtype == torch.float32)     # cuDNN takes 16-bit inputs only
    # Blocks of new tokens only spoilt: the dense path must take those keys from the step's own
    # (sequence 1's first block holds its context, which it reads from the cache).
    for b, spoilt in ((0, slice(0, 2)), (1, slice(1, 3)), (3, slice(0, 2)), (4, slice(0, 2))) if dense else ():
        batch["k_cache"][batch["block_tables"][b, spoilt].long()] = float("nan")
    out = backend.attend(batch["q"], batch["k_cache"], batch["v_cache"], meta, scale)
    assert rel_err(out, expected) < tolerance(dtype)
    assert backend.step_kv is None         # the step's tensors are not held past their layer
    assert list(backend.dense_ok.values()) == [dense]      # else the kernel took the whole batch


def test_dense_spans_are_long_prompts_with_at_most_a_short_context(monkeypatch):
    monkeypatch.setattr(attention_backends, "DENSE_MIN_TOKENS", 4)
    monkeypatch.setattr(attention_backends, "DENSE_MIN_STEP_TOKENS", 11)

    def spans(seq_lens, counts, is_decode=False):
        cu = np.concatenate([[0], np.cumsum(counts)]).astype(np.int32)
        n = int(cu[-1])
        return inputs.host_inputs([0] * n, [0] * n, [0] * n, cu, seq_lens, [[0]] * len(counts),
                                  max(counts), is_decode, [0]).to(torch.device("cpu")).meta.dense_spans
    # decodes, a prompt, a chunk after a longer cached prefix, a short prompt, a prompt
    assert spans([9, 8, 5, 10, 3, 6], [1, 1, 5, 4, 3, 6]) == ((2, 2, 7, 0), (5, 14, 20, 0))
    assert spans([5, 6], [5, 6]) == ((0, 0, 5, 0), (1, 5, 11, 0))
    # chunks after a context of at most half their new tokens
    assert spans([7, 12], [5, 8]) == ((0, 0, 5, 2), (1, 5, 13, 4))
    assert spans([8, 12], [5, 8]) == ()               # 3 > 5 / 2: only 8 tokens left, fewer than 11
    assert spans([9, 8], [1, 1], is_decode=True) == ()
    assert spans([5, 6, 9], [5, 4, 1]) == ()          # one of 5 tokens: fewer than the step's minimum
    monkeypatch.setattr(attention_backends, "DENSE_MIN_TOKENS", 6)
    monkeypatch.setattr(attention_backends, "DENSE_MIN_STEP_TOKENS", 6)
    assert spans([5, 6], [5, 6]) == ((1, 5, 11, 0),)
