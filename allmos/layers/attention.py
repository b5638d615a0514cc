"""The attention layer: hands q/k/v to the backend with this layer's KV cache."""

from __future__ import annotations

import torch
from torch import nn

from allmos.attention import custom_op
from allmos.attention.context import get_forward_context


class Attention(nn.Module):
    def __init__(self, layer_idx: int, num_heads: int, num_kv_heads: int, head_dim: int, scale: float) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.scale = scale

    def forward(
        self,
        q: torch.Tensor,  # [num_tokens, num_heads, head_dim]
        k: torch.Tensor | None,  # [num_tokens, num_kv_heads, head_dim]
        v: torch.Tensor | None,  # [num_tokens, num_kv_heads, head_dim]
    ) -> torch.Tensor:  # [num_tokens, num_heads, head_dim]
        """Attention of q over this layer's cache after storing k/v; k = v = None when the caller already
        stored them (only with a backend whose ``accepts_stored_kv`` is True)."""
        if torch.compiler.is_compiling():  # one opaque op in the compiled graph (see attention.custom_op)
            return custom_op.attention(q, k, v, self.layer_idx, self.scale)
        ctx = get_forward_context()
        k_cache, v_cache = ctx.kv_caches[self.layer_idx]
        return ctx.backend.forward(q, k, v, k_cache, v_cache, ctx.metadata, self.scale)
