"""Host-to-device copies that do not block the host (pinned staging + non_blocking)."""

from __future__ import annotations

import numpy as np
import torch


def to_device(x: torch.Tensor | np.ndarray, device: torch.device | str) -> torch.Tensor:
    """Copy a host tensor/array to ``device`` without waiting for the device's queued work.

    A pageable-memory copy would make the host wait until the copy ran, i.e. until every kernel queued
    before it finished; staging through pinned memory lets the host go on preparing the next step.
    """
    t = torch.from_numpy(x) if isinstance(x, np.ndarray) else x
    device = torch.device(device)
    if device.type != "cuda":
        return t.to(device)
    return t.pin_memory().to(device, non_blocking=True)


def staged(x: np.ndarray, device: torch.device) -> torch.Tensor:
    """``x`` as the source of a non-blocking copy to ``device``: in pinned memory for CUDA (the caching
    host allocator keeps it alive until the copy has run, so the host may reuse nothing too early)."""
    t = torch.from_numpy(x)
    return t.pin_memory() if device.type == "cuda" else t


ALIGN_BYTES = 16  # Triton specializes kernels on 16-byte pointer alignment; keep every packed part aligned


def pack_aligned(parts: list[np.ndarray], dtype: np.dtype | type) -> tuple[np.ndarray, list[int]]:
    """Concatenate 1-D arrays into one buffer of ``dtype`` in which every part starts at a multiple of
    ``ALIGN_BYTES`` (zero padding between parts); returns (buffer, start index of each part).

    One host-to-device copy then serves several tensors, and each view of it has the same alignment
    whatever the part sizes are this step, so Triton compiles one variant instead of one per alignment.
    """
    step = max(1, ALIGN_BYTES // np.dtype(dtype).itemsize)
    starts, total = [], 0
    for part in parts:
        starts.append(total)
        total += -(-part.size // step) * step
    buffer = np.zeros(total, dtype=dtype)
    for start, part in zip(starts, parts, strict=True):
        buffer[start:start + part.size] = part
    return buffer, starts


def split_packed(buffer: torch.Tensor, starts: list[int], sizes: list[int]) -> list[torch.Tensor]:
    """The views of ``pack_aligned``'s parts in a (device) copy of its buffer."""
    return [buffer[start:start + size] for start, size in zip(starts, sizes, strict=True)]
