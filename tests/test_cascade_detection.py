"""Shared-prefix detection (``allmos.attention.cascade``): which sequences form groups, how long each group's
prefix is, and the fixed-size arrays the kernels read."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from allmos.attention.cascade import (
    MAX_CASCADE_GROUPS,
    CascadeGroup,
    CascadePolicy,
    cascade_arrays,
    find_shared_prefixes,
    plan_cascade,
    tile_capacity,
)

BS = 16  # block size
ANY = CascadePolicy(min_saved_tokens=0)  # thresholds off: every group of two sharing one block counts


def tables_of(rows: list[list[int]], pad: int = 0) -> np.ndarray:
    """Block tables padded with ``pad`` (0 is a real block id: padding must never match)."""
    out = np.full((len(rows), max(len(r) for r in rows)), pad, dtype=np.int32)
    for i, r in enumerate(rows):
        out[i, :len(r)] = r
    return out


def as_sets(groups: list[CascadeGroup]) -> set[tuple[tuple[int, ...], int]]:
    return {(tuple(int(m) for m in g.members), g.prefix_blocks) for g in groups}


def test_no_sharing_gives_no_groups():
    tables = tables_of([[1, 2, 3], [4, 5, 6], [7, 8, 9]])
    assert find_shared_prefixes(tables, np.array([40, 40, 40]), BS, ANY) == []


def test_one_group_with_a_prefix_ending_mid_block():
    # a 40-token shared prompt: blocks 10, 11 are shared (32 tokens); tokens 32..39 sit in each own block
    tables = tables_of([[10, 11, 20, 21], [10, 11, 30], [10, 11, 40, 41], [50, 51, 52]])
    groups = find_shared_prefixes(tables, np.array([60, 45, 50, 40]), BS, ANY)
    assert as_sets(groups) == {((0, 1, 2), 2)}


def test_several_groups_with_different_prefixes():
    tables = tables_of([[1, 2, 3, 9], [5, 6, 7], [1, 2, 3, 8], [5, 6, 4], [1, 2, 3, 7]])
    groups = find_shared_prefixes(tables, np.array([64, 48, 64, 48, 64]), BS, ANY)
    assert as_sets(groups) == {((0, 2, 4), 3), ((1, 3), 2)}
    assert [g.saved_blocks for g in groups] == [6, 2]  # largest savings first


def test_the_last_token_stays_in_the_suffix():
    # both sequences are exactly two full blocks long: the second block holds each one's last token
    tables = tables_of([[1, 2], [1, 2]])
    assert as_sets(find_shared_prefixes(tables, np.array([32, 32]), BS, ANY)) == {((0, 1), 1)}
    # a sequence whose last token is in its first block cannot share anything
    tables = tables_of([[1, 2], [1]])
    assert find_shared_prefixes(tables, np.array([32, 16]), BS, ANY) == []


def test_padding_entries_are_never_compared():
    # row 1 holds 32 tokens in blocks 7, 3 (may share 1 block); its padding (block id 0) matches row 0's
    # third block, which must not make the prefix longer
    tables = tables_of([[7, 3, 0, 5], [7, 3]], pad=0)
    assert as_sets(find_shared_prefixes(tables, np.array([64, 32]), BS, ANY)) == {((0, 1), 1)}


def test_subgroups_that_share_more_win():
    # all four share block 1; pairs also share a long document (blocks 2..5 and 6..9)
    tables = tables_of([[1, 2, 3, 4, 5, 20], [1, 2, 3, 4, 5, 21], [1, 6, 7, 8, 9, 22], [1, 6, 7, 8, 9, 23]])
    groups = find_shared_prefixes(tables, np.full(4, 96), BS, ANY)
    assert as_sets(groups) == {((0, 1), 5), ((2, 3), 5)}  # 4 + 4 saved blocks beat 3 x 1
    # with many sequences on the common block and only one pair sharing more, the big group wins
    rows = [[1, 2, 3, 4, 40 + i] for i in range(8)] + [[1, 5, 6, 7, 60], [1, 5, 6, 7, 61]]
    groups = find_shared_prefixes(tables_of(rows), np.full(10, 80), BS, ANY)
    assert as_sets(groups) == {(tuple(range(8)), 4), ((8, 9), 4)}


def test_a_short_member_does_not_cap_the_others():
    # sequence 2 may share only one block (its last token is in its second block)
    tables = tables_of([[1, 2, 3, 4, 50], [1, 2, 3, 4, 51], [1, 2]])
    groups = find_shared_prefixes(tables, np.array([80, 80, 20]), BS, ANY)
    assert as_sets(groups) == {((0, 1), 4)}  # 4 saved blocks beat 2 x 1


def test_thresholds():
    tables = tables_of([[1, 2, 3, 9], [1, 2, 3, 8]])
    lens = np.array([64, 64])
    assert find_shared_prefixes(tables, lens, BS, CascadePolicy(min_saved_tokens=48)) != []
    assert find_shared_prefixes(tables, lens, BS, CascadePolicy(min_saved_tokens=49)) == []
    assert find_shared_prefixes(tables, lens, BS, CascadePolicy(min_saved_tokens=0, min_prefix_blocks=4)) == []
    assert find_shared_prefixes(tables, lens, BS, CascadePolicy(min_saved_tokens=0, min_group_size=3)) == []
    # the default needs thousands of saved token reads
    assert find_shared_prefixes(tables, lens, BS) == []
    with pytest.raises(ValueError, match="min_group_size"):
        CascadePolicy(min_group_size=1)


def test_at_most_max_groups_keeping_the_largest():
    rows, lens = [], []
    for g in range(MAX_CASCADE_GROUPS + 3):
        for m in range(2):
            rows.append([100 + g] * 1 + [200 + g] * (g + 1) + [1000 + 2 * g + m])
            lens.append(16 * (g + 2) + 1)
    groups = find_shared_prefixes(tables_of(rows), np.array(lens), BS, ANY)
    assert len(groups) == MAX_CASCADE_GROUPS
    assert sorted(g.prefix_blocks for g in groups) == list(range(5, MAX_CASCADE_GROUPS + 5))


def test_arrays_layout_and_capacity():
    groups = [CascadeGroup(np.array([0, 2, 3, 5, 6]), 3), CascadeGroup(np.array([1, 4]), 2)]
    arrays = cascade_arrays(groups, 8, members_per_tile=2)
    assert arrays.prefix_blocks.tolist() == [3, 2, 3, 3, 2, 3, 3, 0]
    assert arrays.members.tolist()[:7] == [0, 2, 3, 5, 6, 1, 4]
    assert arrays.tiles.shape == (tile_capacity(8, 2), 3) == (4 + MAX_CASCADE_GROUPS, 3)
    assert arrays.tiles[:5].tolist() == [[0, 0, 2], [0, 2, 2], [0, 4, 1], [1, 5, 2], [0, 0, 0]]
    assert not arrays.tiles[4:].any()
    assert {a.dtype for a in (arrays.prefix_blocks, arrays.members, arrays.tiles)} == {np.dtype(np.int32)}
    with pytest.raises(ValueError, match="two cascade groups"):
        cascade_arrays([CascadeGroup(np.array([0, 1]), 1), CascadeGroup(np.array([1, 2]), 1)], 3, 2)


def test_plan_is_none_without_sharing():
    assert plan_cascade(tables_of([[1, 2], [3, 4]]), np.array([30, 30]), BS, 4, ANY) is None
    plan = plan_cascade(tables_of([[1, 2], [1, 4]]), np.array([30, 30]), BS, 4, ANY)
    assert plan is not None and plan.prefix_blocks.tolist() == [1, 1]


@st.composite
def shared_tables(draw):
    """Block tables built from a random tree of shared prompt prefixes (ids unique per tree node)."""
    num_seqs = draw(st.integers(1, 12))
    next_id, rows, lens = 0, [], []
    prefixes = [[]]
    for _ in range(num_seqs):
        base = list(draw(st.sampled_from(prefixes)))
        for _ in range(draw(st.integers(0, 4))):
            base.append(next_id)
            next_id += 1
        prefixes.append(base)
        own = draw(st.integers(1, 3))
        rows.append(base + list(range(next_id, next_id + own)))
        next_id += own
        lens.append(BS * (len(rows[-1]) - 1) + draw(st.integers(1, BS)))
    return tables_of(rows, pad=0), np.array(lens)


@settings(max_examples=200, deadline=None)
@given(shared_tables())
def test_groups_are_disjoint_shared_and_leave_a_suffix(case):
    tables, lens = case
    groups = find_shared_prefixes(tables, lens, BS, ANY)
    seen: set[int] = set()
    for g in groups:
        members = [int(m) for m in g.members]
        assert len(members) >= 2 and g.prefix_blocks >= 1
        assert not seen & set(members)
        seen |= set(members)
        assert (tables[members, :g.prefix_blocks] == tables[members[0], :g.prefix_blocks]).all()
        assert all(g.prefix_blocks * BS <= lens[m] - 1 for m in members)
    arrays = cascade_arrays(groups, len(lens), members_per_tile=3)
    counts = arrays.tiles[:, 2]
    assert counts.sum() == len(seen) and (counts <= 3).all()
    for leader, first, count in arrays.tiles[counts > 0]:
        tile_members = arrays.members[first:first + count]
        assert (arrays.prefix_blocks[tile_members] == arrays.prefix_blocks[leader]).all()
