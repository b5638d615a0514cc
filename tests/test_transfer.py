"""Packed host-to-device buffers: every part 16-byte aligned (one Triton variant whatever the sizes)."""

from __future__ import annotations

import random

import numpy as np
import torch

from allmos.engine.sampler import SamplingRow, SamplingTensors
from allmos.utils.transfer import ALIGN_BYTES, pack_aligned, split_packed


def test_pack_aligned_round_trips_and_aligns_every_part():
    rng = random.Random(0)
    for dtype in (np.int64, np.int32, np.float32):
        for _ in range(50):
            parts = [np.array([rng.randrange(-99, 99) for _ in range(rng.randrange(0, 9))], dtype=dtype)
                     for _ in range(rng.randrange(1, 6))]
            buffer, starts = pack_aligned(parts, dtype)
            assert all(start * buffer.itemsize % ALIGN_BYTES == 0 for start in starts)
            views = split_packed(torch.from_numpy(buffer), starts, [p.size for p in parts])
            for view, part in zip(views, parts, strict=True):
                assert np.array_equal(view.numpy(), part)
                assert view.data_ptr() % ALIGN_BYTES == 0


def test_sampling_tensors_rows_are_aligned_for_any_batch_size():
    for batch in (1, 2, 3, 5, 7):
        rows = [SamplingRow(temperature=0.5 + i / 10, seed=i + 1) for i in range(batch)]
        t = SamplingTensors.build(rows, 100, torch.device("cpu"))
        for name in ("inv_temperature", "noise_scale", "top_p", "min_p", "top_k", "seeds", "positions",
                     "noise_key_lo", "noise_key_hi"):
            tensor = getattr(t, name)
            assert tensor.shape == (batch,) and tensor.is_contiguous(), name
            assert tensor.data_ptr() % ALIGN_BYTES == 0, name
        assert torch.allclose(t.inv_temperature, torch.tensor([1 / (0.5 + i / 10) for i in range(batch)]))
