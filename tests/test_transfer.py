"""Packed host-to-device buffers: every part 16-byte aligned (one Triton variant whatever the sizes)."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from allmos.engine.sampler import SamplingRow, SamplingTensors
from allmos.utils.transfer import ALIGN_BYTES, StagingRing, pack_aligned, split_packed


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


def _ring_round_trip(device: torch.device) -> None:
    ring = StagingRing(8, torch.int64, device, slots=2)
    dst = torch.full((8,), -1, dtype=torch.int64, device=device)
    slots = []
    for step in range(5):
        a = ring.take()
        slots.append(id(a))
        a[:3] = [step, step + 1, step + 2]
        ring.upload(dst, 3)
        assert dst.tolist() == [step, step + 1, step + 2] + [-1] * 5
    assert slots[0] == slots[2] == slots[4] and slots[1] == slots[3] and slots[0] != slots[1]


def test_staging_ring_uploads_and_reuses_its_slots_in_turn():
    _ring_round_trip(torch.device("cpu"))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_staging_ring_on_gpu():
    _ring_round_trip(torch.device("cuda"))
