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
