"""The vectorised decode reference equals the general one-sequence-at-a-time reference."""
import torch

from nanovllm.kernels.reference import paged_attention_reference, paged_decode_attention_reference


def test_decode_reference_matches_general_reference():
    torch.manual_seed(0)
    num_blocks, block_size, hkv, hq, d = 40, 8, 2, 6, 16
    k_cache, v_cache = torch.randn(2, num_blocks, block_size, hkv, d).unbind(0)
    seq_lens = torch.tensor([1, 9, 33, 70], dtype=torch.int32)
    block_tables = torch.randperm(num_blocks)[:4 * 9].view(4, 9).int()
    q = torch.randn(4, hq, d)
    cu = torch.arange(5, dtype=torch.int32)
    expected = paged_attention_reference(q, k_cache, v_cache, cu, seq_lens, block_tables, 0.25)
    got = paged_decode_attention_reference(q, k_cache, v_cache, seq_lens, block_tables, 0.25)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
