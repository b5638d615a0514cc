"""Reading a (possibly lazy) checkpoint tensor, or just this rank's slice of it."""

from __future__ import annotations

from typing import Any

import torch


def shape_of(loaded: Any) -> tuple[int, ...]:
    """Shape of a torch tensor or a safetensors slice, without reading its data."""
    if isinstance(loaded, torch.Tensor):
        return tuple(loaded.shape)
    return tuple(loaded.get_shape())


def narrow(loaded: Any, dim: int, start: int, size: int) -> torch.Tensor:
    """``loaded[..., start:start + size, ...]`` along ``dim``; reads only that part of a lazy slice."""
    if isinstance(loaded, torch.Tensor):
        return loaded.narrow(dim, start, size)
    index = tuple(slice(None) for _ in range(dim)) + (slice(start, start + size),)
    return loaded[index]


def materialize(loaded: Any) -> torch.Tensor:
    return loaded if isinstance(loaded, torch.Tensor) else loaded[:]


def copy_checked(param: torch.Tensor, tensor: torch.Tensor, what: str) -> None:
    """Copy ``tensor`` into ``param`` or raise ValueError naming ``what`` when shapes differ."""
    if tuple(param.shape) != tuple(tensor.shape):
        raise ValueError(f"{what}: checkpoint shape {tuple(tensor.shape)} does not match the model's "
                         f"{tuple(param.shape)} (is config.json the checkpoint's own?)")
    param.data.copy_(tensor)
