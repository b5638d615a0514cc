"""Whole-message reads and writes on raw file descriptors (pipes between allmos processes)."""

from __future__ import annotations

import os


def read_exact(fd: int, size: int) -> bytes | None:
    """``size`` bytes from ``fd``, or None at end of file."""
    chunks, remaining = [], size
    while remaining:
        chunk = os.read(fd, remaining)
        if not chunk:
            return None
        chunks.append(chunk)
        remaining -= len(chunk)
    return b"".join(chunks)


def write_all(fd: int, data: bytes | memoryview) -> None:
    """Write every byte of ``data`` to ``fd`` (a pipe may take it in pieces); raises OSError if the reader
    is gone."""
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]
