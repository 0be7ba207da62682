"""The paged KV cache's bookkeeping: which blocks are free, who uses which, and the prefix cache.

The cache is `num_blocks` blocks of `block_size` token slots. A sequence owns a block
table (its blocks in order). Full blocks are identified by a chained hash of their
tokens: hash(block i) = xxh64(hash(block i-1) || token ids of block i), so equal hashes
mean an equal whole prefix. When a new sequence's prompt starts with blocks whose hashes
are cached, it shares them (reference counted) instead of recomputing their keys/values.

Freed blocks keep their hash and contents: they go to the back of the free list and are
only overwritten when no never-used or older free block is left (LRU eviction), so a
prompt seen before is still cached in later `generate` calls.
"""
from array import array
from collections import OrderedDict

import xxhash

from nanovllm.engine.sequence import Sequence


def chain_hash(prev_hash: int, token_ids: list[int]) -> int:
    h = xxhash.xxh64(prev_hash.to_bytes(8, "little"))
    h.update(array("q", token_ids).tobytes())
    return h.intdigest()


class Block:
    __slots__ = ("block_id", "ref_count", "hash", "token_ids")

    def __init__(self, block_id: int):
        self.block_id = block_id
        self.ref_count = 0
        self.hash: int | None = None        # set once the block is full and in the prefix cache
        self.token_ids: tuple = ()          # its tokens, to confirm a hash hit is not a collision


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True):
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.blocks = [Block(i) for i in range(num_blocks)]
        # Ordered set of free block ids, least recently freed first.
        self.free: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))
        self.cached: dict[int, int] = {}    # block hash -> block id

    @property
    def num_blocks(self) -> int:
        return len(self.blocks)

    @property
    def num_free_blocks(self) -> int:
        return len(self.free)

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    # -- prefix cache ------------------------------------------------------------------
    def _block_tokens(self, seq: Sequence, i: int) -> list[int]:
        return seq.token_ids[i * self.block_size:(i + 1) * self.block_size]

    def _hash_of(self, seq: Sequence, i: int) -> int:
        """Hash of the sequence's full block i (memoised on the sequence)."""
        while len(seq.block_hashes) <= i:
            j = len(seq.block_hashes)
            prev = seq.block_hashes[-1] if j else 0
            seq.block_hashes.append(chain_hash(prev, self._block_tokens(seq, j)))
        return seq.block_hashes[i]

    def _lookup(self, seq: Sequence) -> list[Block]:
        """The cached blocks that hold a prefix of seq's tokens. At least one token is
        always left to compute (its logits are needed), so a fully cached prompt gives
        up its last block."""
        if not self.enable_prefix_caching or seq.params.prompt_logprobs is not None:
            return []     # prompt logprobs need the logits of every prompt token: compute them all
        hits = []
        for i in range((seq.num_tokens - 1) // self.block_size):
            block_id = self.cached.get(self._hash_of(seq, i))
            if block_id is None or self.blocks[block_id].token_ids != tuple(self._block_tokens(seq, i)):
                break
            hits.append(self.blocks[block_id])
        return hits

    def cache_computed_blocks(self, seq: Sequence, num_computed: int) -> None:
        """Enter seq's blocks that are full within its first `num_computed` tokens into the
        prefix cache. Called when a step is scheduled: the step writes their keys/values
        before any attention reads them (every layer stores before it attends)."""
        full = num_computed // self.block_size
        if not self.enable_prefix_caching or full <= seq.num_blocks_seen:
            return                                # (most decode steps fill no block)
        for i in range(seq.num_blocks_seen, full):
            block = self.blocks[seq.block_table[i]]
            h = self._hash_of(seq, i)
            # A block already cached (a hit) stays; an identical block elsewhere keeps the entry.
            if block.hash is None and h not in self.cached:
                block.hash, block.token_ids = h, tuple(self._block_tokens(seq, i))
                self.cached[h] = block.block_id
        seq.num_blocks_seen = full

    # -- allocation --------------------------------------------------------------------
    def _take_free_block(self) -> Block:
        block_id, _ = self.free.popitem(last=False)
        block = self.blocks[block_id]
        if block.hash is not None:          # evict its old contents from the prefix cache
            del self.cached[block.hash]
            block.hash, block.token_ids = None, ()
        block.ref_count = 1
        return block

    def allocate(self, seq: Sequence) -> bool:
        """Give seq blocks for all its tokens, reusing cached prefix blocks. Returns False
        (and changes nothing) when there are not enough free blocks."""
        hits = self._lookup(seq)
        in_use = sum(1 for b in hits if b.ref_count > 0)
        if self.blocks_needed(seq.num_tokens) - in_use > self.num_free_blocks:
            return False
        for block in hits:
            if block.ref_count == 0:
                del self.free[block.block_id]
            block.ref_count += 1
        seq.block_table = [b.block_id for b in hits]
        while len(seq.block_table) < self.blocks_needed(seq.num_tokens):
            seq.block_table.append(self._take_free_block().block_id)
        seq.num_computed_tokens = len(hits) * self.block_size
        if seq.num_output_tokens == 0:     # reported for the prompt, not for a resumed sequence
            seq.num_cached_tokens = seq.num_computed_tokens
        return True

    def free_blocks(self, seq: Sequence) -> None:
        # Last blocks first: they are the least likely to be shared, so they are evicted first.
        for block_id in reversed(seq.block_table):
            block = self.blocks[block_id]
            block.ref_count -= 1
            if block.ref_count == 0:
                self.free[block_id] = None
        seq.block_table = []
        seq.num_computed_tokens = 0
        seq.num_blocks_seen = 0

    def can_append(self, seq: Sequence, num_tokens: int) -> bool:
        """Are there blocks for seq to hold `num_tokens` tokens?"""
        return self.blocks_needed(num_tokens) - len(seq.block_table) <= self.num_free_blocks

    def grow(self, seq: Sequence, num_tokens: int) -> bool:
        """Give seq the blocks it lacks to hold `num_tokens` tokens; False (and nothing
        changed) when too few are free."""
        lacking = self.blocks_needed(num_tokens) - len(seq.block_table)     # (most decode steps: <= 0)
        if lacking > len(self.free):
            return False
        seq.block_table += [self._take_free_block().block_id for _ in range(lacking)]
        return True
