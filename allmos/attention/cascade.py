"""Shared-prefix detection for cascade decode attention (host side, numpy; runs once per decode step).

Design: ``docs/cascade_attention.md``. Invariants of what this module returns:
- A group's members are distinct sequence indices of the step; a sequence is in at most one group.
- Every member's block table starts with the group's ``prefix_blocks`` block ids, the same ids for all
  members (prefix caching makes identical prompt prefixes share physical blocks).
- ``prefix_blocks * block_size <= seq_len - 1`` for every member: its last token (whose K/V this step
  writes) and everything after the prefix stay in its own suffix, so the suffix is never empty.
- ``CascadeArrays`` are fixed-size for a batch of ``num_seqs`` (see ``tile_capacity``): a CUDA graph
  captured for that size can take them, and every entry is rewritten each step (no stale groups).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# A group needs two members to share anything.
MIN_GROUP_SIZE = 2
# One whole block is the least that can be shared (prefix caching shares full blocks only).
MIN_PREFIX_BLOCKS = 1
# The cascade path costs one extra kernel launch per layer (a few microseconds inside a CUDA graph) plus the
# float32 partials; 3 us at 4.3 TB/s reads about 3,000 tokens of Qwen3-0.6B's per-layer KV (4 KiB per token).
# A step uses cascade only when its groups skip at least this many token reads per layer in all (an estimate
# from those figures, not a measured break-even).
MIN_SAVED_TOKENS = 4096
# Groups per step: each adds at most one partly filled tile to the prefix kernel's fixed grid (see
# ``tile_capacity``), and every slot of that grid costs an (early-exiting) program even when unused.
MAX_CASCADE_GROUPS = 8


@dataclass(frozen=True)
class CascadePolicy:
    """When sharing pays (defaults: the module constants)."""

    min_group_size: int = MIN_GROUP_SIZE
    min_prefix_blocks: int = MIN_PREFIX_BLOCKS
    min_saved_tokens: int = MIN_SAVED_TOKENS

    def __post_init__(self) -> None:
        if self.min_group_size < MIN_GROUP_SIZE or self.min_prefix_blocks < MIN_PREFIX_BLOCKS:
            raise ValueError(f"CascadePolicy needs min_group_size >= {MIN_GROUP_SIZE} and min_prefix_blocks >= "
                             f"{MIN_PREFIX_BLOCKS}, got {self.min_group_size} and {self.min_prefix_blocks}")


DEFAULT_CASCADE_POLICY = CascadePolicy()


@dataclass(frozen=True)
class CascadeGroup:
    """Sequences (indices into the step's batch) whose first ``prefix_blocks`` blocks are the same."""

    members: np.ndarray  # [num_members] int64, ascending
    prefix_blocks: int

    @property
    def saved_blocks(self) -> int:
        """Block reads per layer and KV head that reading the prefix once saves."""
        return (len(self.members) - 1) * self.prefix_blocks


@dataclass(frozen=True)
class CascadeArrays:
    """Host arrays for ``AttentionMetadata``'s cascade fields (see ``allmos.attention.metadata``)."""

    prefix_blocks: np.ndarray  # [num_seqs] int32, 0 for sequences outside every group
    members: np.ndarray  # [num_seqs] int32, members of group 0, then group 1, ...; the rest 0
    tiles: np.ndarray  # [tile_capacity, 3] int32: (leader sequence, first index into members, count); unused: 0


def find_shared_prefixes(block_tables: np.ndarray, seq_lens: np.ndarray, block_size: int,
                         policy: CascadePolicy = DEFAULT_CASCADE_POLICY) -> list[CascadeGroup]:
    """The groups worth a cascade this step (at most ``MAX_CASCADE_GROUPS``, largest savings first); [] when
    sharing does not pay.

    ``block_tables`` [num_seqs, max_blocks] holds each sequence's block ids (entries past its blocks are
    padding and never compared); ``seq_lens`` [num_seqs] are context lengths including this step's token.
    """
    caps = (np.asarray(seq_lens, dtype=np.int64) - 1) // block_size  # [num_seqs] most blocks a member may share
    rows = np.flatnonzero(caps >= policy.min_prefix_blocks)
    groups = _groups_at(block_tables, caps, rows, 0, policy)
    groups.sort(key=lambda g: -g.saved_blocks)
    groups = groups[:MAX_CASCADE_GROUPS]
    if sum(g.saved_blocks for g in groups) * block_size < policy.min_saved_tokens:
        return []
    return groups


def _groups_at(tables: np.ndarray, caps: np.ndarray, rows: np.ndarray, depth: int,
               policy: CascadePolicy) -> list[CascadeGroup]:
    """Groups among ``rows``, which agree on their first ``depth`` blocks and may share block ``depth``."""
    if len(rows) < policy.min_group_size:
        return []
    keys = tables[rows, depth]
    order = np.argsort(keys, kind="stable")
    rows, keys = rows[order], keys[order]
    starts = np.flatnonzero(np.concatenate(([True], keys[1:] != keys[:-1])))  # runs of equal block ids
    ends = np.append(starts[1:], len(keys))
    groups = []
    for i in np.flatnonzero(ends - starts >= policy.min_group_size):  # no Python work for unshared blocks
        groups += _best_group(tables, caps, np.sort(rows[starts[i]:ends[i]]), depth + 1, policy)
    return groups


def _best_group(tables: np.ndarray, caps: np.ndarray, rows: np.ndarray, agreed: int,
                policy: CascadePolicy) -> list[CascadeGroup]:
    """``rows`` share their first ``agreed`` blocks: extend that to their longest common run, then keep
    either this one group or the subgroups that share more (whichever saves more block reads)."""
    cap = int(caps[rows].min())
    common = cap
    if cap > agreed:
        tail = tables[rows, agreed:cap]  # [num_rows, cap - agreed]
        differs = (tail != tail[0]).any(axis=0)
        if differs.any():
            common = agreed + int(np.argmax(differs))
    children = _groups_at(tables, caps, rows[caps[rows] > common], common, policy)  # those that may share more
    here = CascadeGroup(rows, common) if common >= policy.min_prefix_blocks else None
    if here is None or sum(g.saved_blocks for g in children) > here.saved_blocks:
        return children
    return [here]


def tile_capacity(num_seqs: int, members_per_tile: int) -> int:
    """Tiles of ``members_per_tile`` members that any grouping of ``num_seqs`` sequences needs at most: each
    group's last tile may be partly filled, so ``sum(cdiv(m_g, t)) <= cdiv(num_seqs, t) + MAX_CASCADE_GROUPS``."""
    return -(-num_seqs // members_per_tile) + MAX_CASCADE_GROUPS


def cascade_arrays(groups: list[CascadeGroup], num_seqs: int, members_per_tile: int) -> CascadeArrays:
    """Lay ``groups`` out as fixed-size arrays for a batch of ``num_seqs`` (tiles of ``members_per_tile``)."""
    if len(groups) > MAX_CASCADE_GROUPS:
        raise ValueError(f"at most {MAX_CASCADE_GROUPS} cascade groups per step, got {len(groups)}")
    prefix_blocks = np.zeros(num_seqs, dtype=np.int32)
    members = np.zeros(num_seqs, dtype=np.int32)
    tiles = np.zeros((tile_capacity(num_seqs, members_per_tile), 3), dtype=np.int32)
    first, tile = 0, 0
    for group in groups:
        count = len(group.members)
        if (prefix_blocks[group.members] != 0).any():
            raise ValueError("a sequence belongs to two cascade groups")
        prefix_blocks[group.members] = group.prefix_blocks
        members[first:first + count] = group.members
        for start in range(0, count, members_per_tile):
            tiles[tile] = (group.members[0], first + start, min(members_per_tile, count - start))
            tile += 1
        first += count
    return CascadeArrays(prefix_blocks, members, tiles)


def plan_cascade(block_tables: np.ndarray, seq_lens: np.ndarray, block_size: int, members_per_tile: int,
                 policy: CascadePolicy = DEFAULT_CASCADE_POLICY) -> CascadeArrays | None:
    """The cascade arrays of one decode step, or None when no sharing pays."""
    groups = find_shared_prefixes(block_tables, seq_lens, block_size, policy)
    if not groups:
        return None
    return cascade_arrays(groups, len(seq_lens), members_per_tile)
