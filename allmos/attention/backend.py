"""The attention backend interface: every backend writes new K/V into the paged cache and attends
over it, following the layout in ``allmos.attention.metadata``."""

from __future__ import annotations

import abc

import torch

from allmos.attention.metadata import AttentionMetadata
from allmos.attention.torch_ref import KVScales


class AttentionBackend(abc.ABC):
    """Stateless apart from preallocated workspaces; one instance serves every layer."""

    name: str = "abstract"
    accepts_stored_kv: bool = False  # forward takes key = value = None: the caller stored them (fused kernel)
    # sequences per prefix tile when the backend runs cascade decode (the runner then fills the metadata's
    # cascade fields, allmos.attention.cascade); None: it does not
    cascade_members_per_tile: int | None = None

    def prepare(self, metadata: AttentionMetadata) -> AttentionMetadata:
        """Add backend-specific fields (split counts, workspaces) once per forward pass, before any
        layer runs. Must not synchronize with the device when ``metadata.is_decode`` (CUDA graphs)."""
        return metadata

    @abc.abstractmethod
    def forward(
        self,
        query: torch.Tensor,  # [num_tokens, num_heads, head_dim]
        key: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
        value: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
        k_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
        v_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
        metadata: AttentionMetadata,
        scale: float,
        kv_scales: KVScales | None = None,  # the layer's fp8 cache scales (None: 1.0, no center)
    ) -> torch.Tensor:  # [num_tokens, num_heads, head_dim]
        """Store ``key``/``value`` at ``metadata.slot_mapping``, then causal attention of each query
        over its sequence's cached context (``seq_lens``).

        An fp8 cache stores and reads K/V through ``kv_scales`` as ``allmos.attention.torch_ref`` defines;
        kernels read the scales from device memory at run time."""

    def supports_cuda_graphs(self) -> bool:
        """Whether decode forwards can be captured (no host sync, fixed-size launches)."""
        return False
