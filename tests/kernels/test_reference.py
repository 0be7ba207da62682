"""The vectorised decode reference equals the general one-sequence-at-a-time reference."""
import torch

from nanovllm.kernels.reference import paged_attention_reference
from nanovllm.layers.cpu_attention import paged_decode_attention_reference


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


def test_one_sequence_with_consecutive_blocks_reads_a_view_of_the_cache():
    """A lone sequence whose blocks are consecutive reads its keys as a slice of the cache
    (decode_reads gives a slice, no mask); same result as the general reference, with and
    without a sliding window, and as the gathered path where the blocks are not consecutive."""
    from nanovllm.layers.cpu_attention import decode_reads
    torch.manual_seed(0)
    num_blocks, block_size, hkv, hq, d = 40, 8, 2, 6, 16
    k_cache, v_cache = torch.randn(2, num_blocks, block_size, hkv, d).unbind(0)
    q = torch.randn(1, hq, d)
    cu = torch.arange(2, dtype=torch.int32)
    for length, window in [(1, None), (8, None), (21, None), (21, 5), (21, 40)]:
        seq_lens = torch.tensor([length], dtype=torch.int32)
        consecutive = torch.arange(7, 7 + 4, dtype=torch.int32)[None]
        assert isinstance(decode_reads(seq_lens, consecutive, block_size, window)[0], slice)
        scattered = torch.tensor([[30, 3, 17, 11]], dtype=torch.int32)
        one_block = length <= block_size       # a single block is consecutive however placed
        assert isinstance(decode_reads(seq_lens, scattered, block_size, window)[0], slice) == one_block
        for tables in (consecutive, scattered):
            expected = paged_attention_reference(q, k_cache, v_cache, cu, seq_lens, tables, 0.25, window=window)
            got = paged_decode_attention_reference(q, k_cache, v_cache, seq_lens, tables, 0.25, window=window)
            torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
