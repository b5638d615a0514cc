"""Cascade (shared-prefix) decode attention against the torch reference (``paged_attention_ref``).

Caches are built the way prefix caching builds them: sequences of one group start with the same physical
blocks; every sequence owns the rest of its blocks (a prompt prefix that ends inside a block leaves that
block's tokens in each sequence's own block). Block tables are shuffled, free slots and padding are NaN,
outputs and workspaces are poisoned before each run. CPU cases run through the Triton interpreter (float32,
small shapes); ``@pytest.mark.gpu`` cases use realistic sizes and CUDA graphs.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

import numpy as np
import pytest
import torch
from test_kernels import DEVICE, PAD_BLOCK_ID, random_query, tolerance

from allmos.attention.cascade import CascadeGroup, CascadePolicy, cascade_arrays, find_shared_prefixes
from allmos.attention.torch_ref import paged_attention_ref, store_kv_cache_ref
from allmos.kernels.cascade_attention import (
    CascadeConfig,
    CascadeTiles,
    CascadeWorkspace,
    cascade_decode_attention,
    choose_prefix_splits,
    default_cascade_config,
    members_per_tile,
)
from allmos.kernels.decode_attention import DecodeWorkspace, paged_decode_attention

ANY = CascadePolicy(min_saved_tokens=0)


@dataclass
class SharedCase:
    k_cache: torch.Tensor  # [num_blocks, block_size, num_kv_heads, head_dim]
    v_cache: torch.Tensor
    block_tables: torch.Tensor  # [num_seqs, max_blocks] int32
    seq_lens: list[int]

    @property
    def seq_lens_tensor(self) -> torch.Tensor:
        return torch.tensor(self.seq_lens, dtype=torch.int32, device=self.k_cache.device)


def make_shared_case(prefix_of: list[int | None], prefix_blocks: list[int], seq_lens: list[int], num_kv_heads: int,
                     head_dim: int, block_size: int, dtype: torch.dtype, seed: int) -> SharedCase:
    """Sequence ``s`` starts with the ``prefix_blocks[prefix_of[s]]`` blocks of its prefix (None: its own);
    every cached token gets random K/V, free slots are NaN."""
    rng = random.Random(seed)
    gen = torch.Generator().manual_seed(seed)
    own = [math.ceil(n / block_size) - (prefix_blocks[p] if p is not None else 0) for p, n in zip(prefix_of, seq_lens)]
    num_blocks = sum(prefix_blocks) + sum(own) + 2
    ids = list(range(num_blocks))
    rng.shuffle(ids)
    shared = [[ids.pop() for _ in range(n)] for n in prefix_blocks]
    rows = [(shared[p] if p is not None else []) + [ids.pop() for _ in range(k)] for p, k in zip(prefix_of, own)]
    tables = torch.full((len(rows), max(map(len, rows)) + 1), PAD_BLOCK_ID, dtype=torch.int32)
    for s, row in enumerate(rows):
        tables[s, :len(row)] = torch.tensor(row, dtype=torch.int32)
    shape = (num_blocks, block_size, num_kv_heads, head_dim)
    k_cache = torch.full(shape, float("nan"), dtype=dtype)
    v_cache = torch.full(shape, float("nan"), dtype=dtype)
    slots = sorted({row[t // block_size] * block_size + t % block_size for row, n in zip(rows, seq_lens)
                    for t in range(n)})
    keys = torch.randn(len(slots), num_kv_heads, head_dim, generator=gen)
    values = torch.randn(len(slots), num_kv_heads, head_dim, generator=gen)
    store_kv_cache_ref(keys, values, k_cache, v_cache, torch.tensor(slots, dtype=torch.int64))
    return SharedCase(k_cache.to(DEVICE), v_cache.to(DEVICE), tables.to(DEVICE), seq_lens)


def tiles_for(groups: list[CascadeGroup], num_seqs: int, tile_members: int) -> CascadeTiles:
    arrays = cascade_arrays(groups, num_seqs, tile_members)
    return CascadeTiles(*(torch.from_numpy(a).to(DEVICE) for a in (arrays.prefix_blocks, arrays.members, arrays.tiles)))


def detect(case: SharedCase, block_size: int) -> list[CascadeGroup]:
    tables = case.block_tables.cpu().numpy()
    return find_shared_prefixes(np.where(tables == PAD_BLOCK_ID, 0, tables), np.array(case.seq_lens), block_size, ANY)


def run_cascade(case: SharedCase, groups: list[CascadeGroup], num_heads: int, dtype: torch.dtype, *,
                prefix_splits: int, num_splits: int, config: CascadeConfig | None = None, fold_merge: bool = False,
                seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(cascade output, reference output) for one decode step of ``case``."""
    head_dim, num_kv_heads = case.k_cache.shape[3], case.k_cache.shape[2]
    num_seqs = len(case.seq_lens)
    query = random_query(num_seqs, num_heads, head_dim, dtype, seed)
    cfg = config or default_cascade_config(num_heads // num_kv_heads, head_dim, dtype, 1 << 30)
    workspace = CascadeWorkspace.allocate(num_seqs * prefix_splits, num_heads, head_dim, DEVICE)
    workspace.partial_out.fill_(float("nan"))
    workspace.lse.fill_(float("nan"))
    decode_ws = DecodeWorkspace.allocate(num_seqs, num_heads, head_dim, max(num_splits, 1), DEVICE,
                                         num_kv_heads=num_kv_heads)
    decode_ws.partial_out.fill_(float("nan"))
    out = torch.full_like(query, float("nan"))
    scale = head_dim ** -0.5
    tiles = tiles_for(groups, num_seqs, members_per_tile(num_heads // num_kv_heads, cfg.block_m))
    cascade_decode_attention(query, case.k_cache, case.v_cache, case.seq_lens_tensor, case.block_tables, tiles, scale,
                             num_prefix_splits=prefix_splits, num_splits=num_splits, out=out, workspace=workspace,
                             decode_workspace=decode_ws, config=cfg, fold_merge=fold_merge)
    valid = [n > 0 for n in case.seq_lens]
    qsl = list(range(num_seqs + 1))
    ref = paged_attention_ref(query, case.k_cache, case.v_cache, qsl, case.seq_lens, case.block_tables, scale)
    if fold_merge:
        assert torch.count_nonzero(decode_ws.semaphores) == 0
    return out[valid], ref[valid]


SMALL = CascadeConfig(block_m=16, block_n=16, num_warps=4, num_stages=1)  # several tiles per group


@pytest.mark.parametrize("prefix_splits,num_splits", [(1, 1), (3, 1), (2, 3)])
@pytest.mark.parametrize("block_size,num_kv_heads,group", [(16, 2, 2), (32, 1, 3), (16, 2, 1)])
def test_several_groups_and_ungrouped_sequences(block_size, num_kv_heads, group, prefix_splits, num_splits):
    # prefix 0: 3 blocks shared by 5 sequences; prefix 1: 1 block shared by 2; 2 sequences share nothing
    prefix_of = [0, None, 1, 0, 0, 1, None, 0, 0]
    seq_lens = [3 * block_size + 5, 40, block_size + 1, 3 * block_size + 1, 5 * block_size, 2 * block_size,
                7, 4 * block_size + 9, 3 * block_size + block_size // 2]
    case = make_shared_case(prefix_of, [3, 1], seq_lens, num_kv_heads, 32, block_size, torch.float32, seed=group)
    groups = detect(case, block_size)
    assert {tuple(g.members.tolist()) for g in groups} == {(0, 3, 4, 7, 8), (2, 5)}
    out, ref = run_cascade(case, groups, num_kv_heads * group, torch.float32, prefix_splits=prefix_splits,
                           num_splits=num_splits, config=SMALL, seed=prefix_splits)
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)


def test_no_sharing_is_plain_decode():
    case = make_shared_case([None] * 4, [], [5, 33, 17, 64], 2, 32, 16, torch.float32, seed=1)
    assert detect(case, 16) == []
    out, ref = run_cascade(case, [], 4, torch.float32, prefix_splits=2, num_splits=2, config=SMALL)
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)


def test_prefix_ending_mid_block_and_capped_members():
    # a 40-token shared prompt at block size 16: blocks 0-1 are shared, tokens 32..39 sit in each own block;
    # sequence 3 is 32 tokens long, so it may share only one block (its last token is in block 1)
    block_size = 16
    case = make_shared_case([0, 0, 0, 0], [2], [41, 47, 60, 32], 2, 32, block_size, torch.float32, seed=2)
    groups = detect(case, block_size)
    assert [(g.members.tolist(), g.prefix_blocks) for g in groups] == [([0, 1, 2], 2)]
    out, ref = run_cascade(case, groups, 4, torch.float32, prefix_splits=2, num_splits=1, config=SMALL)
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)
    # the whole group on one block only (a shorter prefix than the blocks shared) is also exact
    out, ref = run_cascade(case, [CascadeGroup(np.array([0, 1, 2, 3]), 1)], 4, torch.float32, prefix_splits=1,
                           num_splits=2, config=SMALL)
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)


def test_key_tiles_longer_than_blocks_and_folded_merge():
    # block size 16 with 32-token key tiles: a 3-block prefix ends in the middle of a key tile
    config = CascadeConfig(block_m=16, block_n=32, num_warps=4, num_stages=1)
    case = make_shared_case([0, 0, 0, None], [3], [49, 70, 100, 30], 2, 32, 16, torch.float32, seed=3)
    groups = detect(case, 16)
    assert [g.prefix_blocks for g in groups] == [3]
    out, ref = run_cascade(case, groups, 4, torch.float32, prefix_splits=2, num_splits=3, config=config,
                           fold_merge=True)
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)


def test_padded_rows_give_zeros():
    """Rows of a CUDA graph's padding (seq_len 0, outside every group) come out as zeros."""
    case = make_shared_case([0, 0, None], [2], [40, 35, 0], 2, 32, 16, torch.float32, seed=4)
    num_heads, head_dim = 4, 32
    query = random_query(3, num_heads, head_dim, torch.float32, seed=4)
    tiles = tiles_for([CascadeGroup(np.array([0, 1]), 2)], 3, members_per_tile(2, SMALL.block_m))
    out = cascade_decode_attention(query, case.k_cache, case.v_cache, case.seq_lens_tensor, case.block_tables,
                                   tiles, 0.2, num_prefix_splits=2, num_splits=2, config=SMALL)
    ref = paged_attention_ref(query[:2], case.k_cache, case.v_cache, [0, 1, 2], case.seq_lens[:2],
                              case.block_tables, 0.2)
    torch.testing.assert_close(out[:2], ref, atol=1e-4, rtol=1e-4)
    assert torch.equal(out[2], torch.zeros_like(out[2]))


def test_bad_arguments_raise_value_errors():
    case = make_shared_case([0, 0], [1], [20, 20], 2, 32, 16, torch.float32, seed=5)
    query = random_query(2, 4, 32, torch.float32, seed=5)
    tiles = tiles_for([CascadeGroup(np.array([0, 1]), 1)], 2, 8)
    kwargs = dict(num_prefix_splits=1, config=SMALL)
    bad_tiles = CascadeTiles(tiles.prefix_blocks, tiles.members, tiles.tiles.long())
    with pytest.raises(ValueError, match="tiles"):
        cascade_decode_attention(query, case.k_cache, case.v_cache, case.seq_lens_tensor, case.block_tables,
                                 bad_tiles, 0.1, **kwargs)
    with pytest.raises(ValueError, match="block_m"):
        cascade_decode_attention(query, case.k_cache, case.v_cache, case.seq_lens_tensor, case.block_tables,
                                 tiles, 0.1, num_prefix_splits=1, config=CascadeConfig(8, 16, 4, 1))
    small = CascadeWorkspace.allocate(1, 4, 32, DEVICE)
    with pytest.raises(ValueError, match="cascade workspace"):
        cascade_decode_attention(query, case.k_cache, case.v_cache, case.seq_lens_tensor, case.block_tables,
                                 tiles, 0.1, workspace=small, **kwargs)


def test_choose_prefix_splits():
    assert choose_prefix_splits(256, 64, 8, 4096) == 9  # 4 tiles x 8 KV heads = 32 programs; 264 wanted
    assert choose_prefix_splits(2, 64, 8, 4096) == 16  # small batch: as many as allowed
    assert choose_prefix_splits(2, 64, 8, 300) == 1  # too short to split
    assert choose_prefix_splits(4096, 64, 8, 4096) == 1


def test_plain_decode_unchanged_without_cascade():
    """The decode kernel's cascade hooks change nothing when no cascade is given (rows with a prefix of 0)."""
    case = make_shared_case([None] * 3, [], [5, 33, 64], 2, 32, 16, torch.float32, seed=6)
    query = random_query(3, 4, 32, torch.float32, seed=6)
    out = paged_decode_attention(query, case.k_cache, case.v_cache, case.seq_lens_tensor, case.block_tables, 0.2,
                                 num_splits=2)
    ref = paged_attention_ref(query, case.k_cache, case.v_cache, [0, 1, 2, 3], case.seq_lens, case.block_tables, 0.2)
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)


# ---------------------------------------------------------------- GPU: realistic sizes, bfloat16, graphs

def shared_prompt_case(num_seqs: int, prefix_len: int, suffix_lens: list[int], num_kv_heads: int, head_dim: int,
                       block_size: int, dtype: torch.dtype, seed: int) -> SharedCase:
    """``num_seqs`` sequences on one ``prefix_len``-token prompt prefix (its whole blocks shared)."""
    shared = prefix_len // block_size
    lens = [prefix_len + suffix_lens[s % len(suffix_lens)] for s in range(num_seqs)]
    return make_shared_case([0] * num_seqs, [shared], lens, num_kv_heads, head_dim, block_size, dtype, seed)


@pytest.mark.gpu
@pytest.mark.parametrize("block_size,num_kv_heads,group,head_dim,dtype", [
    (256, 8, 2, 128, torch.bfloat16), (16, 8, 2, 128, torch.bfloat16), (256, 2, 8, 64, torch.bfloat16),
    (16, 4, 4, 128, torch.float32),
])
def test_cascade_gpu(block_size, num_kv_heads, group, head_dim, dtype):
    case = shared_prompt_case(96, 3000, [1, 17, 100, 256, 300], num_kv_heads, head_dim, block_size, dtype, seed=7)
    groups = detect(case, block_size)
    assert len(groups) == 1 and len(groups[0].members) == 96
    for prefix_splits, num_splits in ((1, 1), (9, 1), (16, 4)):
        out, ref = run_cascade(case, groups, num_kv_heads * group, dtype, prefix_splits=prefix_splits,
                               num_splits=num_splits, seed=num_splits)
        torch.testing.assert_close(out, ref, **tolerance(dtype))


@pytest.mark.gpu
def test_cascade_cuda_graph_replays_follow_new_groups():
    """A captured cascade step recomputes from its (rewritten) device inputs: a new grouping, fewer tiles
    (unused slots zeroed) and new queries give the reference result, never an earlier step's groups."""
    block_size, num_heads, head_dim = 16, 16, 128
    case = make_shared_case([0] * 6 + [1] * 6 + [None] * 4, [20, 9], [400] * 6 + [200] * 6 + [50, 60, 70, 80],
                            8, head_dim, block_size, torch.bfloat16, seed=8)
    cfg = default_cascade_config(2, head_dim, torch.bfloat16, 1 << 30)
    capacity = tiles_for([], 16, members_per_tile(2, cfg.block_m)).tiles.shape[0]
    static = CascadeTiles(torch.zeros(16, dtype=torch.int32, device=DEVICE),
                          torch.zeros(16, dtype=torch.int32, device=DEVICE),
                          torch.zeros(capacity, 3, dtype=torch.int32, device=DEVICE))
    query = random_query(16, num_heads, head_dim, torch.bfloat16, seed=8)
    out = torch.empty_like(query)
    workspace = CascadeWorkspace.allocate(16 * 4, num_heads, head_dim, DEVICE)
    seq_lens = case.seq_lens_tensor

    def step() -> None:
        cascade_decode_attention(query, case.k_cache, case.v_cache, seq_lens, case.block_tables,
                                 static, head_dim ** -0.5, num_prefix_splits=4, out=out, workspace=workspace)

    step()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    for seed, groups in enumerate([detect(case, block_size), [CascadeGroup(np.arange(6, 12), 9)], []]):
        new = tiles_for(groups, 16, members_per_tile(2, cfg.block_m))
        for mine, theirs in zip((static.prefix_blocks, static.members, static.tiles), (new.prefix_blocks,
                                                                                        new.members, new.tiles)):
            mine.copy_(theirs)
        query.copy_(random_query(16, num_heads, head_dim, torch.bfloat16, seed=seed + 10))
        out.fill_(float("nan"))
        graph.replay()
        ref = paged_attention_ref(query, case.k_cache, case.v_cache, list(range(17)), case.seq_lens,
                                  case.block_tables, head_dim ** -0.5)
        torch.testing.assert_close(out, ref, **tolerance(torch.bfloat16))
