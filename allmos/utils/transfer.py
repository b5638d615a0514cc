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


class StagingRing:
    """Host buffers for the repeated non-blocking uploads of one destination, reused in turn instead of
    pinning a fresh copy per upload.

    ``take()`` returns the next slot as a numpy array to fill; ``upload(dst, count)`` queues the copy of its
    first ``count`` entries into ``dst`` and records an event. A slot is taken again only after the event of
    its previous upload has passed (normally long ago: ``slots`` uploads back), so no copy reads a slot
    that is being refilled. On the CPU the slot is ordinary memory and the copy runs at once.
    """

    def __init__(self, size: int, dtype: torch.dtype, device: torch.device, slots: int = 2) -> None:
        pinned = device.type == "cuda"
        self._tensors = [torch.zeros(size, dtype=dtype, pin_memory=pinned) for _ in range(slots)]
        self._arrays = [t.numpy() for t in self._tensors]
        self._pinned = pinned
        self._events: list[torch.cuda.Event | None] = [None] * slots  # of each slot's last upload
        self._next = 0

    def take(self) -> np.ndarray:
        """The slot to fill next (its previous upload has run)."""
        event = self._events[self._next]
        if event is not None:
            event.synchronize()
        return self._arrays[self._next]

    def upload(self, dst: torch.Tensor, count: int) -> None:
        """Copy the first ``count`` entries of the slot ``take`` returned into ``dst[:count]``, then move on."""
        i = self._next
        dst[:count].copy_(self._tensors[i][:count], non_blocking=True)
        if self._pinned:
            if self._events[i] is None:
                self._events[i] = torch.cuda.Event()
            self._events[i].record()
        self._next = (i + 1) % len(self._tensors)
