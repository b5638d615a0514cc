"""Per-forward state, set by the model runner around a forward pass; read by the attention layers (metadata,
KV caches, backend) and by the decoder's reference RoPE path (``rope_seq_lens`` for dynamic NTK scaling)."""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from allmos.attention.backend import AttentionBackend
from allmos.attention.metadata import AttentionMetadata


@dataclass
class ForwardContext:
    metadata: AttentionMetadata
    kv_caches: list[tuple[torch.Tensor, torch.Tensor]]  # per layer: (k_cache, v_cache)
    backend: AttentionBackend
    rope_seq_lens: torch.Tensor | None = None  # [num_tokens] per-token sequence length (dynamic RoPE)


_current: contextvars.ContextVar[ForwardContext | None] = contextvars.ContextVar("allmos_forward", default=None)


@contextlib.contextmanager
def forward_context(ctx: ForwardContext) -> Iterator[ForwardContext]:
    token = _current.set(ctx)
    try:
        yield ctx
    finally:
        _current.reset(token)


def get_forward_context() -> ForwardContext:
    ctx = _current.get()
    if ctx is None:
        raise RuntimeError("attention ran outside a forward_context(); the model runner sets it")
    return ctx
