"""The GPU attention backend over allmos's Triton kernels (``allmos.kernels``)."""

from __future__ import annotations

import dataclasses

import torch

from allmos.attention.backend import AttentionBackend
from allmos.attention.metadata import AttentionMetadata
from allmos.attention.torch_ref import KVScales
from allmos.kernels.cascade_attention import (
    CascadeTiles,
    CascadeWorkspace,
    cascade_block_m,
    cascade_decode_attention,
    choose_prefix_splits,
    members_per_tile,
    prefix_workspace_rows,
)
from allmos.kernels.decode_attention import DecodeWorkspace, choose_num_splits, paged_decode_attention
from allmos.kernels.prefill_attention import paged_prefill_attention
from allmos.kernels.store_kv import store_kv_cache
from allmos.models.model_config import ModelConfig


class TritonAttentionBackend(AttentionBackend):
    """Store K/V, then paged prefill (varlen, causal with offset) or paged decode (GQA-grouped, split-KV).

    Decode split counts depend only on the batch size and ``max_model_len`` (host-known), so a captured
    CUDA graph stays valid whatever the sequences' current lengths. ``fold_split_merge`` (set with the
    decode kernels, before capture) merges split decode inside the attention launch instead of a second one.
    With ``enable_cascade``, decode steps whose metadata carries cascade groups attend to each group's shared
    prefix once (``allmos.kernels.cascade_attention``); prefix split counts depend only on the batch size.
    """

    name = "triton"
    accepts_stored_kv = True  # the decoder's fused q/k-norm + RoPE + K/V store kernel stores them

    def __init__(self, model_config: ModelConfig, tp_size: int, max_num_seqs: int, max_model_len: int,
                 device: torch.device, enable_cascade: bool = False) -> None:
        """Workspaces for ``max_num_seqs`` decode rows of this rank's heads (``tp_size`` ranks in all)."""
        num_heads = model_config.num_heads_per_rank(tp_size)
        self.num_kv_heads = model_config.num_kv_heads_per_rank(tp_size)
        self.max_model_len = max_model_len
        # the CPU (Triton interpreter, tests) gets an H100's count
        self.num_sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 132
        max_splits = choose_num_splits(1, self.num_kv_heads, max_model_len, self.num_sms)
        self.workspace = DecodeWorkspace.allocate(max_num_seqs, num_heads, model_config.head_dim, max_splits, device,
                                                  num_kv_heads=self.num_kv_heads)
        self.fold_split_merge = False
        self.cascade_workspace = None
        if enable_cascade:
            group = num_heads // self.num_kv_heads
            self.cascade_members_per_tile = members_per_tile(group, cascade_block_m(group, model_config.head_dim))
            rows = prefix_workspace_rows(max_num_seqs, self.cascade_members_per_tile, self.num_kv_heads,
                                         max_model_len, self.num_sms)
            self.cascade_workspace = CascadeWorkspace.allocate(rows, num_heads, model_config.head_dim, device)

    def prefix_splits_for(self, num_seqs: int) -> int:
        """Cascade prefix key splits for a decode batch (host-known: fixed per CUDA graph)."""
        return choose_prefix_splits(num_seqs, self.cascade_members_per_tile or 1, self.num_kv_heads,
                                    self.max_model_len, self.num_sms)

    def splits_for(self, num_seqs: int) -> int:
        """Split count for a decode batch; small batches are rounded up to a power of two (the CUDA-graph
        capture sizes) so eager and captured runs of the same batch sum in the same order."""
        bucket = 1 << (num_seqs - 1).bit_length() if num_seqs <= 16 else num_seqs
        return choose_num_splits(bucket, self.num_kv_heads, self.max_model_len, self.num_sms)

    def prepare(self, metadata: AttentionMetadata) -> AttentionMetadata:
        if not metadata.is_decode:
            return metadata
        prefix_splits = self.prefix_splits_for(metadata.num_seqs) if metadata.cascade_tiles is not None else 1
        return dataclasses.replace(metadata, num_splits=self.splits_for(metadata.num_seqs),
                                   num_prefix_splits=prefix_splits)

    def forward(self, query, key, value, k_cache, v_cache, metadata: AttentionMetadata, scale: float,
                kv_scales: KVScales | None = None):
        if key is not None:  # None: already stored by the caller (accepts_stored_kv)
            store_kv_cache(key, value, k_cache, v_cache, metadata.slot_mapping, kv_scales)
        if metadata.is_decode and metadata.cascade_tiles is not None:  # never with an fp8 cache (see make_backend)
            groups = CascadeTiles(metadata.cascade_prefix_blocks, metadata.cascade_members, metadata.cascade_tiles)
            return cascade_decode_attention(
                query, k_cache, v_cache, metadata.seq_lens, metadata.block_tables, groups, scale,
                num_prefix_splits=metadata.num_prefix_splits, num_splits=metadata.num_splits,
                workspace=self.cascade_workspace, decode_workspace=self.workspace, fold_merge=self.fold_split_merge)
        if metadata.is_decode:
            return paged_decode_attention(query, k_cache, v_cache, metadata.seq_lens, metadata.block_tables, scale,
                                          num_splits=metadata.num_splits, workspace=self.workspace,
                                          fold_merge=self.fold_split_merge, kv_scales=kv_scales)
        return paged_prefill_attention(query, k_cache, v_cache, metadata.query_start_loc, metadata.seq_lens,
                                       metadata.block_tables, scale, metadata.max_query_len, kv_scales=kv_scales)

    def supports_cuda_graphs(self) -> bool:
        return True
