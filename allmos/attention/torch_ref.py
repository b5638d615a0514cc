"""Reference paged attention in plain torch: the oracle for every kernel and the CPU path.

See ``allmos.attention.metadata`` for the cache layout and the causal-offset convention.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def store_kv_cache_ref(
    key: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
    value: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
    k_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    v_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    slot_mapping: torch.Tensor,  # [num_tokens] int64, -1 = skip
) -> None:
    """Write each new token's K/V into its cache slot (slots of -1 are skipped)."""
    keep = slot_mapping >= 0
    slots = slot_mapping[keep]
    k_flat = k_cache.view(-1, *k_cache.shape[2:])  # [num_blocks * block_size, num_kv_heads, head_dim]
    v_flat = v_cache.view(-1, *v_cache.shape[2:])
    k_flat[slots] = key[keep].to(k_cache.dtype)
    v_flat[slots] = value[keep].to(v_cache.dtype)


def gather_kv(
    cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    block_table: list[int] | torch.Tensor,
    seq_len: int,
) -> torch.Tensor:  # [seq_len, num_kv_heads, head_dim]
    """The first ``seq_len`` cached tokens of one sequence, contiguous."""
    block_size = cache.shape[1]
    num_blocks = (seq_len + block_size - 1) // block_size
    blocks = torch.as_tensor(block_table[:num_blocks], dtype=torch.long, device=cache.device)
    return cache[blocks].reshape(-1, *cache.shape[2:])[:seq_len]


def paged_attention_ref(
    query: torch.Tensor,  # [num_tokens, num_heads, head_dim]
    k_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    v_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    query_start_loc: list[int],  # num_seqs + 1 entries
    seq_lens: list[int],  # num_seqs entries
    block_tables: torch.Tensor,  # [num_seqs, max_blocks_per_seq] int32
    scale: float,
) -> torch.Tensor:  # [num_tokens, num_heads, head_dim]
    """Causal attention of each sequence's new queries over its whole paged context.

    Computed per sequence in float32, reading only the blocks that hold the sequence's context; GQA
    inside SDPA (no repeated K/V copies).
    """
    out = torch.empty_like(query)
    num_heads, num_kv_heads = query.shape[1], k_cache.shape[2]
    for s, seq_len in enumerate(seq_lens):
        start, end = query_start_loc[s], query_start_loc[s + 1]
        q_len = end - start
        if q_len == 0:
            continue
        k = gather_kv(k_cache, block_tables[s], seq_len).transpose(0, 1).float()  # [num_kv_heads, seq_len, d]
        v = gather_kv(v_cache, block_tables[s], seq_len).transpose(0, 1).float()
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
