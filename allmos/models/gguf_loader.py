"""Convert a GGUF checkpoint into a Hugging Face-format folder, once, and cache it.

The engine only knows how to load Hugging Face folders (``config.json``, ``*.safetensors`` with HF
parameter names, tokenizer files, ``generation_config.json``). A ``.gguf`` file is therefore converted
into such a folder the first time it is used, and every later use loads that folder. The cache key covers
the file (path, size, mtime) and the converter itself (this module's source and the versions of the packages
it uses), so a changed file or a changed converter never reuses an old conversion.

Invariant: a folder produced here is complete. It is written under a hidden temporary name next to its
final place and renamed into place only after every file is written, so an existing folder always
holds a finished conversion and an interrupted one leaves nothing at the final path.

Facts the conversion relies on (from llama.cpp's ``convert_hf_to_gguf.py`` and the GGUF spec):

* GGUF stores tensor dims innermost-first (``ne``), so a Hugging Face ``[out, in]`` matrix appears
  with shape ``[in, out]``; the dequantized numpy array is row-major ``[out, in]``.
* For the ``llama`` architecture llama.cpp permutes the rows of ``q_proj``/``k_proj`` (weight and bias)
  from the Hugging Face "rotate-half" rope layout to the interleaved GPT-J layout. Within each head
  (``n_head`` for Q, ``n_head_kv`` for K) HF row ``j * head_dim/2 + i`` becomes GGUF row ``2 * i + j``.
  ``qwen2``/``qwen3`` use the NeoX rope in llama.cpp and are stored unpermuted.
* Llama 3.1-style rope scaling is not stored as metadata but as a ``rope_freqs.weight`` tensor holding
  one divisor per rotary frequency; the scaling parameters are recovered from it.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import shutil
import struct
import tempfile
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any

import numpy as np
import torch

SUPPORTED_ARCHITECTURES = ("llama", "qwen2", "qwen3")

# Packages whose versions change a conversion's output (gguf reads the file, transformers builds the tokenizer).
_CONVERTER_PACKAGES = ("gguf", "transformers")

MAX_SHARD_BYTES = 2 * 1024**3

_SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

# Large tokenizer arrays are read by transformers' tokenizer builder, not by the config builder.
_SKIPPED_METADATA = frozenset(
    {"tokenizer.ggml.tokens", "tokenizer.ggml.merges", "tokenizer.ggml.token_type", "tokenizer.ggml.scores"}
)

_GLOBAL_TENSOR_NAMES = MappingProxyType(
    {
        "token_embd.weight": "model.embed_tokens.weight",
        "output_norm.weight": "model.norm.weight",
        "output.weight": "lm_head.weight",
    }
)

_LAYER_TENSOR_NAMES = MappingProxyType(
    {
        "attn_norm": "input_layernorm",
        "ffn_norm": "post_attention_layernorm",
        "attn_q": "self_attn.q_proj",
        "attn_k": "self_attn.k_proj",
        "attn_v": "self_attn.v_proj",
        "attn_output": "self_attn.o_proj",
        "attn_q_norm": "self_attn.q_norm",
        "attn_k_norm": "self_attn.k_norm",
        "ffn_gate": "mlp.gate_proj",
        "ffn_up": "mlp.up_proj",
        "ffn_down": "mlp.down_proj",
    }
)

_LAYER_TENSOR_RE = re.compile(r"^blk\.(\d+)\.(\w+)\.(weight|bias)$")

_ROPE_FREQS_TENSOR = "rope_freqs.weight"

# GGUF metadata value type ids (the GGUF spec's gguf_type) and the byte sizes of the scalar ones.
_UINT32_TYPE, _STRING_TYPE, _ARRAY_TYPE = 4, 8, 9
_SCALAR_SIZES = MappingProxyType({0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8})

# Llama 3.x rope scaling always used low/high frequency factors 1 and 4; the original context varies.
_LLAMA3_ORIGINAL_CONTEXTS = (8192, 4096, 16384, 32768, 131072)


@dataclass(frozen=True)
class ArchSpec:
    """How one GGUF ``general.architecture`` maps onto a Hugging Face model class."""

    hf_architecture: str
    model_type: str
    permute_qk: bool  # llama.cpp permuted Q/K rows for the interleaved rope
    extra_config: tuple[tuple[str, Any], ...] = ()


_ARCH_SPECS = MappingProxyType(
    {
        "llama": ArchSpec("LlamaForCausalLM", "llama", permute_qk=True, extra_config=(("mlp_bias", False),)),
        "qwen2": ArchSpec(
            "Qwen2ForCausalLM", "qwen2", permute_qk=False, extra_config=(("use_sliding_window", False),)
        ),
        "qwen3": ArchSpec(
            "Qwen3ForCausalLM",
            "qwen3",
            permute_qk=False,
            extra_config=(("use_sliding_window", False), ("attention_bias", False)),
        ),
    }
)


@dataclass(frozen=True)
class TensorEntry:
    """One GGUF tensor and the Hugging Face parameter it becomes."""

    gguf_name: str
    hf_name: str
    hf_shape: tuple[int, ...]
    index: int  # position in reader.tensors


# ----------------------------------------------------------------------------------------------------
# Public API
# ----------------------------------------------------------------------------------------------------


def convert_gguf_to_hf_folder(
    gguf_path: str | Path, out_dir: str | Path, dtype: torch.dtype = torch.float32
) -> Path:
    """Convert ``gguf_path`` into a Hugging Face folder at ``out_dir`` and return ``out_dir``.

    Writes ``config.json``, ``model.safetensors`` (or shards plus ``model.safetensors.index.json`` above
    ``MAX_SHARD_BYTES``), ``tokenizer.json`` + ``tokenizer_config.json`` (with chat template and special
    tokens) and ``generation_config.json``. Tensors are dequantized to ``dtype`` and renamed to HF names;
    llama.cpp's Q/K row permutation is undone for ``llama``. The folder appears atomically.

    Raises ValueError for an unsupported architecture, dtype or tensor, FileNotFoundError for a missing
    file, FileExistsError when ``out_dir`` already exists.
    """
    gguf_path = Path(gguf_path)
    out_dir = Path(out_dir)
    _check_dtype(dtype)
    if not gguf_path.is_file():
        raise FileNotFoundError(f"GGUF file not found: {gguf_path}")
    if out_dir.exists():
        raise FileExistsError(f"output folder already exists: {out_dir}")

    reader = open_gguf(gguf_path)
    metadata = read_metadata(reader)
    spec = arch_spec(metadata)
    entries = plan_tensors(reader, metadata, spec)

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp_dir = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        _write_weights(reader, entries, metadata, spec, tmp_dir, dtype)
        config = build_config(reader, metadata, spec, entries, dtype)
        _write_json(tmp_dir / "config.json", config)
        _write_json(tmp_dir / "generation_config.json", build_generation_config(metadata))
        _write_tokenizer(gguf_path, reader, metadata, tmp_dir)
        _publish(tmp_dir, out_dir)
    except BaseException:
        shutil.rmtree(tmp_dir, ignore_errors=True)
        raise
    return out_dir


def resolve_gguf(path: str | Path, cache_dir: Path | None = None) -> Path:
    """Return the converted Hugging Face folder for the GGUF file at ``path``, converting on first use.

    The folder is ``cache_dir / gguf_cache_key(path)``; ``cache_dir`` defaults to ``default_cache_dir()``.
    The key comes from the absolute path, size and mtime of the file (no hashing of its contents) and from
    ``converter_fingerprint()``, so a changed file or a changed converter gets a fresh conversion, and a
    second call only stats the file and the folder.
    """
    gguf_path = Path(path).expanduser().resolve()
    if not gguf_path.is_file():
        raise FileNotFoundError(f"GGUF file not found: {gguf_path}")
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    folder = root / gguf_cache_key(gguf_path)
    if folder.is_dir():
        return folder
    try:
        return convert_gguf_to_hf_folder(gguf_path, folder)
    except FileExistsError:
        if folder.is_dir():  # another process finished the same conversion first
            return folder
        raise


def default_cache_dir() -> Path:
    """``$ALLMOS_CACHE/gguf`` when ALLMOS_CACHE is set, else ``~/.cache/allmos/gguf``."""
    root = os.environ.get("ALLMOS_CACHE")
    base = Path(root).expanduser() if root else Path.home() / ".cache" / "allmos"
    return base / "gguf"


def gguf_cache_key(gguf_path: Path) -> str:
    """Folder name for a GGUF file: its stem plus a digest of path, size, mtime and the converter fingerprint."""
    stat = gguf_path.stat()
    ident = f"{converter_fingerprint()}\0{gguf_path.resolve()}\0{stat.st_size}\0{stat.st_mtime_ns}"
    digest = hashlib.sha256(ident.encode()).hexdigest()[:16]
    stem = re.sub(r"[^A-Za-z0-9._-]", "_", gguf_path.stem)[:80]
    return f"{stem}-{digest}"


def converter_fingerprint() -> str:
    """Digest of everything besides the GGUF file that a conversion's output depends on: the source of this
    module (the converter) and the versions of the packages it relies on. Any edit of the converter thus
    keys new conversions apart from the ones it made before (no version constant to remember)."""
    digest = hashlib.sha256(_converter_source())
    for package in _CONVERTER_PACKAGES:
        digest.update(f"\0{package}={_package_version(package)}".encode())
    return digest.hexdigest()[:16]


def _converter_source() -> bytes:
    return Path(__file__).read_bytes()


def _package_version(package: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:
        return "none"


# ----------------------------------------------------------------------------------------------------
# Opening a file, with a clear error for a damaged one
# ----------------------------------------------------------------------------------------------------


def open_gguf(gguf_path: Path) -> Any:
    """A ``gguf.GGUFReader`` over the file; ValueError naming the file and what is wrong when it cannot be read.

    The reader's own errors on a damaged file (``cannot reshape array ...``, ``IndexError``) name neither the
    file nor the damage, so the layout is first walked by ``check_gguf_layout`` (a fraction of the reader's
    time), which says where a truncated file ends early.
    """
    import gguf

    check_gguf_layout(gguf_path)
    try:
        return gguf.GGUFReader(str(gguf_path))
    except Exception as exc:  # the reader raises ValueError, IndexError, KeyError... on damaged files
        raise ValueError(f"cannot read GGUF file {gguf_path}: {exc}") from exc


@dataclass
class _Cursor:
    """Sequential reads from an open GGUF file that fail with the file's name and the missing byte range."""

    handle: Any  # binary file object
    path: Path
    size: int
    byte_order: str = "<"
    offset: int = 0

    def take(self, num_bytes: int, what: str) -> bytes:
        self._need(num_bytes, what)
        self.offset += num_bytes
        return self.handle.read(num_bytes)

    def skip(self, num_bytes: int, what: str) -> None:
        self._need(num_bytes, what)
        self.offset += num_bytes
        self.handle.seek(self.offset)

    def unpack(self, fmt: str, what: str) -> Any:
        return struct.unpack(self.byte_order + fmt, self.take(struct.calcsize(fmt), what))[0]

    def read_string(self, what: str) -> str:
        return self.take(self.unpack("Q", what), what).decode("utf-8", errors="replace")

    def skip_string(self, what: str) -> None:
        self.skip(self.unpack("Q", what), what)

    def _need(self, num_bytes: int, what: str) -> None:
        end = self.offset + num_bytes
        if end > self.size:
            raise ValueError(
                f"GGUF file {self.path} is truncated: {what} needs bytes up to {end} but the file has {self.size}"
            )


def check_gguf_layout(gguf_path: Path) -> None:
    """Walk the header, metadata and tensor infos of a GGUF file and check that every tensor's data lies
    inside the file. Raises ValueError naming the file and the first part that is cut off or invalid, e.g.
    ``GGUF file X is truncated: tensor 'T' needs bytes up to N but the file has M``; returns when the layout
    is consistent."""
    size = gguf_path.stat().st_size
    with open(gguf_path, "rb") as handle:
        cursor = _Cursor(handle, gguf_path, size)
        magic = cursor.take(4, "the GGUF magic number")
        if magic != b"GGUF":
            raise ValueError(f"{gguf_path} is not a GGUF file (it starts with {magic!r}, not b'GGUF')")
        version = cursor.unpack("I", "the header")
        if version & 0xFFFF == 0:  # written on a machine of the other byte order
            cursor.byte_order = ">"
            version = struct.unpack(">I", struct.pack("<I", version))[0]
        if version not in (2, 3):
            raise ValueError(f"GGUF file {gguf_path} has version {version}; versions 2 and 3 are supported")
        tensor_count, kv_count = cursor.unpack("Q", "the header"), cursor.unpack("Q", "the header")
        alignment = _walk_metadata(cursor, kv_count)
        tensors = [_read_tensor_info(cursor, i) for i in range(tensor_count)]
    data_start = -(-cursor.offset // alignment) * alignment
    for name, relative_offset, num_bytes in sorted(tensors, key=lambda t: t[1]):
        end = data_start + relative_offset + num_bytes
        if end > size:
            raise ValueError(
                f"GGUF file {gguf_path} is truncated: tensor {name!r} needs bytes up to {end} but the file has {size}"
            )


def _walk_metadata(cursor: _Cursor, kv_count: int) -> int:
    """Skip the key/value section; returns ``general.alignment`` (32 when absent)."""
    alignment = 32
    for i in range(kv_count):
        key = cursor.read_string(f"the name of metadata key #{i}")
        what = f"the value of metadata key {key!r}"
        value_type = cursor.unpack("I", what)
        if key == "general.alignment" and value_type == _UINT32_TYPE:
            alignment = cursor.unpack("I", what)
            if alignment == 0 or alignment & (alignment - 1):
                raise ValueError(f"GGUF file {cursor.path} has general.alignment {alignment}, not a power of two")
        else:
            _skip_value(cursor, value_type, what)
    return alignment


def _skip_value(cursor: _Cursor, value_type: int, what: str) -> None:
    if value_type == _STRING_TYPE:
        cursor.skip_string(what)
    elif value_type == _ARRAY_TYPE:
        item_type, length = cursor.unpack("I", what), cursor.unpack("Q", what)
        if item_type in _SCALAR_SIZES:
            cursor.skip(length * _SCALAR_SIZES[item_type], what)
        else:
            for _ in range(length):
                _skip_value(cursor, item_type, what)
    elif value_type in _SCALAR_SIZES:
        cursor.skip(_SCALAR_SIZES[value_type], what)
    else:
        raise ValueError(f"GGUF file {cursor.path} is damaged: {what} has unknown type id {value_type}")


def _read_tensor_info(cursor: _Cursor, index: int) -> tuple[str, int, int]:
    """(name, offset relative to the data section, size in bytes) of tensor ``index``."""
    import gguf

    name = cursor.read_string(f"the info of tensor #{index}")
    what = f"the info of tensor {name!r}"
    num_dims = cursor.unpack("I", what)
    dims = [cursor.unpack("Q", what) for _ in range(num_dims)]
    type_id, relative_offset = cursor.unpack("I", what), cursor.unpack("Q", what)
    try:
        block_size, type_size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType(type_id)]
    except (ValueError, KeyError):
        raise ValueError(f"GGUF file {cursor.path} is damaged: tensor {name!r} has unknown type id {type_id}") \
            from None
    return name, relative_offset, math.prod(dims) // block_size * type_size


# ----------------------------------------------------------------------------------------------------
# Metadata
# ----------------------------------------------------------------------------------------------------


def read_metadata(reader: Any) -> dict[str, Any]:
    """All GGUF key/values as Python values, except the large tokenizer arrays."""
    return {
        name: _field_value(field) for name, field in reader.fields.items() if name not in _SKIPPED_METADATA
    }


def _field_value(field: Any) -> Any:
    import gguf

    kind = field.types[0] if field.types else None
    if kind == gguf.GGUFValueType.ARRAY:
        item_kind = field.types[-1]
        return [_scalar(field.parts[i], item_kind) for i in field.data]
    return _scalar(field.parts[field.data[0]], kind)


def _scalar(part: np.ndarray, kind: Any) -> Any:
    import gguf

    if kind == gguf.GGUFValueType.STRING:
        return bytes(part).decode("utf-8", errors="replace")
    return part[0].item()


def _token_text(reader: Any, token_id: int | None) -> str | None:
    """The text of one vocabulary entry, read without decoding the whole vocabulary."""
    field = reader.fields.get("tokenizer.ggml.tokens")
    if token_id is None or field is None or not 0 <= token_id < len(field.data):
        return None
    return bytes(field.parts[field.data[token_id]]).decode("utf-8", errors="replace")


def arch_spec(metadata: dict[str, Any]) -> ArchSpec:
    """The ArchSpec for ``general.architecture``; ValueError naming it and the supported ones otherwise."""
    architecture = metadata.get("general.architecture")
    if architecture not in _ARCH_SPECS:
        raise ValueError(
            f"unsupported GGUF general.architecture {architecture!r}; "
            f"supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
        )
    if int(metadata.get("split.count", 1)) > 1:
        raise ValueError(
            "split GGUF files (split.count > 1) are not supported; merge them with llama-gguf-split"
        )
    return _ARCH_SPECS[architecture]


def _arch_key(metadata: dict[str, Any], key: str, default: Any = None) -> Any:
    value = metadata.get(f"{metadata['general.architecture']}.{key}", default)
    if value is None:
        raise ValueError(f"GGUF metadata lacks {metadata['general.architecture']}.{key}")
    return value


def _int_key(metadata: dict[str, Any], key: str, default: Any = None) -> int:
    value = _arch_key(metadata, key, default)
    if isinstance(value, list):
        raise ValueError(f"per-layer GGUF metadata {key} is not supported")
    return int(value)


# ----------------------------------------------------------------------------------------------------
# Config
# ----------------------------------------------------------------------------------------------------


def build_config(
    reader: Any, metadata: dict[str, Any], spec: ArchSpec, entries: list[TensorEntry], dtype: torch.dtype
) -> dict[str, Any]:
    """The Hugging Face ``config.json`` contents for this GGUF."""
    hidden_size = _int_key(metadata, "embedding_length")
    num_heads = _int_key(metadata, "attention.head_count")
    head_dim = _int_key(metadata, "attention.key_length", hidden_size // num_heads)
    rope_theta = float(_arch_key(metadata, "rope.freq_base", 10000.0))
    hf_names = {e.hf_name: e for e in entries}
    config: dict[str, Any] = {
        "architectures": [spec.hf_architecture],
        "model_type": spec.model_type,
        "hidden_size": hidden_size,
        "intermediate_size": _int_key(metadata, "feed_forward_length"),
        "num_hidden_layers": _int_key(metadata, "block_count"),
        "num_attention_heads": num_heads,
        "num_key_value_heads": _int_key(metadata, "attention.head_count_kv", num_heads),
        "head_dim": head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": _int_key(metadata, "context_length"),
        "rms_norm_eps": float(_arch_key(metadata, "attention.layer_norm_rms_epsilon")),
        "rope_theta": rope_theta,
        "vocab_size": hf_names["model.embed_tokens.weight"].hf_shape[0],
        "tie_word_embeddings": "lm_head.weight" not in hf_names,
        "attention_bias": "model.layers.0.self_attn.q_proj.bias" in hf_names,
        "torch_dtype": str(dtype).removeprefix("torch."),
    }
    config.update(spec.extra_config)
    config.update(_special_token_ids(metadata))
    rope_scaling = _rope_scaling(reader, metadata, rope_theta, head_dim)
    if rope_scaling is not None:
        config["rope_scaling"] = rope_scaling
    return config


def _special_token_ids(metadata: dict[str, Any]) -> dict[str, int]:
    names = {
        "bos_token_id": "bos_token_id",
        "eos_token_id": "eos_token_id",
        "pad_token_id": "padding_token_id",
    }
    found = {hf: metadata.get(f"tokenizer.ggml.{key}") for hf, key in names.items()}
    return {hf: int(value) for hf, value in found.items() if value is not None}


def build_generation_config(metadata: dict[str, Any]) -> dict[str, Any]:
    """``generation_config.json``: bos/pad ids and every end-of-turn id the GGUF names (eos, eot, eom)."""
    ids = _special_token_ids(metadata)
    stop_ids = [ids["eos_token_id"]] if "eos_token_id" in ids else []
    for key in ("tokenizer.ggml.eot_token_id", "tokenizer.ggml.eom_token_id"):
        value = metadata.get(key)
        if value is not None and int(value) not in stop_ids:
            stop_ids.append(int(value))
    if stop_ids:
        ids["eos_token_id"] = stop_ids[0] if len(stop_ids) == 1 else stop_ids
    return ids


def _rope_scaling(
    reader: Any, metadata: dict[str, Any], rope_theta: float, head_dim: int
) -> dict[str, Any] | None:
    rope_freqs = _find_tensor(reader, _ROPE_FREQS_TENSOR)
    if rope_freqs is not None:
        factors = np.asarray(rope_freqs.data, dtype=np.float64).reshape(-1)
        return llama3_rope_scaling_from_factors(factors, rope_theta, head_dim)
    arch = metadata["general.architecture"]
    kind = metadata.get(f"{arch}.rope.scaling.type", "none")
    factor = metadata.get(f"{arch}.rope.scaling.factor", metadata.get(f"{arch}.rope.scale_linear"))
    if kind == "none" and factor is not None and float(factor) != 1.0:
        kind = "linear"  # older files only wrote rope.scale_linear
    if kind == "none" or factor is None:
        return None
    if kind == "linear":
        return {"rope_type": "linear", "factor": float(factor)}
    if kind == "yarn":
        original = metadata.get(f"{arch}.rope.scaling.original_context_length")
        if original is None:
            raise ValueError(f"GGUF yarn rope scaling lacks {arch}.rope.scaling.original_context_length")
        return {
            "rope_type": "yarn",
            "factor": float(factor),
            "original_max_position_embeddings": int(original),
        }
    raise ValueError(
        f"unsupported GGUF rope scaling type {kind!r} (supported: none, linear, yarn, rope_freqs)"
    )


def llama3_rope_factors(scaling: dict[str, Any], rope_theta: float, head_dim: int) -> np.ndarray:
    """Per-frequency divisors of Llama 3 rope scaling (Meta's formula), one per rotary pair."""
    inv_freq = 1.0 / rope_theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    wavelen = 2 * math.pi / inv_freq
    original = scaling["original_max_position_embeddings"]
    low, high, factor = scaling["low_freq_factor"], scaling["high_freq_factor"], scaling["factor"]
    smooth = (original / wavelen - low) / (high - low)
    middle = 1.0 / ((1 - smooth) / factor + smooth)
    factors = np.where(wavelen < original / high, 1.0, middle)
    return np.where(wavelen > original / low, factor, factors)


def llama3_rope_scaling_from_factors(
    factors: np.ndarray, rope_theta: float, head_dim: int
) -> dict[str, Any] | None:
    """Recover Llama 3 ``rope_scaling`` from a ``rope_freqs`` tensor; None when it scales nothing."""
    if factors.shape != (head_dim // 2,):
        raise ValueError(f"rope_freqs has {factors.shape[0]} entries, expected head_dim/2 = {head_dim // 2}")
    if np.allclose(factors, 1.0):
        return None
    for original in _LLAMA3_ORIGINAL_CONTEXTS:
        candidate = {
            "rope_type": "llama3",
            "factor": round(float(factors.max()), 4),  # rope_freqs is float32
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": original,
        }
        if np.allclose(llama3_rope_factors(candidate, rope_theta, head_dim), factors, rtol=1e-4, atol=1e-5):
            return candidate
    raise ValueError("cannot recover the rope scaling that produced this GGUF's rope_freqs tensor")


# ----------------------------------------------------------------------------------------------------
# Tensors
# ----------------------------------------------------------------------------------------------------


def hf_tensor_name(gguf_name: str) -> str | None:
    """Hugging Face parameter name for a GGUF tensor name; None for tensors folded into the config."""
    if gguf_name == _ROPE_FREQS_TENSOR:
        return None
    if gguf_name in _GLOBAL_TENSOR_NAMES:
        return _GLOBAL_TENSOR_NAMES[gguf_name]
    match = _LAYER_TENSOR_RE.match(gguf_name)
    if match is None or match.group(2) not in _LAYER_TENSOR_NAMES:
        raise ValueError(
            f"unsupported GGUF tensor {gguf_name!r} (mixture-of-experts and other layouts are not supported)"
        )
    layer, kind, suffix = match.groups()
    return f"model.layers.{layer}.{_LAYER_TENSOR_NAMES[kind]}.{suffix}"


def plan_tensors(reader: Any, metadata: dict[str, Any], spec: ArchSpec) -> list[TensorEntry]:
    """Every GGUF tensor that becomes an HF parameter, with its HF name and shape; checks required ones."""
    entries = []
    for index, tensor in enumerate(reader.tensors):
        hf_name = hf_tensor_name(tensor.name)
        if hf_name is not None:
            hf_shape = tuple(int(d) for d in reversed(tensor.shape.tolist()))
            entries.append(TensorEntry(tensor.name, hf_name, hf_shape, index))
    names = {e.hf_name for e in entries}
    for required in ("model.embed_tokens.weight", "model.norm.weight"):
        if required not in names:
            raise ValueError(f"GGUF lacks the tensor for {required}")
    return entries


def _find_tensor(reader: Any, name: str) -> Any:
    return next((t for t in reader.tensors if t.name == name), None)


def unpermute_qk(weight: np.ndarray, num_heads: int) -> np.ndarray:
    """Undo llama.cpp's rope row permutation of a Q or K weight/bias.

    weight: [num_heads * head_dim, ...] in GGUF (interleaved) row order -> same shape in HF order.
    """
    head_dim = weight.shape[0] // num_heads
    interleaved = weight.reshape(num_heads, head_dim // 2, 2, *weight.shape[1:])  # [h, pair, 2, ...]
    return interleaved.swapaxes(1, 2).reshape(weight.shape)  # [h, 2, pair, ...] -> rotate-half order


def _dequantize(reader: Any, entry: TensorEntry, metadata: dict[str, Any], spec: ArchSpec) -> np.ndarray:
    import gguf

    tensor = reader.tensors[entry.index]
    array = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
    array = np.asarray(array, dtype=np.float32).reshape(entry.hf_shape)  # [out, in] or [dim]
    if spec.permute_qk and ".attn_q." in entry.gguf_name:
        array = unpermute_qk(array, _int_key(metadata, "attention.head_count"))
    elif spec.permute_qk and ".attn_k." in entry.gguf_name:
        num_heads = _int_key(metadata, "attention.head_count")
        array = unpermute_qk(array, _int_key(metadata, "attention.head_count_kv", num_heads))
    return array


def _to_torch(array: np.ndarray, dtype: torch.dtype) -> torch.Tensor:
    if not array.flags.writeable or not array.flags.c_contiguous:
        array = np.array(array, copy=True, order="C")  # memory-mapped F32 tensors are read-only views
    return torch.from_numpy(array).to(dtype).contiguous()


def plan_shards(entries: list[TensorEntry], dtype: torch.dtype, max_bytes: int) -> list[list[TensorEntry]]:
    """Group tensors into consecutive shards of at most ``max_bytes`` (a larger tensor gets its own)."""
    itemsize = torch.empty((), dtype=dtype).element_size()
    shards: list[list[TensorEntry]] = [[]]
    used = 0
    for entry in entries:
        size = math.prod(entry.hf_shape) * itemsize
        if shards[-1] and used + size > max_bytes:
            shards.append([])
            used = 0
        shards[-1].append(entry)
        used += size
    return shards


def _write_weights(
    reader: Any,
    entries: list[TensorEntry],
    metadata: dict[str, Any],
    spec: ArchSpec,
    folder: Path,
    dtype: torch.dtype,
) -> None:
    """Write one shard at a time so that peak memory stays near one shard."""
    from safetensors.torch import save_file

    shards = plan_shards(entries, dtype, MAX_SHARD_BYTES)
    if len(shards) == 1:
        names = ["model.safetensors"]
    else:
        names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    weight_map: dict[str, str] = {}
    total_size = 0
    for file_name, shard in zip(names, shards, strict=True):
        tensors = {e.hf_name: _to_torch(_dequantize(reader, e, metadata, spec), dtype) for e in shard}
        save_file(tensors, str(folder / file_name), metadata={"format": "pt"})
        weight_map.update({name: file_name for name in tensors})
        total_size += sum(t.numel() * t.element_size() for t in tensors.values())
    if len(shards) > 1:
        index = {"metadata": {"total_size": total_size}, "weight_map": weight_map}
        _write_json(folder / "model.safetensors.index.json", index)


# ----------------------------------------------------------------------------------------------------
# Tokenizer and files
# ----------------------------------------------------------------------------------------------------


def _write_tokenizer(gguf_path: Path, reader: Any, metadata: dict[str, Any], folder: Path) -> None:
    """Build the fast tokenizer with transformers' GGUF support and save it as tokenizer.json + config."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
    tokenizer.save_pretrained(str(folder), save_jinja_files=False)
    _normalize_tokenizer_config(folder / "tokenizer_config.json", reader, metadata)
    (folder / "chat_template.jinja").unlink(missing_ok=True)


def _normalize_tokenizer_config(path: Path, reader: Any, metadata: dict[str, Any]) -> None:
    """Make tokenizer_config.json loadable by transformers 4 and 5; carry the GGUF template and tokens."""
    config = json.loads(path.read_text(encoding="utf-8"))
    for key in ("backend", "is_local", "local_files_only"):  # transformers 5 load-time bookkeeping
        config.pop(key, None)
    config["tokenizer_class"] = "PreTrainedTokenizerFast"
    template = metadata.get("tokenizer.chat_template")
    if template is not None and not config.get("chat_template"):
        config["chat_template"] = template
    names = {"bos_token": "bos_token_id", "eos_token": "eos_token_id", "pad_token": "padding_token_id"}
    for name, key in names.items():
        text = _token_text(reader, metadata.get(f"tokenizer.ggml.{key}"))
        if text is not None and not config.get(name):
            config[name] = text
    _write_json(path, config)


def _write_json(path: Path, payload: dict[str, Any]) -> None:
    path.write_text(json.dumps(payload, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def _publish(tmp_dir: Path, out_dir: Path) -> None:
    """Atomically rename the finished temporary folder to its final name."""
    try:
        os.rename(tmp_dir, out_dir)
    except OSError as error:
        if out_dir.exists():
            raise FileExistsError(f"output folder already exists: {out_dir}") from error
        raise


def _check_dtype(dtype: torch.dtype) -> None:
    if dtype not in _SUPPORTED_DTYPES:
        raise ValueError(f"dtype must be one of {[str(d) for d in _SUPPORTED_DTYPES]}, got {dtype}")
