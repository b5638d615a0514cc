"""The torch backend against the per-sequence reference, with garbage in unused cache slots.

Contract (attention/metadata.py): slots past a sequence's length hold finite values (the runner zero-fills
the cache at allocation); the torch decode path may read them but must mask them out."""

from __future__ import annotations

import torch

from allmos.attention.metadata import AttentionMetadata
from allmos.attention.torch_backend import TorchAttentionBackend
from allmos.attention.torch_ref import paged_attention_ref


def test_decode_ignores_garbage_slots_and_matches_reference():
    torch.manual_seed(0)
    num_blocks, block_size, kv_heads, heads, dim = 12, 4, 2, 4, 16
    k_cache = torch.randn(num_blocks, block_size, kv_heads, dim) * 1e4  # stale or garbage, but finite
    v_cache = torch.randn_like(k_cache) * 1e4
    seq_lens = [5, 1, 9]
    tables = torch.tensor([[3, 7, 0], [5, 0, 0], [1, 2, 11]], dtype=torch.int32)
    for s, n in enumerate(seq_lens):  # fill the first n - 1 slots: the new token is stored by forward
        for t in range(n - 1):
            k_cache[tables[s, t // block_size], t % block_size] = torch.randn(kv_heads, dim)
            v_cache[tables[s, t // block_size], t % block_size] = torch.randn(kv_heads, dim)
    q = torch.randn(3, heads, dim)
    k, v = torch.randn(3, kv_heads, dim), torch.randn(3, kv_heads, dim)
    slots = torch.tensor([int(tables[s, (n - 1) // block_size]) * block_size + (n - 1) % block_size
                          for s, n in enumerate(seq_lens)])
    md = AttentionMetadata(slot_mapping=slots, query_start_loc=torch.arange(4, dtype=torch.int32),
                           seq_lens=torch.tensor(seq_lens, dtype=torch.int32), block_tables=tables,
                           max_query_len=1, max_seq_len=max(seq_lens), is_decode=True,
                           query_start_loc_cpu=[0, 1, 2, 3], seq_lens_cpu=seq_lens)
    out = TorchAttentionBackend().forward(q, k, v, k_cache, v_cache, md, scale=dim**-0.5)
    ref = paged_attention_ref(q, k_cache, v_cache, [0, 1, 2, 3], seq_lens, tables, dim**-0.5)
    assert not out.isnan().any()
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
