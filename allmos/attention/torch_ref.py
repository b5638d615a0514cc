"""Reference paged attention in plain torch: the oracle for every kernel and the CPU path.

See ``allmos.attention.metadata`` for the cache layout and the causal-offset convention.

fp8 cache (``torch.float8_e4m3fn``, ``kv_cache_dtype="fp8"``), one ``KVScales`` per layer:
- stored K = ``e4m3((k - k_center) / k_scale)``, stored V = ``e4m3(v / v_scale)``, where ``e4m3`` saturates at
  +-448 and rounds to the nearest value, ties to even (``quantize_kv``);
- read back as ``float32(element) * scale`` (``dequantize_kv``): K comes back less ``k_center``. Attention is
  unchanged by that: it shifts every score of one query by the same ``q . k_center``, which softmax (and a
  log-sum-exp merge of partial results) cancels, so no reader adds the center back. The center removes the
  large per-channel offsets K has in many models, which would otherwise take most of e4m3's 3 mantissa bits.
A cache in any other dtype stores ``x`` cast to its dtype and ignores the scales.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

FP8_KV_DTYPE = torch.float8_e4m3fn
FP8_E4M3_MAX = 448.0  # largest finite float8_e4m3fn


@dataclass(frozen=True)
class KVScales:
    """One layer's fp8 cache quantization (module docstring): device tensors the kernels read at run time,
    so values set in place (calibration) reach captured CUDA graphs."""

    k_scale: torch.Tensor  # [1] float32
    v_scale: torch.Tensor  # [1] float32
    k_center: torch.Tensor | None = None  # [num_kv_heads, head_dim] float32; None: zero


def quantize_kv(x: torch.Tensor, cache_dtype: torch.dtype, scale: torch.Tensor | None,
                center: torch.Tensor | None = None) -> torch.Tensor:
    """``x`` [..., num_kv_heads, head_dim] as the cache stores it: cast to ``cache_dtype``; for fp8, less
    ``center`` [num_kv_heads, head_dim] (None: 0), divided by ``scale`` (None: 1.0) and saturated at the
    format's largest value (a plain cast would turn larger values into NaN)."""
    if cache_dtype != FP8_KV_DTYPE:
        return x.to(cache_dtype)
    y = x.float()
    if center is not None:
        y = y - center
    if scale is not None:
        y = y / scale
    return y.clamp(-FP8_E4M3_MAX, FP8_E4M3_MAX).to(cache_dtype)


def dequantize_kv(stored: torch.Tensor, scale: torch.Tensor | None) -> torch.Tensor:
    """float32 values of cache elements: fp8 ones times ``scale`` (None: 1.0); others just converted.

    fp8 goes through a table of its 256 values, already scaled: one gather instead of a conversion and a
    multiply (torch's float8 conversion is a slow scalar loop on the CPU), the same float32 results."""
    if stored.dtype != FP8_KV_DTYPE:
        return stored.float()
    values = torch.arange(256, dtype=torch.uint8, device=stored.device).view(FP8_KV_DTYPE).float()  # [256]
    if scale is not None:
        values = values * scale
    codes = stored.contiguous().view(torch.uint8).flatten().int()
    return values.index_select(0, codes).view(stored.shape)


def as_storage(cache: torch.Tensor) -> torch.Tensor:
    """``cache`` itself, or for fp8 its uint8 view (indexing kernels are not implemented for float8 on
    every device and torch version; bytes copy the same)."""
    return cache.view(torch.uint8) if cache.dtype == FP8_KV_DTYPE else cache


def quantize_kv_pair(key: torch.Tensor, value: torch.Tensor, cache_dtype: torch.dtype, kv_scales: KVScales | None
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """(stored K, stored V) of ``quantize_kv`` with a layer's scales (None: 1.0 and no center)."""
    if kv_scales is None:
        return quantize_kv(key, cache_dtype, None), quantize_kv(value, cache_dtype, None)
    return (quantize_kv(key, cache_dtype, kv_scales.k_scale, kv_scales.k_center),
            quantize_kv(value, cache_dtype, kv_scales.v_scale))


def store_kv_cache_ref(
    key: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
    value: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
    k_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    v_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    slot_mapping: torch.Tensor,  # [num_tokens] int64, -1 = skip
    kv_scales: KVScales | None = None,  # fp8 caches only (None: scales 1.0, no center)
) -> None:
    """Write each new token's K/V into its cache slot (slots of -1 are skipped)."""
    keep = slot_mapping >= 0
    slots = slot_mapping[keep]
    k_flat = as_storage(k_cache).view(-1, *k_cache.shape[2:])  # [num_blocks * block_size, num_kv_heads, head_dim]
    v_flat = as_storage(v_cache).view(-1, *v_cache.shape[2:])
    k_new, v_new = quantize_kv_pair(key[keep], value[keep], k_cache.dtype, kv_scales)
    k_flat[slots] = as_storage(k_new)
    v_flat[slots] = as_storage(v_new)


def gather_kv(
    cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    block_table: list[int] | torch.Tensor,
    seq_len: int,
) -> torch.Tensor:  # [seq_len, num_kv_heads, head_dim]
    """The first ``seq_len`` cached tokens of one sequence, contiguous."""
    block_size = cache.shape[1]
    num_blocks = (seq_len + block_size - 1) // block_size
    blocks = torch.as_tensor(block_table[:num_blocks], dtype=torch.long, device=cache.device)
    return as_storage(cache)[blocks].reshape(-1, *cache.shape[2:])[:seq_len].view(cache.dtype)


def paged_attention_ref(
    query: torch.Tensor,  # [num_tokens, num_heads, head_dim]
    k_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    v_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    query_start_loc: list[int],  # num_seqs + 1 entries
    seq_lens: list[int],  # num_seqs entries
    block_tables: torch.Tensor,  # [num_seqs, max_blocks_per_seq] int32
    scale: float,
    kv_scales: KVScales | None = None,  # fp8 caches only (None: scales 1.0)
) -> torch.Tensor:  # [num_tokens, num_heads, head_dim]
    """Causal attention of each sequence's new queries over its whole paged context.

    Computed per sequence in float32 (an fp8 cache dequantized with ``kv_scales``), reading only the blocks
    that hold the sequence's context; GQA inside SDPA (no repeated K/V copies).
    """
    k_scale, v_scale = (None, None) if kv_scales is None else (kv_scales.k_scale, kv_scales.v_scale)
    out = torch.empty_like(query)
    num_heads, num_kv_heads = query.shape[1], k_cache.shape[2]
    for s, seq_len in enumerate(seq_lens):
        start, end = query_start_loc[s], query_start_loc[s + 1]
        q_len = end - start
        if q_len == 0:
            continue
        k = dequantize_kv(gather_kv(k_cache, block_tables[s], seq_len), k_scale).transpose(0, 1)  # [kv_heads, len, d]
        v = dequantize_kv(gather_kv(v_cache, block_tables[s], seq_len), v_scale).transpose(0, 1)
        q = query[start:end].transpose(0, 1).float()  # [num_heads, q_len, head_dim]
        if q_len == seq_len:  # no cached context: the plain causal mask
            o = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale,
                                               enable_gqa=num_heads != num_kv_heads)
        else:
            # Query i (absolute position seq_len - q_len + i) sees keys 0 .. seq_len - q_len + i.
            q_pos = torch.arange(seq_len - q_len, seq_len, device=query.device)[:, None]
            k_pos = torch.arange(seq_len, device=query.device)[None, :]
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=k_pos <= q_pos, scale=scale,
                                               enable_gqa=num_heads != num_kv_heads)  # [num_heads, q_len, d]
        out[start:end] = o.transpose(0, 1).to(query.dtype)
    return out
