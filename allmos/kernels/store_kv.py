"""Triton kernel that writes new tokens' K/V into the paged KV cache.

Invariant (see ``allmos.attention.metadata``): new token ``i`` goes to flat slot ``slot_mapping[i]``
(``block * block_size + offset``) of every KV head; a slot of ``-1`` is skipped (padded rows of a
captured CUDA graph). One program per token copies all its KV heads; nothing is read back, and no
host synchronization happens, so the launch can be captured in a CUDA graph.

An fp8 cache (``float8_e4m3fn``) stores ``(k - k_center) / k_scale`` and ``v / v_scale`` rounded as
``allmos.attention.torch_ref.quantize_kv`` defines (``fp8_e4m3_values``, shared with the fused store kernel);
scales and center are read from device memory.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from allmos.attention.torch_ref import FP8_KV_DTYPE, KVScales


@triton.jit
def fp8_e4m3_values(x, scale):
    """``x / scale`` rounded to the nearest float8_e4m3fn value (ties to even, subnormals included) and
    saturated at +-448, as float32: exactly ``quantize_kv``'s values, bit for bit. Rounding here, in float32
    arithmetic, leaves the cast to fp8 that follows nothing to round, so the stored bits do not depend on the
    target's conversion (the Triton interpreter's rounds differently from the hardware's)."""
    y = tl.math.div_rn(x.to(tl.float32), scale)
    a = tl.minimum(tl.abs(y), 448.0)
    biased_exp = tl.maximum(a.to(tl.int32, bitcast=True) >> 23, 121)  # at least e4m3's smallest normal, 2^-6
    ulp = ((biased_exp - 3) << 23).to(tl.float32, bitcast=True)  # e4m3 spacing there: 2^(exp - 3)
    inv_ulp = ((257 - biased_exp) << 23).to(tl.float32, bitcast=True)  # 1 / ulp
    rounded = ((a * inv_ulp + 8388608.0) - 8388608.0) * ulp  # a / ulp < 16: adding 2^23 rounds it half-even
    # y's sign bit onto the magnitude (not ``-rounded``: Triton negates as 0 - x, which makes -0.0 into +0.0)
    sign = y.to(tl.int32, bitcast=True) & -2147483648
    return (rounded.to(tl.int32, bitcast=True) | sign).to(tl.float32, bitcast=True)


@triton.jit
def _store_kv_kernel(
    key_ptr, value_ptr, k_cache_ptr, v_cache_ptr, slot_ptr,
    stride_kt, stride_kh, stride_vt, stride_vh,
    stride_cb, stride_cs, stride_ch,
    num_kv_heads, k_scale_ptr, v_scale_ptr, k_center_ptr,
    BLOCK_SIZE: tl.constexpr, HEAD_DIM: tl.constexpr, HEADS_P2: tl.constexpr, KV_FP8: tl.constexpr,
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
    if KV_FP8:
        k_center = tl.load(k_center_ptr + heads * HEAD_DIM + dims, mask=mask)  # [HEADS_P2, HEAD_DIM]
        k = fp8_e4m3_values(k.to(tl.float32) - k_center, tl.load(k_scale_ptr))
        v = fp8_e4m3_values(v, tl.load(v_scale_ptr))
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


def check_kv_scales(k_cache: torch.Tensor, v_cache: torch.Tensor, kv_scales: KVScales | None) -> None:
    """The caches share a dtype; the scales (where given) are one float32 element each on the caches' device,
    the center a contiguous float32 [num_kv_heads, head_dim] there."""
    if v_cache.dtype != k_cache.dtype:
        raise ValueError(f"k_cache dtype {k_cache.dtype} != v_cache dtype {v_cache.dtype}")
    if kv_scales is None:
        return
    for name, scale in (("k_scale", kv_scales.k_scale), ("v_scale", kv_scales.v_scale)):
        if scale.numel() != 1 or scale.dtype != torch.float32 or scale.device != k_cache.device:
            raise ValueError(f"{name} must be one float32 element on {k_cache.device}, got "
                             f"{tuple(scale.shape)} {scale.dtype} on {scale.device}")
    center = kv_scales.k_center
    if center is not None and (center.shape != k_cache.shape[2:] or center.dtype != torch.float32
                               or center.device != k_cache.device or not center.is_contiguous()):
        raise ValueError(f"k_center must be a contiguous float32 {tuple(k_cache.shape[2:])} on {k_cache.device}, got "
                         f"{tuple(center.shape)} {center.dtype} on {center.device}")


def kv_scale_args(k_cache: torch.Tensor, kv_scales: KVScales | None
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, bool]:
    """(k_scale, v_scale, k_center, kv_fp8) as the kernels take them: for an fp8 cache the layer's (missing ones
    made: 1.0, a zero center); otherwise placeholders the kernels never read (kv_fp8=False compiles the reads
    out)."""
    if k_cache.dtype != FP8_KV_DTYPE:
        return k_cache, k_cache, k_cache, False
    if kv_scales is None:
        one = torch.ones(1, dtype=torch.float32, device=k_cache.device)
        kv_scales = KVScales(one, one)
    center = kv_scales.k_center
    if center is None:
        center = torch.zeros(k_cache.shape[2:], dtype=torch.float32, device=k_cache.device)
    return kv_scales.k_scale, kv_scales.v_scale, center, True


def store_kv_cache(
    key: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
    value: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
    k_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    v_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    slot_mapping: torch.Tensor,  # [num_tokens] int64 (or int32), -1 = skip
    kv_scales: KVScales | None = None,  # fp8 caches only (None: scales 1.0, no center)
) -> None:
    """Write each new token's K/V into its cache slot; slots of -1 are skipped.

    Same contract as ``allmos.attention.torch_ref.store_kv_cache_ref``. ``key``/``value`` may be strided
    views (e.g. slices of a fused QKV output) as long as ``head_dim`` is contiguous.
    """
    _check_store_args(key, value, k_cache, v_cache, slot_mapping)
    check_kv_scales(k_cache, v_cache, kv_scales)
    num_tokens, num_kv_heads, head_dim = key.shape
    if num_tokens == 0:
        return
    k_scale, v_scale, k_center, kv_fp8 = kv_scale_args(k_cache, kv_scales)
    _store_kv_kernel[(num_tokens,)](
        key, value, k_cache, v_cache, slot_mapping,
        key.stride(0), key.stride(1), value.stride(0), value.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        num_kv_heads, k_scale, v_scale, k_center,
        BLOCK_SIZE=k_cache.shape[1], HEAD_DIM=head_dim, HEADS_P2=triton.next_power_of_2(num_kv_heads),
        KV_FP8=kv_fp8,
    )
