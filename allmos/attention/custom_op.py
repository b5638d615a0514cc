"""``torch.ops.allmos.attention``: one attention layer as a single opaque op for ``torch.compile``.

The compiled forward traces everything around attention (norms, RoPE, MLP, projections) into fused
kernels and calls this op once per layer. The op reads the KV cache, the metadata and the backend from
the forward context at run time, so they are neither traced nor guarded on: one compiled graph serves
every batch of sequences, whatever their lengths and block tables. (vLLM splits its graph at attention
the same way.) The op writes the KV cache as a side effect; the cache is not one of its arguments, so
the graph sees a function of ``query``, ``key`` and ``value`` only, and calls it in program order.

Registered through ``torch.library.Library`` directly rather than the ``custom_op`` decorator, whose
Python wrappers cost more per call than the attention of a short decode step.
"""

from __future__ import annotations

import torch

from allmos.attention.context import get_forward_context
from allmos.attention.torch_ref import KVScales

_SCHEMA = ("attention(Tensor query, Tensor key, Tensor value, Tensor layer_index, float scale, Tensor? k_scale=None, "
           "Tensor? v_scale=None, Tensor? k_center=None) -> Tensor")
_LIBRARY = torch.library.Library("allmos", "FRAGMENT")  # holds the registration for the process lifetime


def _attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, layer_index: torch.Tensor,
               scale: float, k_scale: torch.Tensor | None = None, v_scale: torch.Tensor | None = None,
               k_center: torch.Tensor | None = None) -> torch.Tensor:
    """Store ``key``/``value`` into layer ``layer_index``'s cache and attend (``AttentionBackend.forward``).

    query [num_tokens, num_heads, head_dim]; key, value [num_tokens, num_kv_heads, head_dim]; layer_index: a 0-d
    int64 CPU tensor (an input of the graph, so one compiled layer serves every layer); k_scale, v_scale
    [1] and k_center [num_kv_heads, head_dim]: the layer's fp8 cache scales (``allmos.attention.torch_ref.KVScales``;
    None: 1.0, no center), inputs of the op so a compiled graph reads their current values."""
    ctx = get_forward_context()
    k_cache, v_cache = ctx.kv_caches[int(layer_index)]
    kv_scales = None if k_scale is None or v_scale is None else KVScales(k_scale, v_scale, k_center)
    return ctx.backend.forward(query, key, value, k_cache, v_cache, ctx.metadata, scale, kv_scales)


def _attention_fake(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, layer_index: torch.Tensor,
                    scale: float, k_scale: torch.Tensor | None = None, v_scale: torch.Tensor | None = None,
                    k_center: torch.Tensor | None = None) -> torch.Tensor:
    return torch.empty_like(query)  # [num_tokens, num_heads, head_dim]


_LIBRARY.define(_SCHEMA)
_LIBRARY.impl("attention", _attention, "CompositeExplicitAutograd")
_LIBRARY._register_fake("attention", _attention_fake)

attention = torch.ops.allmos.attention.default
