"""Per-forward attention metadata shared by every attention backend.

Layout invariants (all backends, all kernels):
- New tokens of all sequences are flattened: sequence ``s`` owns query rows
  ``query_start_loc[s] : query_start_loc[s + 1]``.
- ``seq_lens[s]`` is the sequence's context length *after* this step (cached + new tokens);
  its new tokens sit at absolute positions ``seq_lens[s] - q_len(s) ... seq_lens[s] - 1``, so the
  causal mask is offset by the cached length (prefix hits, later prefill chunks and decode are the
  same case).
- The KV cache of one layer is ``k_cache, v_cache``, each ``[num_blocks, block_size, num_kv_heads, head_dim]``.
  Token ``t`` of sequence ``s`` lives in block ``block_tables[s, t // block_size]`` at offset
  ``t % block_size``; ``slot_mapping[i] = block * block_size + offset`` for new token ``i`` (``-1``: skip,
  used for padded rows of captured CUDA graphs).
- New K/V are written into the cache *before* attention runs, so attention reads every key,
  including this step's, from the cache.
- Slots past a sequence's length hold finite values (the runner zero-fills the cache at allocation;
  later they hold stale K/V): a backend may read them as long as it masks them out.
- Cascade (decode steps only; all three fields None otherwise): sequence ``s`` shares its first
  ``cascade_prefix_blocks[s]`` blocks (0: none) with the other members of its group, and keeps at least its
  last token after them. ``cascade_tiles`` rows are (leader sequence, first index into ``cascade_members``,
  member count) with count 0 for unused rows; its row count is fixed per batch size
  (``allmos.attention.cascade.tile_capacity``). A backend without cascade may ignore the fields: attention
  over prefix plus suffix is attention over the whole context.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class AttentionMetadata:
    """Everything attention needs for one forward pass; built by the model runner."""

    slot_mapping: torch.Tensor  # [num_tokens] int64
    query_start_loc: torch.Tensor  # [num_seqs + 1] int32
    seq_lens: torch.Tensor  # [num_seqs] int32
    block_tables: torch.Tensor  # [num_seqs, max_blocks_per_seq] int32 (padding entries are never read)
    max_query_len: int
    max_seq_len: int
    is_decode: bool  # every sequence has exactly one new token
    query_start_loc_cpu: list[int] | None = None  # host copies, used by the torch backend
    seq_lens_cpu: list[int] | None = None
    num_splits: int = 1  # decode: key-range splits (chosen by the backend's prepare, fixed per CUDA graph)
    cascade_prefix_blocks: torch.Tensor | None = None  # [num_seqs] int32, shared leading blocks (0: none)
    cascade_members: torch.Tensor | None = None  # [num_seqs] int32, sequence indices grouped by prefix
    cascade_tiles: torch.Tensor | None = None  # [tile_capacity, 3] int32 (leader, first member, count)
    num_prefix_splits: int = 1  # cascade: prefix key splits (chosen by the backend's prepare, fixed per graph)

    @property
    def num_seqs(self) -> int:
        return self.seq_lens.shape[0]
