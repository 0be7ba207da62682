"""BlockManager invariants under random workloads (hypothesis) and prefix-cache behaviour."""
from hypothesis import given, settings
from hypothesis import strategies as st

from nanovllm.engine.block_manager import BlockManager
from nanovllm.engine.sequence import Sequence
from nanovllm.sampling_params import SamplingParams


def make_seq(tokens):
    return Sequence("r", 0, tokens, SamplingParams())


def check_invariants(bm: BlockManager, live: list[Sequence]):
    refs = [0] * bm.num_blocks
    for seq in live:
        assert len(seq.block_table) == bm.blocks_needed(seq.num_tokens)
        assert len(set(seq.block_table)) == len(seq.block_table)
        for b in seq.block_table:
            refs[b] += 1
    for block in bm.blocks:
        assert block.ref_count == refs[block.block_id]
        assert (block.ref_count == 0) == (block.block_id in bm.free)     # no leak, no double use
    for h, block_id in bm.cached.items():
        assert bm.blocks[block_id].hash == h


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["add", "grow", "free"]), st.integers(0, 7),
                          st.lists(st.integers(0, 3), min_size=1, max_size=40)), max_size=40),
       st.sampled_from([1, 4, 8]), st.booleans())
def test_random_workload_keeps_invariants(ops, block_size, caching):
    bm = BlockManager(num_blocks=40, block_size=block_size, enable_prefix_caching=caching)
    live: list[Sequence] = []
    for op, pick, tokens in ops:
        if op == "add":
            seq = make_seq(tokens)       # a tiny alphabet makes shared prefixes common
            if bm.allocate(seq):
                bm.cache_computed_blocks(seq, seq.num_tokens)
                seq.num_computed_tokens = seq.num_tokens
                live.append(seq)
        elif op == "grow" and live:
            seq = live[pick % len(live)]
            seq.append_token(tokens[0])
            fits, before = bm.can_append(seq, seq.num_tokens), list(seq.block_table)
            assert bm.grow(seq, seq.num_tokens) == fits
            if fits:
                bm.cache_computed_blocks(seq, seq.num_tokens)
            else:
                assert seq.block_table == before            # nothing taken when it does not fit
                seq.token_ids.pop()
        elif op == "free" and live:
            bm.free_blocks(live.pop(pick % len(live)))
        check_invariants(bm, live)
    for seq in live:
        bm.free_blocks(seq)
    assert bm.num_free_blocks == bm.num_blocks


def test_hits_share_blocks_and_survive_free_until_evicted():
    bm = BlockManager(num_blocks=6, block_size=4)
    a = make_seq(list(range(10)))             # blocks: [0..3] [4..7] [8, 9]
    assert bm.allocate(a)
    bm.cache_computed_blocks(a, 10)
    b = make_seq(list(range(9)) + [99])       # shares the two full blocks
    assert bm.allocate(b) and b.num_cached_tokens == 8 and b.block_table[:2] == a.block_table[:2]
    assert bm.blocks[a.block_table[0]].ref_count == 2
    bm.free_blocks(a)
    bm.free_blocks(b)
    c = make_seq(list(range(8)) + [7, 7])     # still cached after both were freed
    assert bm.allocate(c) and c.num_cached_tokens == 8
    bm.free_blocks(c)
    # Fill the whole cache with other tokens: the old blocks are evicted.
    d = make_seq([50] * 24)
    assert bm.allocate(d)
    bm.free_blocks(d)
    e = make_seq(list(range(10)))
    assert bm.allocate(e) and e.num_cached_tokens == 0


def test_a_fully_cached_prompt_recomputes_its_last_block():
    bm = BlockManager(num_blocks=8, block_size=4)
    a = make_seq(list(range(8)))
    assert bm.allocate(a)
    bm.cache_computed_blocks(a, 8)
    b = make_seq(list(range(8)))
    assert bm.allocate(b) and b.num_computed_tokens == 4 and b.block_table[1] != a.block_table[1]


def test_allocate_fails_without_side_effects():
    bm = BlockManager(num_blocks=3, block_size=4)
    assert not bm.allocate(make_seq(list(range(13))))
    assert bm.num_free_blocks == 3 and not bm.cached


def test_block_table_row_follows_the_table():
    """Sequence.block_table_row (the int32 copy a step's inputs read) stays equal to the table
    as the block manager allocates, grows, frees, and allocates again other blocks of the same
    count (a preempted sequence resumed)."""
    bm = BlockManager(num_blocks=12, block_size=4)
    seq = make_seq(list(range(6)))
    assert bm.allocate(seq)
    rows = [seq.block_table_row().tolist()]
    for num_tokens in (8, 9, 13):
        assert bm.grow(seq, num_tokens)
        rows.append(seq.block_table_row().tolist())
        assert rows[-1] == seq.block_table
    assert [len(r) for r in rows] == [2, 2, 3, 4]
    bm.free_blocks(seq)                       # (no step reads its row until it is resumed)
    other = make_seq([50] * 32)               # takes the eight blocks never used
    assert bm.allocate(other) and not set(other.block_table) & set(rows[-1])
    seq.token_ids += [7] * 7                  # 13 tokens, as when it was freed (preempted)
    assert bm.allocate(seq) and len(seq.block_table) == 4      # its old blocks, in another order
    assert seq.block_table_row().tolist() == seq.block_table != rows[-1]
