"""Programmatic dependent launch (PDL, Hopper and newer): a kernel may start while the one before it finishes.

A kernel launched with ``launch_pdl=True`` can be scheduled as soon as every program of the kernel before
it has called ``gdc_launch_dependents`` (or exited). It may do work that touches no activations (load its
weights) and must call ``gdc_wait`` before it reads or writes anything an earlier kernel reads or writes:
``gdc_wait`` returns once the earlier kernel has completed and its writes are visible. Every kernel here that
is launched with PDL waits unconditionally, so completion stays ordered along the stream (and inside CUDA
graphs, which keep the launch attribute). A kernel that only calls ``gdc_launch_dependents`` (launched
normally) lets a PDL kernel after it start early and changes nothing else.

A kernel takes a ``PDL`` constexpr and calls ``pdl_enter(PDL)`` (both calls, in that order) where its
dependent work begins; its launch passes ``**pdl_kwargs(device)``. Both calls are compiled in only where
``pdl_enabled`` is true, so older GPUs and the interpreter never see them.
"""

from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl

try:  # Triton 3.3+
    from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait
except ImportError:
    gdc_launch_dependents = gdc_wait = None

__all__ = ["pdl_enabled", "pdl_enter", "pdl_kwargs"]


@functools.cache
def pdl_enabled(device: torch.device) -> bool:
    """Whether kernels on ``device`` use PDL: a CUDA device of compute capability 9.0 or more, a Triton that
    has it, not the interpreter, and ``ALLMOS_PDL`` not set to 0 (read once per process and device)."""
    if gdc_wait is None or device.type != "cuda" or os.environ.get("TRITON_INTERPRET") == "1":
        return False
    if os.environ.get("ALLMOS_PDL", "1") == "0":
        return False
    return torch.cuda.get_device_capability(device) >= (9, 0)


def pdl_kwargs(device: torch.device) -> dict[str, bool]:
    """Launch keywords of a kernel with a ``PDL`` constexpr on ``device``: its value, and ``launch_pdl`` with it."""
    return {"PDL": True, "launch_pdl": True} if pdl_enabled(device) else {"PDL": False}


@triton.jit
def pdl_enter(PDL: tl.constexpr):
    """With ``PDL``: let the next launch start, then wait until the kernel before this one has completed and its
    writes are visible. Everything after this may read and write activations."""
    if PDL:
        gdc_launch_dependents()
        gdc_wait()
