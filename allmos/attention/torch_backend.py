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
    """All sequences at once: gather each one's pages, mask past its length, one SDPA call."""
    num_seqs, num_heads, head_dim = query.shape
    num_kv_heads = k_cache.shape[2]
    max_len = metadata.max_seq_len
    num_pages = -(-max_len // k_cache.shape[1])
    pages = metadata.block_tables[:, :num_pages].long()  # [num_seqs, num_pages]
    k = k_cache[pages].flatten(1, 2)[:, :max_len]  # [num_seqs, max_len, num_kv_heads, head_dim]
    v = v_cache[pages].flatten(1, 2)[:, :max_len]
    group = num_heads // num_kv_heads
    k = k.repeat_interleave(group, dim=2).transpose(1, 2)  # [num_seqs, num_heads, max_len, head_dim]
    v = v.repeat_interleave(group, dim=2).transpose(1, 2)
    valid = torch.arange(max_len, device=query.device)[None, :] < metadata.seq_lens[:, None]
    q = query.unsqueeze(2)  # [num_seqs, num_heads, 1, head_dim]
    out = F.scaled_dot_product_attention(q, k.to(q.dtype), v.to(q.dtype), attn_mask=valid[:, None, None, :],
                                         scale=scale)
    return out.squeeze(2)
