"""Triton paged prefill attention: varlen causal attention of new query tokens over the paged KV cache.

Invariants (cache layout and causal offset: see ``allmos.attention.metadata``):
- Query ``i`` of sequence ``s`` sits at position ``seq_lens[s] - q_len(s) + i`` and sees keys ``0 ..`` that
  position; every key (prefix-cached context, earlier chunks, this chunk) is read from the paged cache,
  so this step's K/V must be stored before the call.
- One program owns ``BLOCK_Q`` query tokens of one sequence times all ``group`` query heads of one KV
  head: its ``BLOCK_M = BLOCK_Q * next_pow2(group)`` rows are token-major (row ``r`` is token
  ``r // group_p2``, head ``r % group_p2``), so each K/V tile loaded feeds the whole GQA group.
- Key tiles entirely below the program's first query position run without masks; only the last few
  tiles (the causal diagonal) are masked. Softmax is online, in float32, base 2.
- The grid comes from host-known bounds ``(cdiv(max_query_len, BLOCK_Q), num_kv_heads, num_seqs)``;
  programs past a sequence's query length exit at once. Query tiles run last-first (the longest first).
- An fp8 cache is read as in the decode kernel: tiles converted to the query dtype, ``k_scale`` folded into
  the score scale and ``v_scale`` into the output (``KV_FP8``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from allmos.attention.torch_ref import KVScales
from allmos.kernels.decode_attention import (
    SHARED_MEMORY_MARGIN,
    attend_kv_tile,
    check_paged_kv_args,
    dot_precision,
    fp16_dots,
    kv_tile_offsets,
    make_output,
    max_shared_memory,
    query_for_dots,
)
from allmos.kernels.store_kv import check_kv_scales, kv_scale_args


@dataclass(frozen=True)
class PrefillConfig:
    """Launch parameters of the prefill kernel (tuning override; default: ``default_prefill_config``)."""

    block_m: int  # rows per program: query tokens x padded GQA group
    block_n: int  # key tokens per tile
    num_warps: int
    num_stages: int


@triton.jit
def _attend_causal(q, q_pos, row_valid, table, kv_end, num_full, k_cache_ptr, v_cache_ptr, head_offset, dims,
                   scale_log2, stride_cb, stride_ct, BLOCK_M: tl.constexpr, HEAD_DIM: tl.constexpr,
                   BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """Online softmax of the query rows over keys ``[0, kv_end)``: the first ``num_full`` tiles unmasked
    (every row sees them whole), the rest with the causal mask. Returns the unnormalized output and the
    row sums."""
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], -1.0e30, dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    for tile in range(0, num_full):
        start = tile * BLOCK_N
        offsets = kv_tile_offsets(table, start, kv_end, stride_cb, stride_ct, BLOCK_SIZE, BLOCK_N, False)
        acc, m_i, l_i = attend_kv_tile(
            q, acc, m_i, l_i, k_cache_ptr, v_cache_ptr, offsets + head_offset, dims, row_valid, row_valid,
            scale_log2, False, DOT_PRECISION,
        )
    for tile in range(num_full, tl.cdiv(kv_end, BLOCK_N)):
        start = tile * BLOCK_N
        key_pos = start + tl.arange(0, BLOCK_N)  # [BLOCK_N]
        kv_valid = key_pos < kv_end
        causal = (key_pos[None, :] <= q_pos[:, None]) & kv_valid[None, :]  # [BLOCK_M, BLOCK_N]
        offsets = kv_tile_offsets(table, start, kv_end, stride_cb, stride_ct, BLOCK_SIZE, BLOCK_N, True)
        acc, m_i, l_i = attend_kv_tile(
            q, acc, m_i, l_i, k_cache_ptr, v_cache_ptr, offsets + head_offset, dims, kv_valid, causal,
            scale_log2, True, DOT_PRECISION,
        )
    return acc, l_i


@triton.jit
def _prefill_kernel(
    q_ptr, k_cache_ptr, v_cache_ptr, out_ptr, query_start_loc_ptr, seq_lens_ptr, block_tables_ptr,
    k_scale_ptr, v_scale_ptr, scale_log2,
    stride_qt, stride_qh, stride_ot, stride_oh, stride_cb, stride_ct, stride_ch, stride_bt,
    GROUP: tl.constexpr, GROUP_P2: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_N: tl.constexpr, DOT_PRECISION: tl.constexpr,
    KV_FP8: tl.constexpr, Q_FP16: tl.constexpr,
):
    q_tile = tl.num_programs(0) - 1 - tl.program_id(0)
    kv_head = tl.program_id(1)
    seq = tl.program_id(2)
    q_start = tl.load(query_start_loc_ptr + seq)
    q_len = tl.load(query_start_loc_ptr + seq + 1) - q_start
    if q_tile * BLOCK_Q >= q_len:
        return
    seq_len = tl.load(seq_lens_ptr + seq)
    context_len = seq_len - q_len
    if KV_FP8:
        scale_log2 = scale_log2 * tl.load(k_scale_ptr)

    rows = tl.arange(0, BLOCK_M)
    dims = tl.arange(0, HEAD_DIM)
    tokens = q_tile * BLOCK_Q + rows // GROUP_P2  # [BLOCK_M] index within this sequence's queries
    in_group = rows % GROUP_P2
    row_valid = (tokens < q_len) & (in_group < GROUP)
    heads = kv_head * GROUP + in_group
    q_rows = (q_start + tokens).to(tl.int64)
    q = tl.load(q_ptr + (q_rows * stride_qt + heads * stride_qh)[:, None] + dims[None, :],
                mask=row_valid[:, None], other=0.0)  # [BLOCK_M, HEAD_DIM]
    q = query_for_dots(q, Q_FP16)
    q_pos = context_len + tokens  # [BLOCK_M] absolute positions

    first_pos = context_len + q_tile * BLOCK_Q
    kv_end = context_len + tl.minimum(q_tile * BLOCK_Q + BLOCK_Q, q_len)  # keys past this are never seen
    num_full = (first_pos + 1) // BLOCK_N  # tiles every row of this program sees whole
    table = block_tables_ptr + seq.to(tl.int64) * stride_bt
    head_offset = kv_head * stride_ch

    acc, l_i = _attend_causal(q, q_pos, row_valid, table, kv_end, num_full, k_cache_ptr, v_cache_ptr,
                              head_offset, dims, scale_log2, stride_cb, stride_ct,
                              BLOCK_M, HEAD_DIM, BLOCK_SIZE, BLOCK_N, DOT_PRECISION)
    o = acc / tl.where(l_i > 0.0, l_i, 1.0)[:, None]
    if KV_FP8:
        o = o * tl.load(v_scale_ptr)
    out_ptrs = out_ptr + (q_rows * stride_ot + heads * stride_oh)[:, None] + dims[None, :]
    tl.store(out_ptrs, o.to(out_ptr.dtype.element_ty), mask=row_valid[:, None])


# Preferred first; the first whose tiles fit the device's shared memory is used. 16-bit inputs up to
# head_dim 128 start at the top; float32 (tests) and head_dim 256 use the small ones. On H100 (Qwen3-0.6B
# shapes, one 16k prompt) 128x128/8 warps/2 stages ran at 451 TFLOP/s, 128x64/3 stages at 354.
PREFILL_CANDIDATES = (
    PrefillConfig(block_m=128, block_n=128, num_warps=8, num_stages=2),
    PrefillConfig(block_m=128, block_n=64, num_warps=8, num_stages=3),
    PrefillConfig(block_m=128, block_n=64, num_warps=8, num_stages=2),
    PrefillConfig(block_m=64, block_n=64, num_warps=4, num_stages=2),
    PrefillConfig(block_m=64, block_n=32, num_warps=4, num_stages=2),
    PrefillConfig(block_m=32, block_n=32, num_warps=4, num_stages=1),
)
SMALL_TILES_FROM = 4  # index of the first candidate for float32 / head_dim > 128


def prefill_shared_memory(config: PrefillConfig, head_dim: int, element_size: int) -> int:
    """Estimated shared memory of one program: the query tile plus K and V tiles per pipeline stage."""
    return (config.block_m + 2 * config.num_stages * config.block_n) * head_dim * element_size


def default_prefill_config(head_dim: int, dtype: torch.dtype, shared_memory: int) -> PrefillConfig:
    """The first of ``PREFILL_CANDIDATES`` that fits ``shared_memory`` bytes (with a margin)."""
    element_size = dtype.itemsize
    first = SMALL_TILES_FROM if dtype == torch.float32 or head_dim > 128 else 0
    for config in PREFILL_CANDIDATES[first:]:
        if prefill_shared_memory(config, head_dim, element_size) + SHARED_MEMORY_MARGIN <= shared_memory:
            return config
    return PREFILL_CANDIDATES[-1]


def _check_prefill_args(
    query, k_cache, v_cache, query_start_loc, seq_lens, block_tables, max_query_len
) -> None:
    if query.dim() != 3:
        raise ValueError(f"query must be [num_tokens, num_heads, head_dim], got {tuple(query.shape)}")
    check_paged_kv_args(query, k_cache, v_cache, block_tables)
    num_seqs = seq_lens.shape[0]
    if query_start_loc.shape != (num_seqs + 1,) or block_tables.shape[0] != num_seqs:
        raise ValueError(
            f"query_start_loc {tuple(query_start_loc.shape)} must be [num_seqs + 1] and block_tables "
            f"{tuple(block_tables.shape)} [num_seqs, ...] for num_seqs={num_seqs}"
        )
    if max_query_len < 0:
        raise ValueError(f"max_query_len must be >= 0, got {max_query_len}")


def paged_prefill_attention(
    query: torch.Tensor,  # [num_tokens, num_heads, head_dim]
    k_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    v_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    query_start_loc: torch.Tensor,  # [num_seqs + 1] int32
    seq_lens: torch.Tensor,  # [num_seqs] int32, context length after this step
    block_tables: torch.Tensor,  # [num_seqs, max_blocks_per_seq] int32
    scale: float,
    max_query_len: int,
    out: torch.Tensor | None = None,  # [num_tokens, num_heads, head_dim]
    config: PrefillConfig | None = None,
    kv_scales: KVScales | None = None,  # fp8 caches only (None: scales 1.0)
) -> torch.Tensor:  # [num_tokens, num_heads, head_dim]
    """Causal attention (offset by each sequence's cached length) of the new queries over the paged cache.

    Same result as ``allmos.attention.torch_ref.paged_attention_ref``. ``max_query_len`` must bound every
    sequence's query length (it only sizes the grid; no host synchronization happens). The cache is in the
    query's dtype or float8_e4m3fn (read through ``kv_scales``).
    """
    _check_prefill_args(query, k_cache, v_cache, query_start_loc, seq_lens, block_tables, max_query_len)
    check_kv_scales(k_cache, v_cache, kv_scales)
    num_heads, head_dim = query.shape[1], query.shape[2]
    block_size, num_kv_heads = k_cache.shape[1], k_cache.shape[2]
    out = make_output(out, query)
    num_seqs = seq_lens.shape[0]
    if num_seqs == 0 or max_query_len == 0 or query.shape[0] == 0:
        return out
    k_scale, v_scale, _, kv_fp8 = kv_scale_args(k_cache, kv_scales)
    cfg = config or default_prefill_config(head_dim, query.dtype, max_shared_memory(query.device))
    group = num_heads // num_kv_heads
    group_p2 = triton.next_power_of_2(group)
    block_q = max(1, cfg.block_m // group_p2)
    grid = (triton.cdiv(max_query_len, block_q), num_kv_heads, num_seqs)
    _prefill_kernel[grid](
        query, k_cache, v_cache, out, query_start_loc, seq_lens, block_tables,
        k_scale, v_scale, scale * 1.4426950408889634,
        query.stride(0), query.stride(1), out.stride(0), out.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), block_tables.stride(0),
        GROUP=group, GROUP_P2=group_p2, HEAD_DIM=head_dim, BLOCK_SIZE=block_size,
        BLOCK_M=block_q * group_p2, BLOCK_Q=block_q, BLOCK_N=cfg.block_n,
        DOT_PRECISION=dot_precision(query.dtype), KV_FP8=kv_fp8, Q_FP16=fp16_dots(query, kv_fp8),
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    return out
