"""The attention layer: hands q/k/v to the backend with this layer's KV cache and its fp8 cache scales."""

from __future__ import annotations

import torch
from torch import nn

from allmos.attention import custom_op
from allmos.attention.context import get_forward_context
from allmos.attention.torch_ref import FP8_KV_DTYPE, KVScales


class Attention(nn.Module):
    def __init__(self, layer_idx: int, num_heads: int, num_kv_heads: int, head_dim: int, scale: float) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        # the index as a tensor for the compiled CPU forward's attention op: an input of the graph rather than a
        # constant in it, so that one compiled decoder layer serves every layer (allmos.engine.cpu_compile)
        self.register_buffer("layer_index", torch.tensor(layer_idx, dtype=torch.int64), persistent=False)
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.scale = scale
        # fp8 KV cache (kv_cache_dtype="fp8"): stored K = (K - k_center) / k_scale, V / v_scale
        # (allmos.attention.torch_ref). 1.0 and 0 until calibrated (allmos.engine.kv_calibration); tensors the
        # kernels read, so values set in place reach captured CUDA graphs.
        self.register_buffer("k_scale", torch.ones(1, dtype=torch.float32), persistent=False)
        self.register_buffer("v_scale", torch.ones(1, dtype=torch.float32), persistent=False)
        self.register_buffer("k_center", torch.zeros(num_kv_heads, head_dim, dtype=torch.float32), persistent=False)

    def forward(
        self,
        q: torch.Tensor,  # [num_tokens, num_heads, head_dim]
        k: torch.Tensor | None,  # [num_tokens, num_kv_heads, head_dim]
        v: torch.Tensor | None,  # [num_tokens, num_kv_heads, head_dim]
    ) -> torch.Tensor:  # [num_tokens, num_heads, head_dim]
        """Attention of q over this layer's cache after storing k/v; k = v = None when the caller already
        stored them (only with a backend whose ``accepts_stored_kv`` is True)."""
        if torch.compiler.is_compiling():  # one opaque op in the compiled graph (see attention.custom_op)
            return custom_op.attention(q, k, v, self.layer_index, self.scale, self.k_scale, self.v_scale, self.k_center)
        ctx = get_forward_context()
        k_cache, v_cache = ctx.kv_caches[self.layer_idx]
        # only an fp8 cache reads the scales (AttentionBackend.forward): skip building them for any other
        kv_scales = self.kv_scales if k_cache.dtype == FP8_KV_DTYPE else None
        return ctx.backend.forward(q, k, v, k_cache, v_cache, ctx.metadata, self.scale, kv_scales)

    @property
    def kv_scales(self) -> KVScales:
        """This layer's fp8 cache scales (views of the buffers above)."""
        return KVScales(self.k_scale, self.v_scale, self.k_center)
