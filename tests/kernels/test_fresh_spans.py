"""Long prompts with no cached context (AttentionMetadata.fresh_spans): TritonBackend attends them
from the step's own keys and values (torch's dense attention: cuDNN on a GPU) and the sequences
around them through the varlen kernel; together they equal the reference over the paged batch."""
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
def test_fresh_spans_from_the_new_keys_equal_the_paged_batch(dtype):
    from nanovllm.layers.attention_backends import TritonBackend
    # fresh, a cached prefix, a decode, fresh, fresh: kernel runs between, none before or after
    seq_lens, q_lens = [30, 40, 9, 23, 20], [30, 8, 1, 23, 20]
    batch = make_paged_batch(seq_lens, q_lens, 4, 2, 32, 16, dtype)
    scale = 32 ** -0.5
    expected = reference(batch, scale)
    k, v, slots = new_tokens(batch, q_lens)
    meta = AttentionMetadata(slots, batch["cu_seqlens_q"], batch["seq_lens"], batch["block_tables"],
                             max_seqlen_q=30, max_seqlen_k=40, is_decode=False,
                             fresh_spans=((0, 0, 30), (3, 39, 62), (4, 62, 82)))
    backend = TritonBackend()
    backend.store(k, v, batch["k_cache"], batch["v_cache"], meta)
    dense = not (batch["q"].is_cuda and dtype == torch.float32)     # cuDNN takes 16-bit inputs only
    for b in (0, 3, 4) if dense else ():   # the fresh sequences' blocks spoilt: their path must not read the cache
        batch["k_cache"][batch["block_tables"][b, :2].long()] = float("nan")
    out = backend.attend(batch["q"], batch["k_cache"], batch["v_cache"], meta, scale)
    assert rel_err(out, expected) < tolerance(dtype)
    assert backend.fresh_kv is None         # the step's tensors are not held past their layer
    assert list(backend.dense_ok.values()) == [dense]      # else the kernel took the whole batch


def test_fresh_spans_are_long_prompts_with_no_cached_context(monkeypatch):
    monkeypatch.setattr(attention_backends, "FRESH_MIN_TOKENS", 4)
    monkeypatch.setattr(attention_backends, "FRESH_MIN_STEP_TOKENS", 11)

    def spans(seq_lens, counts, is_decode=False):
        cu = np.concatenate([[0], np.cumsum(counts)]).astype(np.int32)
        n = int(cu[-1])
        return inputs.host_inputs([0] * n, [0] * n, [0] * n, cu, seq_lens, [[0]] * len(counts),
                                  max(counts), is_decode, [0]).to(torch.device("cpu")).meta.fresh_spans
    # decodes, a prompt, a chunk after a cached prefix, a short prompt, a prompt
    assert spans([9, 8, 5, 10, 3, 6], [1, 1, 5, 4, 3, 6]) == ((2, 2, 7), (5, 14, 20))
    assert spans([5, 6], [5, 6]) == ((0, 0, 5), (1, 5, 11))
    assert spans([9, 8], [1, 1], is_decode=True) == ()
    assert spans([5, 6, 9], [5, 4, 1]) == ()          # one of 5 tokens: fewer than the step's minimum
    monkeypatch.setattr(attention_backends, "FRESH_MIN_TOKENS", 6)
    monkeypatch.setattr(attention_backends, "FRESH_MIN_STEP_TOKENS", 6)
    assert spans([5, 6], [5, 6]) == ((1, 5, 11),)
