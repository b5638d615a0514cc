"""Triton kernel that writes new tokens' K/V into the paged KV cache.

Invariant (see ``allmos.attention.metadata``): new token ``i`` goes to flat slot ``slot_mapping[i]``
(``block * block_size + offset``) of every KV head; a slot of ``-1`` is skipped (padded rows of a
captured CUDA graph). One program per token copies all its KV heads; nothing is read back, and no
host synchronization happens, so the launch can be captured in a CUDA graph.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _store_kv_kernel(
    key_ptr, value_ptr, k_cache_ptr, v_cache_ptr, slot_ptr,
    stride_kt, stride_kh, stride_vt, stride_vh,
    stride_cb, stride_cs, stride_ch,
    num_kv_heads,
    BLOCK_SIZE: tl.constexpr, HEAD_DIM: tl.constexpr, HEADS_P2: tl.constexpr,
):
    token = tl.program_id(0)
    slot = tl.load(slot_ptr + token).to(tl.int64)
    heads = tl.arange(0, HEADS_P2)[:, None]  # [HEADS_P2, 1]
    dims = tl.arange(0, HEAD_DIM)[None, :]  # [1, HEAD_DIM]
    mask = heads < tl.where(slot >= 0, num_kv_heads, 0)  # all False for skipped slots
    src_k = key_ptr + token.to(tl.int64) * stride_kt + heads * stride_kh + dims
    src_v = value_ptr + token.to(tl.int64) * stride_vt + heads * stride_vh + dims
    block = slot // BLOCK_SIZE
    offset = slot % BLOCK_SIZE
    dst = block * stride_cb + offset * stride_cs + heads * stride_ch + dims
    k = tl.load(src_k, mask=mask)
    v = tl.load(src_v, mask=mask)
    tl.store(k_cache_ptr + dst, k.to(k_cache_ptr.dtype.element_ty), mask=mask)
    tl.store(v_cache_ptr + dst, v.to(v_cache_ptr.dtype.element_ty), mask=mask)


def _check_store_args(key, value, k_cache, v_cache, slot_mapping) -> None:
    if key.dim() != 3 or value.shape != key.shape:
        shapes = f"{tuple(key.shape)}, {tuple(value.shape)}"
        raise ValueError(f"key/value must be [num_tokens, num_kv_heads, head_dim], got {shapes}")
    if k_cache.dim() != 4 or v_cache.shape != k_cache.shape or k_cache.stride() != v_cache.stride():
        raise ValueError("k_cache/v_cache must share shape and strides [blocks, block_size, kv_heads, dim]")
    if k_cache.shape[2:] != key.shape[1:]:
        raise ValueError(f"k_cache heads/head_dim {tuple(k_cache.shape[2:])} != key {tuple(key.shape[1:])}")
    if slot_mapping.shape != (key.shape[0],):
        raise ValueError(f"slot_mapping must be [num_tokens={key.shape[0]}], got {tuple(slot_mapping.shape)}")
    if key.stride(-1) != 1 or value.stride(-1) != 1 or k_cache.stride(-1) != 1:
        raise ValueError("key, value and k_cache/v_cache need a contiguous last (head_dim) dimension")
    head_dim, block_size = key.shape[2], k_cache.shape[1]
    if head_dim & (head_dim - 1) or block_size & (block_size - 1):
        raise ValueError(f"head_dim ({head_dim}) and block_size ({block_size}) must be powers of two")


def store_kv_cache(
    key: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
    value: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
    k_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    v_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    slot_mapping: torch.Tensor,  # [num_tokens] int64 (or int32), -1 = skip
) -> None:
    """Write each new token's K/V into its cache slot; slots of -1 are skipped.

    Same contract as ``allmos.attention.torch_ref.store_kv_cache_ref``. ``key``/``value`` may be strided
    views (e.g. slices of a fused QKV output) as long as ``head_dim`` is contiguous.
    """
    _check_store_args(key, value, k_cache, v_cache, slot_mapping)
    num_tokens, num_kv_heads, head_dim = key.shape
    if num_tokens == 0:
        return
    _store_kv_kernel[(num_tokens,)](
        key, value, k_cache, v_cache, slot_mapping,
        key.stride(0), key.stride(1), value.stride(0), value.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        num_kv_heads,
        BLOCK_SIZE=k_cache.shape[1], HEAD_DIM=head_dim, HEADS_P2=triton.next_power_of_2(num_kv_heads),
    )
