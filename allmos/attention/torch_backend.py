"""The reference attention backend in plain torch: runs on CPU and CUDA, and is the oracle."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from allmos.attention.backend import AttentionBackend
from allmos.attention.metadata import AttentionMetadata
from allmos.attention.torch_ref import paged_attention_ref, store_kv_cache_ref


class TorchAttentionBackend(AttentionBackend):
    name = "torch"

    def forward(self, query, key, value, k_cache, v_cache, metadata: AttentionMetadata, scale: float):
        store_kv_cache_ref(key, value, k_cache, v_cache, metadata.slot_mapping)
        if metadata.is_decode:
            return _decode(query, k_cache, v_cache, metadata, scale)
        return paged_attention_ref(query, k_cache, v_cache, metadata.query_start_loc_cpu,
                                   metadata.seq_lens_cpu, metadata.block_tables, scale)


def _decode(query, k_cache, v_cache, metadata: AttentionMetadata, scale: float) -> torch.Tensor:
    """All sequences at once: gather each one's pages, mask past its length, one GQA SDPA call."""
    num_seqs, num_heads, head_dim = query.shape
    block_size, num_kv_heads = k_cache.shape[1], k_cache.shape[2]
    max_len = metadata.max_seq_len
    num_pages = -(-max_len // block_size)
    pages = metadata.block_tables[:, :num_pages].long().flatten()  # [num_seqs * num_pages]
    k = k_cache.index_select(0, pages).view(num_seqs, num_pages * block_size, num_kv_heads, head_dim)
    v = v_cache.index_select(0, pages).view(num_seqs, num_pages * block_size, num_kv_heads, head_dim)
    k = k[:, :max_len].transpose(1, 2).to(query.dtype)  # [num_seqs, num_kv_heads, max_len, head_dim]
    v = v[:, :max_len].transpose(1, 2).to(query.dtype)
    valid = torch.arange(max_len, device=query.device)[None, :] < metadata.seq_lens[:, None]  # [num_seqs, max_len]
    q = query.unsqueeze(2)  # [num_seqs, num_heads, 1, head_dim]
    # GQA inside SDPA (no repeated K/V copies). Slots past a sequence's length are masked; the runner
    # zero-fills the cache at allocation so they never hold NaN bit patterns (a masked score still meets
    # its V row in the weighted sum, and 0 * NaN = NaN).
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=valid[:, None, None, :], scale=scale,
                                         enable_gqa=num_heads != num_kv_heads)
    return out.squeeze(2)  # [num_seqs, num_heads, head_dim]
