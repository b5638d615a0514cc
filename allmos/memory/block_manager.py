"""Paged KV-cache bookkeeping with hash-based prefix caching. Pure Python; never touches a device.

Objects and invariants (``check_integrity`` verifies them):
- ``num_blocks`` blocks of ``block_size`` tokens. A block is *in use* (``ref_count > 0``, owned by one or
  more sequences' block tables) or *free* (``ref_count == 0``, in ``_free``).
- ``_free`` is ordered least-recently-freed first; allocation pops from the front. A free block may still
  hold a cached prefix (it keeps its hash) until it is reallocated: a later prefix hit revives it.
- Each full block of a sequence has a chained hash ``h_i = xxh64(h_{i-1} || tokens of block i)``; a hash
  maps to at most one block in ``_hash_to_block`` and that block carries the same hash.
- A block's ``ref_count`` equals the number of block tables that contain it.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
import xxhash


class Sequence(Protocol):
    """What the block manager needs to know of a request."""

    token_ids: list[int]  # known tokens only (never a placeholder)
    num_computed_tokens: int
    block_table: list[int]
    block_hashes: list[int]
    num_published_blocks: int  # leading blocks already offered to the prefix cache


@dataclass
class Block:
    block_id: int
    ref_count: int = 0
    block_hash: int | None = None
    token_ids: list[int] = field(default_factory=list)  # tokens behind block_hash (guards against collisions)


def hash_block(parent_hash: int | None, token_ids: list[int]) -> int:
    """Chained 64-bit hash of one full block given the previous block's hash."""
    h = xxhash.xxh64()
    h.update((parent_hash if parent_hash is not None else 0).to_bytes(8, "little", signed=False))
    h.update(np.asarray(token_ids, dtype=np.int64).tobytes())
    return h.intdigest()


class BlockManager:
    """Allocates KV blocks to sequences and shares identical full prefix blocks between them."""

    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True) -> None:
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"need num_blocks >= 1 and block_size >= 1, got {num_blocks}, {block_size}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.blocks = [Block(i) for i in range(num_blocks)]
        self._free: OrderedDict[int, None] = OrderedDict((i, None) for i in range(num_blocks))
        self._hash_to_block: dict[int, int] = {}

    # ----------------------------------------------------------------- queries
    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    def num_blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    # ----------------------------------------------------------------- prefix cache
    def update_block_hashes(self, seq: Sequence) -> None:
        """Extend ``seq.block_hashes`` to cover every full block of its tokens (``token_ids`` holds known
        tokens only: a token sampled but not read back is not in it, so its block is hashed later)."""
        num_full = len(seq.token_ids) // self.block_size
        for i in range(len(seq.block_hashes), num_full):
            parent = seq.block_hashes[i - 1] if i else None
            tokens = seq.token_ids[i * self.block_size:(i + 1) * self.block_size]
            seq.block_hashes.append(hash_block(parent, tokens))

    def find_cached_prefix(self, seq: Sequence) -> list[int]:
        """Block ids holding the longest cached prefix of ``seq`` (full blocks only).

        At least one token is always left to compute, so a fully cached prompt still yields logits.
        """
        if not self.enable_prefix_caching:
            return []
        self.update_block_hashes(seq)
        max_blocks = (len(seq.token_ids) - 1) // self.block_size
        hits: list[int] = []
        for i, block_hash in enumerate(seq.block_hashes[:max_blocks]):
            block_id = self._hash_to_block.get(block_hash)
            tokens = seq.token_ids[i * self.block_size:(i + 1) * self.block_size]
            if block_id is None or self.blocks[block_id].token_ids != tokens:
                break
            hits.append(block_id)
        return hits

    # ----------------------------------------------------------------- allocation
    def allocate(self, seq: Sequence, num_new_tokens: int, cached_blocks: list[int] = ()) -> bool:
        """Grow ``seq.block_table`` so it covers ``num_computed_tokens + len(cached) * block_size +
        num_new_tokens`` tokens, first taking ``cached_blocks`` (a prefix hit; only when the table is
        empty). Returns False and changes nothing when the free blocks do not suffice."""
        if not cached_blocks and seq.num_computed_tokens + num_new_tokens <= len(seq.block_table) * self.block_size:
            return True  # fits the blocks it has (most decode steps)
        if cached_blocks and seq.block_table:
            raise ValueError("cached prefix blocks can only start an empty block table")
        num_fresh = self._num_new_blocks(seq, num_new_tokens, cached_blocks)
        if num_fresh > self._num_available(cached_blocks):
            return False
        for block_id in cached_blocks:
            self._take(block_id)
            seq.block_table.append(block_id)
        for _ in range(num_fresh):
            seq.block_table.append(self._take_fresh())
        return True

    def free(self, seq: Sequence) -> None:
        """Release every block of ``seq``; the tail is freed first so it is evicted first."""
        for block_id in reversed(seq.block_table):
            block = self.blocks[block_id]
            block.ref_count -= 1
            if block.ref_count == 0:
                self._free[block_id] = None
        seq.block_table.clear()
        seq.num_published_blocks = 0

    def cache_full_blocks(self, seq: Sequence) -> None:
        """Publish the hashes of blocks that are full and whose KV is computed."""
        if not self.enable_prefix_caching:
            return
        num_full_computed = seq.num_computed_tokens // self.block_size
        if num_full_computed <= seq.num_published_blocks:
            return  # nothing new since the last call (the common decode step)
        self.update_block_hashes(seq)
        num_full_computed = min(num_full_computed, len(seq.block_hashes))
        for i in range(seq.num_published_blocks, num_full_computed):
            block = self.blocks[seq.block_table[i]]
            block_hash = seq.block_hashes[i]
            if block.block_hash == block_hash:
                continue
            if block_hash in self._hash_to_block:
                continue  # an identical block is already cached; this copy stays anonymous
            self._forget(block)
            block.block_hash = block_hash
            block.token_ids = seq.token_ids[i * self.block_size:(i + 1) * self.block_size]
            self._hash_to_block[block_hash] = block.block_id
        seq.num_published_blocks = num_full_computed

    # ----------------------------------------------------------------- internals
    def _num_new_blocks(self, seq: Sequence, num_new_tokens: int, cached_blocks) -> int:
        num_tokens = seq.num_computed_tokens + len(cached_blocks) * self.block_size + num_new_tokens
        return max(0, self.num_blocks_for(num_tokens) - len(seq.block_table) - len(cached_blocks))

    def _num_available(self, cached_blocks) -> int:
        revived = sum(1 for b in cached_blocks if self.blocks[b].ref_count == 0)
        return self.num_free_blocks - revived

    def _take_fresh(self) -> int:
        """The least recently freed block, its cached content evicted."""
        block_id, _ = self._free.popitem(last=False)
        block = self.blocks[block_id]
        self._forget(block)
        block.ref_count = 1
        return block_id

    def _take(self, block_id: int) -> None:
        """One more reference to a cached block (reviving it from the free list if needed)."""
        block = self.blocks[block_id]
        if block.ref_count == 0:
            del self._free[block_id]
        block.ref_count += 1

    def _forget(self, block: Block) -> None:
        if block.block_hash is not None and self._hash_to_block.get(block.block_hash) == block.block_id:
            del self._hash_to_block[block.block_hash]
        block.block_hash = None
        block.token_ids = []

    def check_integrity(self, seqs: list[Sequence] = ()) -> None:
        """Raise ``RuntimeError`` when ref counts, free list and hash table disagree.

        With ``seqs`` (every live sequence) ref counts are also checked against the block tables.
        """
        problems: list[str] = []
        free_ids = set(self._free)
        if len(free_ids) != len(self._free):
            problems.append("duplicate ids in the free list")
        for block in self.blocks:
            if (block.ref_count == 0) != (block.block_id in free_ids):
                problems.append(f"block {block.block_id}: ref_count {block.ref_count} vs free-list membership")
            if block.ref_count < 0:
                problems.append(f"block {block.block_id}: negative ref_count")
            if block.block_hash is not None and self._hash_to_block.get(block.block_hash) != block.block_id:
                problems.append(f"block {block.block_id}: hash not in table")
        for block_hash, block_id in self._hash_to_block.items():
            if self.blocks[block_id].block_hash != block_hash:
                problems.append(f"hash table entry {block_hash:x} -> block {block_id} disagrees")
        if seqs:
            counts = [0] * self.num_blocks
            for seq in seqs:
                for block_id in seq.block_table:
                    counts[block_id] += 1
            for block in self.blocks:
                if counts[block.block_id] != block.ref_count:
                    problems.append(f"block {block.block_id}: ref_count {block.ref_count}, "
                                    f"held by {counts[block.block_id]} tables")
        if problems:
            raise RuntimeError("block manager integrity check failed: " + "; ".join(problems[:10]))
