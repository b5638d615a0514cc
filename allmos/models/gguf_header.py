"""The tensor table of a GGUF file (name -> GGML type), read from its header without parsing metadata values.

``gguf.GGUFReader`` builds every metadata field (a whole tokenizer vocabulary) and takes seconds; the
engine only needs the types of the weights when it picks the CPU weight format. Layout (GGUF v2/v3,
little-endian): magic ``GGUF``, version u32, tensor count u64, metadata count u64; each metadata entry is a
key string (u64 length + bytes), a value type u32 and the value (arrays: element type u32, count u64,
elements); then per tensor: name string, n_dims u32, n_dims x u64 dims, type u32, data offset u64.
"""

from __future__ import annotations

import mmap
import struct
from pathlib import Path

# metadata value type -> size in bytes of one value (8: string, 9: array are variable)
_FIXED_SIZES = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}
_STRING, _ARRAY = 8, 9


def gguf_tensor_types(path: Path) -> dict[str, int]:
    """``{tensor name: GGML type id}`` of a GGUF file; ValueError when it is not a GGUF v2/v3 file."""
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
        if buf[:4] != b"GGUF":
            raise ValueError(f"{path} is not a GGUF file")
        version, num_tensors, num_kv = struct.unpack_from("<IQQ", buf, 4)
        if version not in (2, 3):
            raise ValueError(f"{path}: GGUF version {version} is not supported (2 or 3)")
        pos = 24
        for _ in range(num_kv):
            pos = _skip_string(buf, pos)
            (value_type,) = struct.unpack_from("<I", buf, pos)
            pos = _skip_value(buf, pos + 4, value_type)
        types = {}
        for _ in range(num_tensors):
            (length,) = struct.unpack_from("<Q", buf, pos)
            name = bytes(buf[pos + 8:pos + 8 + length]).decode("utf-8")
            pos += 8 + length
            (n_dims,) = struct.unpack_from("<I", buf, pos)
            pos += 4 + 8 * n_dims
            (ggml_type,) = struct.unpack_from("<I", buf, pos)
            types[name] = ggml_type
            pos += 4 + 8
        return types


def _skip_string(buf, pos: int) -> int:
    (length,) = struct.unpack_from("<Q", buf, pos)
    return pos + 8 + length


def _skip_value(buf, pos: int, value_type: int) -> int:
    if value_type in _FIXED_SIZES:
        return pos + _FIXED_SIZES[value_type]
    if value_type == _STRING:
        return _skip_string(buf, pos)
    if value_type == _ARRAY:
        element_type, count = struct.unpack_from("<IQ", buf, pos)
        pos += 12
        if element_type in _FIXED_SIZES:
            return pos + count * _FIXED_SIZES[element_type]
        for _ in range(count):
            pos = _skip_value(buf, pos, element_type)
        return pos
    raise ValueError(f"unknown GGUF metadata value type {value_type}")
