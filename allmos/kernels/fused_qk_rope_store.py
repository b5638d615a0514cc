"""q/k RMSNorm + RoPE + K/V cache store in one Triton kernel, straight from the packed QKV projection.

Replaces ``fused_layers.qk_norm_rope`` followed by ``store_kv.store_kv_cache`` (two launches, and a write +
read of k). For every token, the heads of the packed row ``[q heads | k heads | v heads]`` are handled in
tiles of ``HEAD_BLOCK`` heads: q heads are normed (optional), rotated (neox RoPE over the whole head) and
written to ``q``; k heads are normed, rotated and written to the token's cache slot; v heads are copied to
the slot. The rounding is ``fused_layers.qk_norm_rope``'s (that of the torch reference layers), so q and k
match it bit for bit.

Cache invariants are ``allmos.attention.metadata``'s: new token ``i`` goes to flat slot
``slot_mapping[i]`` (``block * block_size + offset``); a slot of ``-1`` (a padded CUDA-graph row) stores
nothing (its q is still computed; attention ignores it). No host synchronization: capturable. An fp8 cache gets
``(k - k_center) / k_scale`` and ``v / v_scale`` rounded as ``store_kv.fp8_e4m3_values`` (scales and center read
from device memory).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from allmos.attention.torch_ref import KVScales
from allmos.kernels.pdl import pdl_enter, pdl_kwargs
from allmos.kernels.store_kv import check_kv_scales, fp8_e4m3_values, kv_scale_args


@triton.jit
def _qk_rms_norm(x1, x2, is_q, rotate, qw_ptr, kw_ptr, d, eps, HALF: tl.constexpr):
    """Per-head RMSNorm of the q rows (weights ``qw``) and k rows (``kw``) of a [HEAD_BLOCK, 2 * HALF] tile
    held as two halves; v rows pass unchanged. Rounds as the torch path does."""
    dtype = x1.dtype
    f1, f2 = x1.to(tl.float32), x2.to(tl.float32)
    inv_rms = 1.0 / tl.sqrt((tl.sum(f1 * f1, axis=1) + tl.sum(f2 * f2, axis=1)) / (2 * HALF) + eps)
    w1 = tl.where(is_q[:, None], tl.load(qw_ptr + d)[None, :], tl.load(kw_ptr + d)[None, :]).to(tl.float32)
    w2 = tl.where(is_q[:, None], tl.load(qw_ptr + HALF + d)[None, :],
                  tl.load(kw_ptr + HALF + d)[None, :]).to(tl.float32)
    n1 = ((f1 * inv_rms[:, None]).to(dtype).to(tl.float32) * w1).to(dtype)
    n2 = ((f2 * inv_rms[:, None]).to(dtype).to(tl.float32) * w2).to(dtype)
    return tl.where(rotate, n1, x1), tl.where(rotate, n2, x2)  # v heads are not normed


@triton.jit
def _qk_norm_rope_store_kernel(
    qkv_ptr, q_out_ptr, k_cache_ptr, v_cache_ptr, slot_ptr, qw_ptr, kw_ptr, cos_ptr, sin_ptr, pos_ptr,
    stride_qkv, stride_qo, stride_cb, stride_cs, stride_ch, stride_cos,
    num_heads, num_kv_heads, eps, k_scale_ptr, v_scale_ptr, k_center_ptr,
    HAS_NORM: tl.constexpr, HALF: tl.constexpr, HEAD_BLOCK: tl.constexpr, BLOCK_SIZE: tl.constexpr,
    KV_FP8: tl.constexpr, PDL: tl.constexpr,
):
    pdl_enter(PDL)  # allmos.kernels.pdl: the next kernel may start; the last one must be done
    token = tl.program_id(0).to(tl.int64)
    heads = tl.program_id(1) * HEAD_BLOCK + tl.arange(0, HEAD_BLOCK)  # [HEAD_BLOCK] over q | k | v heads
    d = tl.arange(0, HALF)  # [HALF]
    valid = heads < num_heads + 2 * num_kv_heads
    is_q = heads < num_heads
    is_k = (heads >= num_heads) & (heads < num_heads + num_kv_heads)
    is_v = valid & (heads >= num_heads + num_kv_heads)
    rotate = (is_q | is_k)[:, None]  # [HEAD_BLOCK, 1]

    src = qkv_ptr + token * stride_qkv + heads[:, None] * (2 * HALF) + d[None, :]  # [HEAD_BLOCK, HALF]
    x1 = tl.load(src, mask=valid[:, None], other=0.0)
    x2 = tl.load(src + HALF, mask=valid[:, None], other=0.0)
    dtype = x1.dtype
    if HAS_NORM:
        x1, x2 = _qk_rms_norm(x1, x2, is_q, rotate, qw_ptr, kw_ptr, d, eps, HALF)
    pos = tl.load(pos_ptr + token)
    cos = tl.load(cos_ptr + pos * stride_cos + d).to(dtype).to(tl.float32)[None, :]  # [1, HALF]
    sin = tl.load(sin_ptr + pos * stride_cos + d).to(dtype).to(tl.float32)[None, :]
    a1, a2 = x1.to(tl.float32), x2.to(tl.float32)
    o1 = ((a1 * cos).to(dtype).to(tl.float32) - (a2 * sin).to(dtype).to(tl.float32)).to(dtype)
    o2 = ((a2 * cos).to(dtype).to(tl.float32) + (a1 * sin).to(dtype).to(tl.float32)).to(dtype)
    o1 = tl.where(rotate, o1, x1)
    o2 = tl.where(rotate, o2, x2)

    q_dst = q_out_ptr + token * stride_qo + heads[:, None] * (2 * HALF) + d[None, :]
    tl.store(q_dst, o1, mask=is_q[:, None])
    tl.store(q_dst + HALF, o2, mask=is_q[:, None])

    slot = tl.load(slot_ptr + token).to(tl.int64)
    stored_below = tl.where(slot >= 0, num_heads + 2 * num_kv_heads, 0)  # no head is stored for slot -1
    kv_head = tl.where(is_k, heads - num_heads, heads - num_heads - num_kv_heads)
    dst = (slot // BLOCK_SIZE) * stride_cb + (slot % BLOCK_SIZE) * stride_cs + kv_head[:, None] * stride_ch \
        + d[None, :]
    k_mask = (is_k & (heads < stored_below))[:, None]
    v_mask = (is_v & (heads < stored_below))[:, None]
    cache_dtype = k_cache_ptr.dtype.element_ty
    if KV_FP8:
        kv_scale = tl.where(is_k, tl.load(k_scale_ptr), tl.load(v_scale_ptr))[:, None]  # [HEAD_BLOCK, 1]
        center = k_center_ptr + kv_head[:, None] * (2 * HALF) + d[None, :]  # v heads: masked, 0
        c1 = fp8_e4m3_values(o1.to(tl.float32) - tl.load(center, mask=k_mask, other=0.0), kv_scale)
        c2 = fp8_e4m3_values(o2.to(tl.float32) - tl.load(center + HALF, mask=k_mask, other=0.0), kv_scale)
    else:
        c1, c2 = o1, o2
    tl.store(k_cache_ptr + dst, c1.to(cache_dtype), mask=k_mask)
    tl.store(k_cache_ptr + dst + HALF, c2.to(cache_dtype), mask=k_mask)
    tl.store(v_cache_ptr + dst, c1.to(cache_dtype), mask=v_mask)
    tl.store(v_cache_ptr + dst + HALF, c2.to(cache_dtype), mask=v_mask)


def head_block_for(num_tokens: int) -> int:
    """Heads per program: few tokens -> small tiles, so even a batch of one spreads over many programs;
    many tokens -> 8 heads per program, so large batches do not launch one tiny program per head."""
    return 2 if num_tokens <= 16 else 8


def _check_args(qkv, num_heads, num_kv_heads, head_dim, k_cache, v_cache, slot_mapping, positions) -> None:
    num_tokens = qkv.shape[0]
    if qkv.dim() != 2 or qkv.shape[1] != (num_heads + 2 * num_kv_heads) * head_dim or qkv.stride(-1) != 1:
        raise ValueError(f"qkv must be [num_tokens, (num_heads + 2 * num_kv_heads) * head_dim] with a contiguous "
                         f"last dim, got {tuple(qkv.shape)}")
    if k_cache.dim() != 4 or v_cache.shape != k_cache.shape or v_cache.stride() != k_cache.stride():
        raise ValueError("k_cache/v_cache must share shape and strides [blocks, block_size, kv_heads, dim]")
    if tuple(k_cache.shape[2:]) != (num_kv_heads, head_dim) or k_cache.stride(-1) != 1:
        raise ValueError(f"k_cache heads/head_dim {tuple(k_cache.shape[2:])} != ({num_kv_heads}, {head_dim}) "
                         "or head_dim not contiguous")
    if slot_mapping.shape != (num_tokens,) or positions.shape != (num_tokens,):
        raise ValueError(f"slot_mapping {tuple(slot_mapping.shape)} and positions {tuple(positions.shape)} must "
                         f"be [num_tokens={num_tokens}]")
    block_size = k_cache.shape[1]
    if head_dim % 2 or (head_dim // 2) & (head_dim // 2 - 1) or block_size & (block_size - 1):
        raise ValueError(f"head_dim / 2 ({head_dim // 2}) and block_size ({block_size}) must be powers of two")


def qk_norm_rope_store(
    qkv: torch.Tensor,  # [num_tokens, (num_heads + 2 * num_kv_heads) * head_dim]
    num_heads: int,
    num_kv_heads: int,
    head_dim: int,
    q_weight: torch.Tensor | None,  # [head_dim] q RMSNorm weight (None: no q/k norm)
    k_weight: torch.Tensor | None,  # [head_dim]
    eps: float,
    cos: torch.Tensor,  # [num_positions, head_dim // 2]
    sin: torch.Tensor,  # [num_positions, head_dim // 2]
    positions: torch.Tensor,  # [num_tokens] int64
    k_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    v_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    slot_mapping: torch.Tensor,  # [num_tokens] int64 (or int32), -1 = skip
    kv_scales: KVScales | None = None,  # fp8 caches only (None: scales 1.0, no center)
) -> torch.Tensor:  # q [num_tokens, num_heads, head_dim]
    """``fused_layers.qk_norm_rope`` then ``store_kv.store_kv_cache`` of (k, v), in one launch; returns q.

    cos/sin are the float32 (or activation-dtype) tables of a cached rotary embedding, rounded to the
    activation dtype before use as the reference does; positions index them.
    """
    _check_args(qkv, num_heads, num_kv_heads, head_dim, k_cache, v_cache, slot_mapping, positions)
    check_kv_scales(k_cache, v_cache, kv_scales)
    num_tokens = qkv.shape[0]
    q = torch.empty(num_tokens, num_heads, head_dim, dtype=qkv.dtype, device=qkv.device)
    if num_tokens == 0:
        return q
    k_scale, v_scale, k_center, kv_fp8 = kv_scale_args(k_cache, kv_scales)
    has_norm = q_weight is not None
    total_heads = num_heads + 2 * num_kv_heads
    head_block = min(head_block_for(num_tokens), triton.next_power_of_2(total_heads))
    half = head_dim // 2
    _qk_norm_rope_store_kernel[(num_tokens, triton.cdiv(total_heads, head_block))](
        qkv, q, k_cache, v_cache, slot_mapping, q_weight if has_norm else cos, k_weight if has_norm else cos,
        cos, sin, positions,
        qkv.stride(0), q.stride(0), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), cos.stride(0),
        num_heads, num_kv_heads, eps, k_scale, v_scale, k_center,
        HAS_NORM=has_norm, HALF=half, HEAD_BLOCK=head_block, BLOCK_SIZE=k_cache.shape[1], KV_FP8=kv_fp8,
        num_warps=max(1, min(4, head_block * half // 256)), **pdl_kwargs(qkv.device),
    )
    return q
