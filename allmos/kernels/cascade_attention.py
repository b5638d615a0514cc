"""Triton cascade (shared-prefix) decode attention: the prefix kernel, and a decode step over it.

Design and thresholds: ``docs/cascade_attention.md``; the groups come from ``allmos.attention.cascade``.

Invariants of the prefix kernel (cache layout: ``allmos.attention.metadata``):
- One program owns (tile of one group's members, KV head, prefix key split). Its ``BLOCK_M`` query rows
  are member-major: row ``r`` is member ``r // GROUP_P2`` of the tile and query head
  ``kv_head * GROUP + r % GROUP_P2``, so each prefix K/V tile it loads feeds every member and every query
  head of the KV head (plain decode would load it once per member).
- A tile is a row of ``tiles`` [capacity, 3]: (leader sequence, first index into ``members``, member count).
  A count of 0 is an unused slot of the fixed grid: the program exits at once. The group's prefix is the
  first ``prefix_blocks[leader]`` blocks of the leader's block-table row (the same ids for every member).
- Split ``k`` of ``num_splits`` takes a contiguous run of the prefix's key tiles (``cdiv(tiles,
  num_splits)`` each; later splits may be empty) and writes its float32 output, normalized over its keys,
  and its log-sum-exp (base 2; -inf without keys) for every member and query head (layout:
  ``allmos.kernels.cascade_state``). The decode kernel merges them into the suffix's online softmax.
- The grid ``(capacity, num_kv_heads, num_splits)`` comes from host-known sizes, so a decode step with
  cascade can be captured in a CUDA graph; every input is read on the device.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from allmos.kernels.cascade_state import CascadePrefix
from allmos.kernels.decode_attention import (
    SHARED_MEMORY_MARGIN,
    DecodeConfig,
    DecodeWorkspace,
    attend_kv_tile,
    check_paged_kv_args,
    dot_precision,
    kv_tile_offsets,
    make_output,
    max_shared_memory,
    paged_decode_attention,
)

MAX_PREFIX_SPLITS = 16
MIN_PREFIX_TOKENS_PER_SPLIT = 256  # shorter runs spend more on their partials than on their keys
PREFIX_PROGRAMS_PER_SM = 2  # aim at two programs per SM when the batch is one group


@dataclass(frozen=True)
class CascadeConfig:
    """Launch parameters of the prefix kernel (tuning override; default: ``default_cascade_config``)."""

    block_m: int  # query rows per program: members x padded GQA group
    block_n: int  # key tokens per tile
    num_warps: int
    num_stages: int


@dataclass(frozen=True)
class CascadeTiles:
    """One step's grouping on the device (``AttentionMetadata``'s cascade fields)."""

    prefix_blocks: torch.Tensor  # [num_seqs] int32: leading blocks shared with the group (0: none)
    members: torch.Tensor  # [num_seqs] int32: sequence indices, grouped
    tiles: torch.Tensor  # [capacity, 3] int32: (leader, first member index, member count)


def cascade_block_m(group: int, head_dim: int) -> int:
    """Default query rows per program: 64 (32 at head_dim above 128), at least one padded GQA group."""
    return max(16, triton.next_power_of_2(group), 64 if head_dim <= 128 else 32)


def default_cascade_config(group: int, head_dim: int, dtype: torch.dtype, shared_memory: int) -> CascadeConfig:
    """``cascade_block_m`` query rows, key tiles of about 32 KiB per K (and per V), 4 warps, three stages
    where they fit. Measured on H200 (256 sequences on a 2,816-token prefix, 8 KV heads, head_dim 128,
    bf16; prefix plus suffix decode per layer): 64 x 128-token tiles x 4 warps x 3 stages took 131 us, the
    best of block_m 64/128, block_n 32/64/128, 4/8 warps, 2/3 stages, 4/9/16 splits; 128 x 64 x 8 warps
    took 190 us; plain decode over the same shared blocks 437 us."""
    block_m = cascade_block_m(group, head_dim)
    block_n = max(16, min(128, 32768 // (head_dim * dtype.itemsize)))
    stage_bytes = 2 * block_n * head_dim * dtype.itemsize
    q_bytes = block_m * head_dim * dtype.itemsize
    num_stages = 3 if q_bytes + 3 * stage_bytes + SHARED_MEMORY_MARGIN <= shared_memory else 2
    return CascadeConfig(block_m=block_m, block_n=block_n, num_warps=4, num_stages=num_stages)


def members_per_tile(group: int, block_m: int) -> int:
    """Sequences per prefix-kernel tile: ``block_m`` rows over the GQA group padded to a power of two. The
    tiles handed to the kernel must hold at most this many members for the ``block_m`` it runs with."""
    return block_m // triton.next_power_of_2(group)


def choose_prefix_splits(num_seqs: int, tile_members: int, num_kv_heads: int, max_seq_len: int,
                         num_sms: int = 132) -> int:
    """Prefix key splits for a batch of ``num_seqs`` (host-known, so fixed per CUDA graph): enough programs
    for ``PREFIX_PROGRAMS_PER_SM`` per SM when the whole batch is one group, each split keeping at least
    ``MIN_PREFIX_TOKENS_PER_SPLIT`` of the longest possible prefix, at most ``MAX_PREFIX_SPLITS``."""
    programs = -(-num_seqs // tile_members) * num_kv_heads
    by_wave = -(-PREFIX_PROGRAMS_PER_SM * num_sms // max(1, programs))
    by_length = max(1, max_seq_len // MIN_PREFIX_TOKENS_PER_SPLIT)
    return max(1, min(by_wave, by_length, MAX_PREFIX_SPLITS))


def prefix_workspace_rows(max_num_seqs: int, tile_members: int, num_kv_heads: int, max_seq_len: int,
                          num_sms: int = 132) -> int:
    """(sequence, split) pairs a workspace needs for every batch size up to ``max_num_seqs`` (per head)."""
    return max(n * choose_prefix_splits(n, tile_members, num_kv_heads, max_seq_len, num_sms)
               for n in range(1, max_num_seqs + 1))


@dataclass
class CascadeWorkspace:
    """Flat float32 buffers for the prefix partials of ``seq_splits`` (sequence, split) pairs x ``num_heads``
    rows (see ``prefix_workspace_rows``); preallocate one to capture cascade decode in a CUDA graph."""

    partial_out: torch.Tensor  # [seq_splits * num_heads * head_dim] float32
    lse: torch.Tensor  # [seq_splits * num_heads] float32

    @classmethod
    def allocate(cls, seq_splits: int, num_heads: int, head_dim: int, device: torch.device | str) -> CascadeWorkspace:
        rows = seq_splits * num_heads
        return cls(torch.empty(rows * head_dim, dtype=torch.float32, device=device),
                   torch.empty(rows, dtype=torch.float32, device=device))

    def view(self, prefix_blocks: torch.Tensor, query: torch.Tensor, num_splits: int) -> CascadePrefix:
        """The partials of a launch over ``query`` [num_seqs, num_heads, head_dim] with ``num_splits`` splits."""
        num_seqs, num_heads, head_dim = query.shape
        rows = num_seqs * num_heads * num_splits
        if rows > self.lse.numel() or rows * head_dim > self.partial_out.numel():
            raise ValueError(f"cascade workspace holds {self.lse.numel()} rows; {num_seqs} sequences x {num_heads} "
                             f"heads x {num_splits} splits need {rows}")
        part = self.partial_out[:rows * head_dim].view(num_seqs, num_heads, num_splits, head_dim)
        return CascadePrefix(prefix_blocks, part, self.lse[:rows].view(num_seqs, num_heads, num_splits), num_splits)


@triton.jit
def _cascade_prefix_kernel(
    q_ptr, k_cache_ptr, v_cache_ptr, block_tables_ptr, prefix_blocks_ptr, members_ptr, tiles_ptr, part_ptr, lse_ptr,
    scale_log2,
    stride_qs, stride_qh, stride_cb, stride_ct, stride_ch, stride_bt,
    GROUP: tl.constexpr, GROUP_P2: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    tile = tl.program_id(0)
    count = tl.load(tiles_ptr + tile * 3 + 2)
    if count == 0:  # an unused slot of the fixed grid
        return
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    num_splits = tl.num_programs(2)
    leader = tl.load(tiles_ptr + tile * 3)
    first = tl.load(tiles_ptr + tile * 3 + 1)
    prefix_len = tl.load(prefix_blocks_ptr + leader) * BLOCK_SIZE

    rows = tl.arange(0, BLOCK_M)
    dims = tl.arange(0, HEAD_DIM)
    member = rows // GROUP_P2  # [BLOCK_M] index within the tile
    heads = kv_head * GROUP + rows % GROUP_P2  # [BLOCK_M]
    row_valid = (member < count) & (rows % GROUP_P2 < GROUP)
    seqs = tl.load(members_ptr + first + member, mask=member < count, other=0).to(tl.int64)  # [BLOCK_M]
    q = tl.load(q_ptr + (seqs * stride_qs + heads * stride_qh)[:, None] + dims[None, :], mask=row_valid[:, None],
                other=0.0)  # [BLOCK_M, HEAD_DIM]

    num_tiles = tl.cdiv(prefix_len, BLOCK_N)
    tiles_per_split = tl.cdiv(num_tiles, num_splits)
    tile_lo = split * tiles_per_split
    tile_hi = tl.minimum(tile_lo + tiles_per_split, num_tiles)
    full_hi = tl.maximum(tl.minimum(tile_hi, prefix_len // BLOCK_N), tile_lo)  # tiles with no padding
    table = block_tables_ptr + leader.to(tl.int64) * stride_bt
    head_offset = kv_head * stride_ch

    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], -1.0e30, dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    for kv_tile in range(tile_lo, full_hi):
        offsets = kv_tile_offsets(table, kv_tile * BLOCK_N, prefix_len, stride_cb, stride_ct, BLOCK_SIZE, BLOCK_N,
                                  False)
        acc, m_i, l_i = attend_kv_tile(q, acc, m_i, l_i, k_cache_ptr, v_cache_ptr, offsets + head_offset, dims,
                                       row_valid, row_valid, scale_log2, False, DOT_PRECISION)
    for kv_tile in range(full_hi, tile_hi):  # at most one partial tile (BLOCK_N > BLOCK_SIZE only)
        kv_valid = kv_tile * BLOCK_N + tl.arange(0, BLOCK_N) < prefix_len  # [BLOCK_N]
        offsets = kv_tile_offsets(table, kv_tile * BLOCK_N, prefix_len, stride_cb, stride_ct, BLOCK_SIZE, BLOCK_N,
                                  True)
        acc, m_i, l_i = attend_kv_tile(q, acc, m_i, l_i, k_cache_ptr, v_cache_ptr, offsets + head_offset, dims,
                                       kv_valid, kv_valid[None, :] & row_valid[:, None], scale_log2, True,
                                       DOT_PRECISION)

    l_safe = tl.where(l_i > 0.0, l_i, 1.0)
    out_rows = (seqs * (tl.num_programs(1) * GROUP) + heads) * num_splits + split  # [BLOCK_M]
    tl.store(part_ptr + out_rows[:, None] * HEAD_DIM + dims[None, :], acc / l_safe[:, None], mask=row_valid[:, None])
    tl.store(lse_ptr + out_rows, tl.where(l_i > 0.0, m_i + tl.log2(l_safe), float("-inf")), mask=row_valid)


def _check_tiles(query: torch.Tensor, groups: CascadeTiles, config: CascadeConfig, group: int) -> None:
    num_seqs = query.shape[0]
    for name in ("prefix_blocks", "members"):
        t = getattr(groups, name)
        if t.shape != (num_seqs,) or t.dtype != torch.int32:
            raise ValueError(f"cascade {name} must be int32 [{num_seqs}], got {t.dtype} {tuple(t.shape)}")
    tiles = groups.tiles
    if tiles.dim() != 2 or tiles.shape[1] != 3 or tiles.dtype != torch.int32 or not tiles.is_contiguous():
        raise ValueError(f"cascade tiles must be contiguous int32 [capacity, 3], got {tiles.dtype} "
                         f"{tuple(tiles.shape)}")
    if config.block_m % triton.next_power_of_2(group) or config.block_m < 16:
        raise ValueError(f"cascade block_m ({config.block_m}) must be >= 16 and a multiple of the padded GQA "
                         f"group ({triton.next_power_of_2(group)})")


def cascade_prefix_attention(
    query: torch.Tensor,  # [num_seqs, num_heads, head_dim]
    k_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    v_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    block_tables: torch.Tensor,  # [num_seqs, max_blocks_per_seq] int32
    groups: CascadeTiles,
    scale: float,
    *,
    num_splits: int,
    workspace: CascadeWorkspace | None = None,
    config: CascadeConfig | None = None,
) -> CascadePrefix:
    """Attention of every grouped sequence's query over its group's shared prefix blocks, in ``num_splits``
    key splits: float32 partials and log-sum-exps for ``paged_decode_attention(cascade=...)``. Rows of
    sequences outside every group are left unwritten (the decode kernel never reads them)."""
    check_paged_kv_args(query, k_cache, v_cache, block_tables)
    num_seqs, num_heads, head_dim = query.shape
    block_size, num_kv_heads = k_cache.shape[1], k_cache.shape[2]
    group = num_heads // num_kv_heads
    cfg = config or default_cascade_config(group, head_dim, query.dtype, max_shared_memory(query.device))
    _check_tiles(query, groups, cfg, group)
    if not 1 <= num_splits <= 65535:
        raise ValueError(f"num_splits must be in [1, 65535], got {num_splits}")
    if workspace is None:
        workspace = CascadeWorkspace.allocate(num_seqs * num_splits, num_heads, head_dim, query.device)
    prefix = workspace.view(groups.prefix_blocks, query, num_splits)
    if num_seqs == 0 or groups.tiles.shape[0] == 0:
        return prefix
    _cascade_prefix_kernel[(groups.tiles.shape[0], num_kv_heads, num_splits)](
        query, k_cache, v_cache, block_tables, groups.prefix_blocks, groups.members, groups.tiles,
        prefix.partial_out, prefix.lse, scale * 1.4426950408889634,
        query.stride(0), query.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        block_tables.stride(0),
        GROUP=group, GROUP_P2=triton.next_power_of_2(group), HEAD_DIM=head_dim, BLOCK_SIZE=block_size,
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, DOT_PRECISION=dot_precision(query.dtype),
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    return prefix


def cascade_decode_attention(
    query: torch.Tensor,  # [num_seqs, num_heads, head_dim]
    k_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    v_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    seq_lens: torch.Tensor,  # [num_seqs] int32, includes the new token
    block_tables: torch.Tensor,  # [num_seqs, max_blocks_per_seq] int32
    groups: CascadeTiles,
    scale: float,
    *,
    num_prefix_splits: int,
    num_splits: int = 1,
    out: torch.Tensor | None = None,  # [num_seqs, num_heads, head_dim]
    workspace: CascadeWorkspace | None = None,
    decode_workspace: DecodeWorkspace | None = None,
    config: CascadeConfig | None = None,
    decode_config: DecodeConfig | None = None,
    fold_merge: bool = False,
) -> torch.Tensor:  # [num_seqs, num_heads, head_dim]
    """``paged_decode_attention`` (same result, same arguments) with each group's shared prefix attended
    once for all its members: the prefix kernel, then the decode kernel over each sequence's suffix, which
    merges the prefix partials. ``num_splits`` and ``fold_merge`` apply to the suffix as in plain decode."""
    out = make_output(out, query)
    prefix = cascade_prefix_attention(query, k_cache, v_cache, block_tables, groups, scale,
                                      num_splits=num_prefix_splits, workspace=workspace, config=config)
    return paged_decode_attention(query, k_cache, v_cache, seq_lens, block_tables, scale, num_splits=num_splits,
                                  out=out, workspace=decode_workspace, config=decode_config, fold_merge=fold_merge,
                                  cascade=prefix)
