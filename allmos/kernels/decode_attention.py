"""Triton paged decode attention: one new query token per sequence, all keys read from the paged cache.

Invariants (cache layout and causal offset: see ``allmos.attention.metadata``):
- One program owns one (sequence, KV head, split): the ``group = num_heads // num_kv_heads`` query heads
  that share the KV head are the rows of one ``tl.dot`` tile (padded to at least 16 rows), so every byte
  of K/V is read from memory exactly once.
- Keys are visited in tiles of ``BLOCK_N`` tokens. A tile never straddles a page boundary unevenly: if
  ``BLOCK_N <= block_size`` it lies inside one page (one block-table load per tile), otherwise it covers
  ``BLOCK_N // block_size`` whole pages (one vector load gathers each token's block id; block_size 16
  with 64-token tiles ran as fast as 256-token pages on H100).
- With ``num_splits > 1`` split ``k`` handles a contiguous run of tiles and writes a float32 partial output
  plus its log-sum-exp (base 2) to a ``DecodeWorkspace``; a second kernel merges the splits, or, with
  ``fold_merge``, the last split of each (sequence, KV head) to finish merges them itself: each split
  counts its arrival on that pair's semaphore (an atomic add, acquire-release, after a barrier that
  orders all of the program's partial stores before it); the one that sees ``num_splits - 1`` reads the
  partials back from L2 and resets the semaphore to 0 for the next launch. One launch instead of two.
- No host synchronization: grids come from host-known sizes, so the launches can be captured in a CUDA
  graph (preallocate the workspace for that).
- An fp8 cache (``KV_FP8``) is read as ``element * scale`` (``allmos.attention.torch_ref``): tiles are
  converted to the query dtype (exact: every e4m3 value is a 16-bit float) and the scales are applied once,
  ``k_scale`` to the score scale and ``v_scale`` to the output, both read from device memory. With a 16-bit
  query the dots run in float16 (``Q_FP16``, see ``fp16_dots``): e4m3 converts to float16 in one instruction
  per pair, to bfloat16 only through float32.

``kv_tile_offsets`` and ``attend_kv_tile`` are the shared tile primitives, reused by the prefill kernel.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from allmos.attention.torch_ref import FP8_KV_DTYPE, KVScales
from allmos.kernels.cascade_state import CascadePrefix, cascade_launch_args, cascade_prefix_state
from allmos.kernels.pdl import pdl_enter, pdl_kwargs
from allmos.kernels.store_kv import check_kv_scales, kv_scale_args

MAX_NUM_SPLITS = 16
MIN_TOKENS_PER_SPLIT = 64  # one default tile at head_dim 128
PROGRAMS_PER_SM = 2
SPLIT_TARGET_WAVES = 1.0  # see choose_num_splits
SHARED_MEMORY_MARGIN = 16 * 1024  # query tile and compiler scratch


@dataclass(frozen=True)
class DecodeConfig:
    """Launch parameters of the decode kernel (tuning override; default: ``default_decode_config``)."""

    block_n: int  # key tokens per tile
    num_warps: int
    num_stages: int


@dataclass
class DecodeWorkspace:
    """Scratch buffers of split decode; preallocate one (max sizes) to capture the call in a CUDA graph."""

    partial_out: torch.Tensor  # [max_num_seqs, num_heads, max_num_splits, head_dim] float32
    lse: torch.Tensor  # [max_num_seqs, num_heads, max_num_splits] float32, log2 of the softmax denominator
    # [max_num_seqs, num_kv_heads] int32, all 0 between launches: arrivals of the splits (fold_merge only)
    semaphores: torch.Tensor | None = None

    @classmethod
    def allocate(
        cls, max_num_seqs: int, num_heads: int, head_dim: int, max_num_splits: int, device: torch.device | str,
        num_kv_heads: int | None = None,
    ) -> DecodeWorkspace:
        """Buffers for calls up to the given sizes; with ``num_kv_heads``, also the semaphores of
        ``fold_merge`` (zeroed once here; each launch leaves them at zero)."""
        partial_out = torch.empty(
            max_num_seqs, num_heads, max_num_splits, head_dim, dtype=torch.float32, device=device
        )
        lse = torch.empty(max_num_seqs, num_heads, max_num_splits, dtype=torch.float32, device=device)
        semaphores = None
        if num_kv_heads is not None:
            semaphores = torch.zeros(max_num_seqs, num_kv_heads, dtype=torch.int32, device=device)
        return cls(partial_out, lse, semaphores)

    def check_semaphores(self, num_seqs: int, num_kv_heads: int) -> None:
        """Raise ValueError unless this workspace has semaphores for ``fold_merge`` at these sizes."""
        sem = self.semaphores
        if sem is None or sem.dtype != torch.int32 or sem.shape[0] < num_seqs or sem.shape[1] != num_kv_heads \
                or sem.stride(1) != 1:
            raise ValueError(f"fold_merge needs workspace.semaphores int32 [>= {num_seqs}, {num_kv_heads}] "
                             "(DecodeWorkspace.allocate(..., num_kv_heads=...))")

    def check_fits(self, num_seqs: int, num_heads: int, head_dim: int, num_splits: int) -> None:
        """Raise ValueError unless this workspace can hold a call of the given sizes."""
        s, h, k, d = self.partial_out.shape
        if s < num_seqs or h != num_heads or k < num_splits or d != head_dim:
            raise ValueError(
                f"workspace partial_out {tuple(self.partial_out.shape)} does not fit num_seqs={num_seqs}, "
                f"num_heads={num_heads}, num_splits={num_splits}, head_dim={head_dim}"
            )
        if self.lse.shape != (s, h, k) or {self.partial_out.dtype, self.lse.dtype} != {torch.float32}:
            raise ValueError("workspace lse must be [max_num_seqs, num_heads, max_num_splits], both float32")


@triton.jit
def kv_tile_offsets(
    block_table_ptr, start, limit, stride_cb, stride_ct,
    BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr, MASKED: tl.constexpr,
):
    """Cache offsets (int64, [BLOCK_N]) of tokens ``start .. start + BLOCK_N - 1`` of one sequence.

    ``start`` is a multiple of ``BLOCK_N``; ``start < limit``. Tokens at or past ``limit`` get the offsets of
    block 0 when ``MASKED`` (their page may be unallocated: its block-table entry is never read).
    """
    tokens = start + tl.arange(0, BLOCK_N)
    if BLOCK_N <= BLOCK_SIZE:
        block = tl.load(block_table_ptr + start // BLOCK_SIZE).to(tl.int64)
        offsets = block * stride_cb + ((start % BLOCK_SIZE) + tl.arange(0, BLOCK_N)) * stride_ct
    else:
        if MASKED:
            blocks = tl.load(block_table_ptr + tokens // BLOCK_SIZE, mask=tokens < limit, other=0)
        else:
            blocks = tl.load(block_table_ptr + tokens // BLOCK_SIZE)
        offsets = blocks.to(tl.int64) * stride_cb + (tokens % BLOCK_SIZE) * stride_ct
    return offsets


@triton.jit
def query_for_dots(q, Q_FP16: tl.constexpr):
    """The query tile as the dots take it: float16 (saturated) when ``Q_FP16``, else unchanged."""
    if Q_FP16:
        q = tl.clamp(q.to(tl.float32), -65504.0, 65504.0).to(tl.float16)
    return q


def fp16_dots(query: torch.Tensor, kv_fp8: bool) -> bool:
    """Whether attention over an fp8 cache runs its dots in float16: for 16-bit queries (bfloat16 ones lose
    nothing that matters: 3 more mantissa bits, range up to 65504); float32 queries (the CPU oracle) keep
    float32."""
    return kv_fp8 and query.dtype in (torch.bfloat16, torch.float16)


@triton.jit
def attend_kv_tile(
    q, acc, m_i, l_i, k_cache_ptr, v_cache_ptr, kv_offsets, dims, kv_valid, score_mask, scale_log2,
    MASKED: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """One online-softmax step (base 2, float32) of query rows ``q`` over one key tile.

    q [M, D]; acc [M, D] fp32; m_i, l_i [M] fp32; kv_offsets [N] (head offset included); dims [D];
    kv_valid [N] and score_mask [M, N] are only used when ``MASKED``. Returns (acc, m_i, l_i).
    """
    ptrs = kv_offsets[:, None] + dims[None, :]  # [N, D]
    if MASKED:
        k = tl.load(k_cache_ptr + ptrs, mask=kv_valid[:, None], other=0.0)
        v = tl.load(v_cache_ptr + ptrs, mask=kv_valid[:, None], other=0.0)
    else:
        k = tl.load(k_cache_ptr + ptrs)
        v = tl.load(v_cache_ptr + ptrs)
    k, v = k.to(q.dtype), v.to(q.dtype)  # fp8 caches (unscaled; see the module docstring); else no-ops
    return online_softmax_step(q, k, v, acc, m_i, l_i, score_mask, scale_log2, MASKED, DOT_PRECISION)


@triton.jit
def online_softmax_step(
    q, k, v, acc, m_i, l_i, score_mask, scale_log2, MASKED: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """The online-softmax update of ``attend_kv_tile`` for a loaded tile: q [M, D], k and v [N, D] in the
    dots' dtype, score_mask [M, N] (used when ``MASKED``). Returns (acc, m_i, l_i); ``m_i`` is in scaled
    (base-2) units. The scale enters through the row maximum and one fused multiply-add per score, and the
    PV dot accumulates into the rescaled ``acc`` (no separate add of a second [M, D] tile)."""
    s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)  # [M, N], unscaled
    if MASKED:
        s = tl.where(score_mask, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1) * scale_log2)
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(s * scale_log2 - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=DOT_PRECISION)
    return acc, m_new, l_i


@triton.jit
def _decode_kernel(
    q_ptr, k_cache_ptr, v_cache_ptr, seq_lens_ptr, block_tables_ptr, out_ptr, part_ptr, lse_ptr, sem_ptr,
    k_scale_ptr, v_scale_ptr, scale_log2, num_splits, cascade_blocks_ptr, cascade_part_ptr, cascade_lse_ptr,
    cascade_splits,
    stride_qs, stride_qh, stride_cb, stride_ct, stride_ch, stride_bt,
    stride_os, stride_oh, stride_ps, stride_ph, stride_pk, stride_ls, stride_lh, stride_lk, stride_ss,
    GROUP: tl.constexpr, GROUP_P: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr,
    BLOCK_N: tl.constexpr, SPLIT: tl.constexpr, FOLD_MERGE: tl.constexpr, SPLITS_P2: tl.constexpr,
    DOT_PRECISION: tl.constexpr, CASCADE: tl.constexpr, KV_FP8: tl.constexpr, Q_FP16: tl.constexpr,
    PDL: tl.constexpr,
):
    pdl_enter(PDL)  # allmos.kernels.pdl: the next kernel may start; the last one must be done
    seq = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    skip = tl.load(cascade_blocks_ptr + seq) if CASCADE else 0  # leading blocks done by the cascade prefix
    seq_len = tl.load(seq_lens_ptr + seq) - skip * BLOCK_SIZE
    if KV_FP8:
        scale_log2 = scale_log2 * tl.load(k_scale_ptr)
    rows = tl.arange(0, GROUP_P)
    dims = tl.arange(0, HEAD_DIM)
    heads = kv_head * GROUP + rows  # [GROUP_P]
    row_valid = rows < GROUP
    q_ptrs = q_ptr + seq.to(tl.int64) * stride_qs + heads[:, None] * stride_qh + dims[None, :]
    q = tl.load(q_ptrs, mask=row_valid[:, None], other=0.0)  # [GROUP_P, HEAD_DIM]
    q = query_for_dots(q, Q_FP16)

    num_tiles = tl.cdiv(seq_len, BLOCK_N)
    tiles_per_split = tl.cdiv(num_tiles, num_splits)
    tile_lo = split * tiles_per_split
    tile_hi = tl.minimum(tile_lo + tiles_per_split, num_tiles)
    full_hi = tl.maximum(tl.minimum(tile_hi, seq_len // BLOCK_N), tile_lo)  # tiles with no padding
    table = block_tables_ptr + seq.to(tl.int64) * stride_bt + skip
    head_offset = kv_head * stride_ch

    acc, m_i, l_i = cascade_prefix_state(cascade_part_ptr, cascade_lse_ptr, seq, split, skip, heads, row_valid,
                                         cascade_splits, GROUP, GROUP_P, HEAD_DIM, CASCADE)  # empty unless CASCADE
    for tile in range(tile_lo, full_hi):
        start = tile * BLOCK_N
        offsets = kv_tile_offsets(table, start, seq_len, stride_cb, stride_ct, BLOCK_SIZE, BLOCK_N, False)
        acc, m_i, l_i = attend_kv_tile(
            q, acc, m_i, l_i, k_cache_ptr, v_cache_ptr, offsets + head_offset, dims, row_valid, row_valid,
            scale_log2, False, DOT_PRECISION,
        )
    for tile in range(full_hi, tile_hi):  # at most one partial tile: the sequence's last
        start = tile * BLOCK_N
        kv_valid = start + tl.arange(0, BLOCK_N) < seq_len  # [BLOCK_N]
        offsets = kv_tile_offsets(table, start, seq_len, stride_cb, stride_ct, BLOCK_SIZE, BLOCK_N, True)
        acc, m_i, l_i = attend_kv_tile(
            q, acc, m_i, l_i, k_cache_ptr, v_cache_ptr, offsets + head_offset, dims, kv_valid,
            kv_valid[None, :] & row_valid[:, None], scale_log2, True, DOT_PRECISION,
        )

    l_safe = tl.where(l_i > 0.0, l_i, 1.0)
    o = acc / l_safe[:, None]  # [GROUP_P, HEAD_DIM]
    if KV_FP8:
        o = o * tl.load(v_scale_ptr)
    _write_decode_result(o, m_i, l_i, l_safe, seq.to(tl.int64), kv_head, split, num_splits, heads, row_valid, dims,
                         out_ptr, part_ptr, lse_ptr, sem_ptr, stride_os, stride_oh, stride_ps, stride_ph, stride_pk,
                         stride_ls, stride_lh, stride_lk, stride_ss, GROUP, HEAD_DIM, SPLIT, FOLD_MERGE, SPLITS_P2)


@triton.jit
def _write_decode_result(
    o, m_i, l_i, l_safe, seq, kv_head, split, num_splits, heads, row_valid, dims,
    out_ptr, part_ptr, lse_ptr, sem_ptr, stride_os, stride_oh, stride_ps, stride_ph, stride_pk,
    stride_ls, stride_lh, stride_lk, stride_ss,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, SPLIT: tl.constexpr, FOLD_MERGE: tl.constexpr,
    SPLITS_P2: tl.constexpr,
):
    """One program's result: the output rows, or (``SPLIT``) its partial output and log-sum-exp, merged by
    the last split to arrive when ``FOLD_MERGE``."""
    if SPLIT:
        part_ptrs = part_ptr + seq * stride_ps + heads[:, None] * stride_ph + split * stride_pk + dims[None, :]
        tl.store(part_ptrs, o, mask=row_valid[:, None])
        lse = tl.where(l_i > 0.0, m_i + tl.log2(l_safe), float("-inf"))
        lse_ptrs = lse_ptr + seq * stride_ls + heads * stride_lh + split * stride_lk
        tl.store(lse_ptrs, lse, mask=row_valid)
        if FOLD_MERGE:
            tl.debug_barrier()  # all of this program's partial stores precede its arrival
            counter = sem_ptr + seq * stride_ss + kv_head
            arrived = tl.atomic_add(counter, 1, sem="acq_rel", scope="gpu")  # one atomic per program
            if arrived == num_splits - 1:  # the last split of this (sequence, KV head): merge, then reset
                tl.atomic_xchg(counter, 0, sem="relaxed", scope="gpu")
                for r in tl.static_range(GROUP):
                    _merge_head(part_ptr, lse_ptr, out_ptr, seq, kv_head * GROUP + r, num_splits,
                                stride_ps, stride_ph, stride_pk, stride_ls, stride_lh, stride_lk, stride_os,
                                stride_oh, HEAD_DIM, SPLITS_P2)
    else:
        out_ptrs = out_ptr + seq * stride_os + heads[:, None] * stride_oh + dims[None, :]
        tl.store(out_ptrs, o.to(out_ptr.dtype.element_ty), mask=row_valid[:, None])


@triton.jit
def _merge_head(
    part_ptr, lse_ptr, out_ptr, seq, head, num_splits,
    stride_ps, stride_ph, stride_pk, stride_ls, stride_lh, stride_lk, stride_os, stride_oh,
    HEAD_DIM: tl.constexpr, SPLITS_P2: tl.constexpr,
):
    """Merge one (sequence, query head)'s split partials into ``out``. Loads bypass L1 (``.cg``): with
    ``fold_merge`` other programs of the same launch wrote the partials."""
    splits = tl.arange(0, SPLITS_P2)
    dims = tl.arange(0, HEAD_DIM)
    split_valid = splits < num_splits
    lse_ptrs = lse_ptr + seq * stride_ls + head * stride_lh + splits * stride_lk
    lse = tl.load(lse_ptrs, mask=split_valid, other=float("-inf"), cache_modifier=".cg")
    m = tl.max(lse, 0)
    m = tl.where(m == float("-inf"), 0.0, m)
    weights = tl.exp2(lse - m)  # [SPLITS_P2]; empty splits weigh 0
    part_ptrs = part_ptr + seq * stride_ps + head * stride_ph + splits[:, None] * stride_pk + dims[None, :]
    parts = tl.load(part_ptrs, mask=split_valid[:, None], other=0.0, cache_modifier=".cg")  # [SPLITS_P2, HEAD_DIM]
    total = tl.sum(weights, 0)
    o = tl.sum(parts * weights[:, None], 0) / tl.where(total > 0.0, total, 1.0)
    tl.store(out_ptr + seq * stride_os + head * stride_oh + dims, o.to(out_ptr.dtype.element_ty))


@triton.jit
def _merge_splits_kernel(
    part_ptr, lse_ptr, out_ptr, num_splits,
    stride_ps, stride_ph, stride_pk, stride_ls, stride_lh, stride_lk, stride_os, stride_oh,
    HEAD_DIM: tl.constexpr, SPLITS_P2: tl.constexpr, PDL: tl.constexpr,
):
    pdl_enter(PDL)
    _merge_head(part_ptr, lse_ptr, out_ptr, tl.program_id(0).to(tl.int64), tl.program_id(1), num_splits,
                stride_ps, stride_ph, stride_pk, stride_ls, stride_lh, stride_lk, stride_os, stride_oh,
                HEAD_DIM, SPLITS_P2)


def max_shared_memory(device: torch.device) -> int:
    """Bytes of shared memory one program may use on ``device`` (unbounded for the CPU interpreter)."""
    if device.type != "cuda":
        return 1 << 30
    return _cuda_shared_memory(device.index if device.index is not None else torch.cuda.current_device())


@functools.cache
def _cuda_shared_memory(index: int) -> int:
    optin = getattr(torch.cuda.get_device_properties(index), "shared_memory_per_block_optin", 0)
    if optin:
        return int(optin)
    return int(triton.runtime.driver.active.utils.get_device_properties(index)["max_shared_mem"])


def default_decode_config(head_dim: int, dtype: torch.dtype, shared_memory: int) -> DecodeConfig:
    """Tiles of about 16 KiB per K (and per V): 64 tokens at head_dim 128 in 16-bit, 128 in fp8 (``dtype`` is
    the cache's); 3 stages where they fit.

    Measured on H100 (batch 256, context 1024, block_size 256 and 16): 64 x 4 warps x 3 stages reaches
    about 97% of copy bandwidth; 128-token tiles are as fast, 32-token tiles about 5% slower.
    """
    element_size = dtype.itemsize
    block_n = max(16, min(128, 16384 // (head_dim * element_size)))
    stage_bytes = 2 * block_n * head_dim * element_size  # one K and one V tile
    num_stages = 3 if 3 * stage_bytes + SHARED_MEMORY_MARGIN <= shared_memory else 2
    return DecodeConfig(block_n=block_n, num_warps=4, num_stages=num_stages)


def choose_num_splits(num_seqs: int, num_kv_heads: int, max_seq_len: int, num_sms: int = 132,
                      waves: float | None = None) -> int:
    """How many key splits to use: split only when the (seq, KV head) grid is below ``waves`` waves.

    A wave is ``PROGRAMS_PER_SM`` programs per SM (two fit at once); a split grid aims at ``waves`` of
    them, each split keeps at least ``MIN_TOKENS_PER_SPLIT`` keys, and there are at most
    ``MAX_NUM_SPLITS``. With one wave (the default, ``SPLIT_TARGET_WAVES``), on H100 (132 SMs, 8 KV
    heads, CUDA-graph replays, all sequences of one length) this was within about 5% of the best split
    count from 1 to 16 for batches 1 to 64 and contexts 1k to 16k; on the standard workload 1, 2, 4 and 8
    waves gave the same throughput (``benchmarks/sweep_decode_splits.py``).
    """
    waves = SPLIT_TARGET_WAVES if waves is None else waves
    programs = num_seqs * num_kv_heads
    target = max(1, int(waves * PROGRAMS_PER_SM * num_sms))
    if programs <= 0 or 2 * programs > target:
        return 1
    by_wave = triton.cdiv(target, programs)
    by_length = max(1, max_seq_len // MIN_TOKENS_PER_SPLIT)
    return max(1, min(by_wave, by_length, MAX_NUM_SPLITS))


def _check_decode_args(query, k_cache, v_cache, seq_lens, block_tables, num_splits) -> None:
    if query.dim() != 3:
        raise ValueError(f"query must be [num_seqs, num_heads, head_dim], got {tuple(query.shape)}")
    check_paged_kv_args(query, k_cache, v_cache, block_tables)
    if seq_lens.shape != (query.shape[0],) or block_tables.shape[0] != query.shape[0]:
        raise ValueError(
            f"seq_lens {tuple(seq_lens.shape)} / block_tables {tuple(block_tables.shape)} must have "
            f"num_seqs={query.shape[0]} rows"
        )
    if not 1 <= num_splits <= 65535:
        raise ValueError(f"num_splits must be in [1, 65535], got {num_splits}")


def check_paged_kv_args(query, k_cache, v_cache, block_tables) -> None:
    """Check shapes of the decode and prefill kernels (host-side only, no synchronizing)."""
    if k_cache.dim() != 4 or v_cache.shape != k_cache.shape or v_cache.stride() != k_cache.stride():
        raise ValueError("k_cache/v_cache must share shape and strides [blocks, block_size, kv_heads, dim]")
    num_heads, head_dim = query.shape[1], query.shape[2]
    block_size, num_kv_heads = k_cache.shape[1], k_cache.shape[2]
    if k_cache.shape[3] != head_dim:
        raise ValueError(f"k_cache head_dim {k_cache.shape[3]} != query head_dim {head_dim}")
    if num_heads % num_kv_heads:
        raise ValueError(f"num_heads ({num_heads}) must be a multiple of num_kv_heads ({num_kv_heads})")
    if head_dim < 16 or head_dim & (head_dim - 1) or block_size & (block_size - 1):
        raise ValueError(f"head_dim ({head_dim}, >= 16) and block_size ({block_size}) must be powers of two")
    if k_cache.dtype not in (query.dtype, FP8_KV_DTYPE):
        raise ValueError(f"k_cache dtype {k_cache.dtype} must be the query's ({query.dtype}) or {FP8_KV_DTYPE}")
    if query.stride(-1) != 1 or k_cache.stride(-1) != 1:
        raise ValueError("query and k_cache/v_cache need a contiguous last (head_dim) dimension")
    if block_tables.dim() != 2 or block_tables.stride(-1) != 1:
        raise ValueError("block_tables must be a 2-D tensor [num_seqs, max_blocks_per_seq], row-contiguous")


def make_output(out: torch.Tensor | None, query: torch.Tensor) -> torch.Tensor:
    """``out`` checked against ``query`` (same shape and dtype, contiguous head_dim), or a new one."""
    if out is None:
        return torch.empty_like(query)
    if out.shape != query.shape or out.dtype != query.dtype or out.stride(-1) != 1:
        raise ValueError(f"out must match query {tuple(query.shape)} {query.dtype} with contiguous head_dim")
    return out


def dot_precision(dtype: torch.dtype) -> str:
    """Exact float32 products for float32 inputs (tests); the default elsewhere."""
    return "ieee" if dtype == torch.float32 else "tf32"


def _split_buffers(workspace: DecodeWorkspace | None, out: torch.Tensor, seq_lens: torch.Tensor, num_splits: int,
                   fold: bool, num_kv_heads: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The kernel's (partial_out, lse, semaphores): the workspace's for split decode (one is allocated when
    none is given), else stand-ins the kernel never reads."""
    if num_splits == 1:
        return out, out, seq_lens
    num_seqs, num_heads, head_dim = out.shape
    if workspace is None:
        workspace = DecodeWorkspace.allocate(num_seqs, num_heads, head_dim, num_splits, out.device,
                                             num_kv_heads=num_kv_heads if fold else None)
    workspace.check_fits(num_seqs, num_heads, head_dim, num_splits)
    if fold:
        workspace.check_semaphores(num_seqs, num_kv_heads)
    return workspace.partial_out, workspace.lse, workspace.semaphores if fold else seq_lens


def paged_decode_attention(
    query: torch.Tensor,  # [num_seqs, num_heads, head_dim]
    k_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    v_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    seq_lens: torch.Tensor,  # [num_seqs] int32, includes the new token
    block_tables: torch.Tensor,  # [num_seqs, max_blocks_per_seq] int32
    scale: float,
    *,
    num_splits: int = 1,
    out: torch.Tensor | None = None,  # [num_seqs, num_heads, head_dim]
    workspace: DecodeWorkspace | None = None,
    config: DecodeConfig | None = None,
    fold_merge: bool = False,
    cascade: CascadePrefix | None = None,
    kv_scales: KVScales | None = None,  # fp8 caches only (None: scales 1.0)
) -> torch.Tensor:  # [num_seqs, num_heads, head_dim]
    """Attention of each sequence's single new query over its ``seq_lens[s]`` cached keys.

    The new token's K/V must already be in the cache. ``num_splits > 1`` splits every sequence's keys
    into that many contiguous runs (see ``choose_num_splits``) and needs a workspace; one is allocated
    when none is given. ``fold_merge`` merges the splits inside the one launch (the workspace then needs
    semaphores). A sequence with ``seq_lens == 0`` (a padded graph row) gets zeros. With ``cascade``, the
    keys of each sequence's shared prefix blocks come from the prefix partials (``allmos.kernels.cascade_state``).
    The cache is in the query's dtype or float8_e4m3fn (read through ``kv_scales``); cascade needs the former.
    """
    _check_decode_args(query, k_cache, v_cache, seq_lens, block_tables, num_splits)
    check_kv_scales(k_cache, v_cache, kv_scales)
    if cascade is not None and k_cache.dtype == FP8_KV_DTYPE:
        raise ValueError("cascade decode attention does not read fp8 KV caches (kv_cache_dtype='fp8')")
    num_seqs, num_heads, head_dim = query.shape
    block_size, num_kv_heads = k_cache.shape[1], k_cache.shape[2]
    out = make_output(out, query)
    if num_seqs == 0:
        return out
    k_scale, v_scale, _, kv_fp8 = kv_scale_args(k_cache, kv_scales)
    cfg = config or default_decode_config(head_dim, k_cache.dtype, max_shared_memory(query.device))
    split = num_splits > 1
    fold = split and fold_merge
    part, lse, sem = _split_buffers(workspace, out, seq_lens, num_splits, fold, num_kv_heads)
    group = num_heads // num_kv_heads
    _decode_kernel[(num_seqs, num_kv_heads, num_splits)](
        query, k_cache, v_cache, seq_lens, block_tables, out, part, lse, sem,
        k_scale, v_scale, scale * 1.4426950408889634, num_splits, *cascade_launch_args(cascade, query, seq_lens),
        query.stride(0), query.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        block_tables.stride(0),
        out.stride(0), out.stride(1), part.stride(0), part.stride(1), part.stride(2),
        lse.stride(0), lse.stride(1), lse.stride(2), sem.stride(0),
        GROUP=group, GROUP_P=max(16, triton.next_power_of_2(group)), HEAD_DIM=head_dim, BLOCK_SIZE=block_size,
        BLOCK_N=cfg.block_n, SPLIT=split, FOLD_MERGE=fold, SPLITS_P2=triton.next_power_of_2(num_splits) if fold else 1,
        DOT_PRECISION=dot_precision(query.dtype), num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        CASCADE=cascade is not None, KV_FP8=kv_fp8, Q_FP16=fp16_dots(query, kv_fp8),
        **pdl_kwargs(query.device),
    )
    if split and not fold:
        _merge_splits(part, lse, out, num_splits)
    return out


def _merge_splits(part: torch.Tensor, lse: torch.Tensor, out: torch.Tensor, num_splits: int) -> None:
    """Combine the splits' partial outputs ``part`` by their log-sum-exps ``lse`` into ``out``."""
    num_seqs, num_heads, head_dim = out.shape
    _merge_splits_kernel[(num_seqs, num_heads)](
        part, lse, out, num_splits,
        part.stride(0), part.stride(1), part.stride(2), lse.stride(0), lse.stride(1), lse.stride(2),
        out.stride(0), out.stride(1),
        HEAD_DIM=head_dim, SPLITS_P2=triton.next_power_of_2(num_splits), num_warps=4, **pdl_kwargs(out.device),
    )
