"""Builds a model from a Hugging Face folder: safetensors (single file or sharded index) or random
weights (``load_format="dummy"``). Never loads pickles or remote code."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from torch import nn

from allmos.layers.tp import SINGLE, TPGroup
from allmos.models.decoder import DecoderForCausalLM
from allmos.models.model_config import ModelConfig
from allmos.models.registry import model_class_for


@contextlib.contextmanager
def _default_dtype(dtype: torch.dtype):
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def build_model(model_config: ModelConfig, dtype: torch.dtype, device: torch.device, tp: TPGroup = SINGLE
                ) -> DecoderForCausalLM:
    """An uninitialized model of the config's architecture, parameters on ``device`` in ``dtype``."""
    cls = model_class_for(model_config)
    with _default_dtype(dtype), torch.device(device):
        model = cls(model_config, tp)
    return model.eval()


def safetensors_files(folder: Path) -> list[Path]:
    """The checkpoint's files: from ``model.safetensors.index.json`` when present, else ``*.safetensors``."""
    index = folder / "model.safetensors.index.json"
    if index.exists():
        weight_map = json.loads(index.read_text())["weight_map"]
        files = [folder / name for name in sorted(set(weight_map.values()))]
        missing = [str(f) for f in files if not f.exists()]
        if missing:
            raise FileNotFoundError(f"{index} lists files that do not exist: {missing}")
        return files
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors files in {folder} (only safetensors and GGUF are loaded)")
    return files


def iter_checkpoint(files: list[Path]) -> Iterator[tuple[Path, str, Any]]:
    """(file, tensor name, lazy slice) for every tensor; a truncated or corrupt file raises ValueError."""
    for path in files:
        try:
            handle = safe_open(str(path), framework="pt")
        except Exception as exc:  # safetensors raises its own error type on bad headers / truncation
            raise ValueError(f"cannot read safetensors file {path}: {exc}") from exc
        with handle as f:
            for name in f.keys():
                try:
                    yield path, name, f.get_slice(name)
                except Exception as exc:
                    raise ValueError(f"cannot read tensor {name!r} from {path}: {exc}") from exc


def load_weights(model: DecoderForCausalLM, files: list[Path]) -> None:
    """Route every checkpoint tensor to its parameter's ``weight_loader``; every parameter must be loaded."""
    params = dict(model.named_parameters())
    loaded: set[str] = set()
    for path, name, tensor in iter_checkpoint(files):
        target, shard_id = _target_of(model, name)
        if target is None:
            continue
        param = params.get(target)
        if param is None:
            raise ValueError(f"{path.name}: tensor {name!r} has no matching parameter in "
                             f"{type(model).__name__} (is this checkpoint's architecture right?)")
        try:
            _load_one(param, tensor, shard_id)
        except ValueError as exc:
            raise ValueError(f"{path.name}: tensor {name!r}: {exc}") from exc
        loaded.add(target if shard_id is None else f"{target}#{shard_id}")
    _check_all_loaded(model, loaded, files)


def _load_one(param: nn.Parameter, tensor: Any, shard_id: Any) -> None:
    loader = getattr(param, "weight_loader", None)
    if loader is None:
        from allmos.layers.weights import copy_checked, materialize
        copy_checked(param, materialize(tensor), "parameter")
    elif shard_id is None:
        loader(param, tensor)
    else:
        loader(param, tensor, shard_id)


def _target_of(model: DecoderForCausalLM, name: str) -> tuple[str | None, Any]:
    """Parameter name and packed-shard id for a checkpoint tensor name (None: skip the tensor)."""
    if "rotary_emb.inv_freq" in name:
        return None, None
    if name == "lm_head.weight" and model.tie_word_embeddings:
        return None, None
    for original, (packed, shard_id) in model.packed_modules_mapping.items():
        if f".{original}." in name:
            return name.replace(f".{original}.", f".{packed}."), shard_id
    return name, None


def _check_all_loaded(model: DecoderForCausalLM, loaded: set[str], files: list[Path]) -> None:
    expected: set[str] = set()
    packed_parts: dict[str, list] = {}
    for _, (packed, shard_id) in model.packed_modules_mapping.items():
        packed_parts.setdefault(packed, []).append(shard_id)
    for name, _ in model.named_parameters():
        module = name.rsplit(".", 2)[-2] if name.count(".") >= 1 else ""
        if module in packed_parts:
            expected.update(f"{name}#{s}" for s in packed_parts[module])
        else:
            expected.add(name)
    missing = sorted(expected - loaded)
    if missing:
        names = ", ".join(_checkpoint_name(model, m) for m in missing[:8])
        raise ValueError(f"checkpoint {files[0].parent} is missing tensor(s): {names}"
                         + (f" and {len(missing) - 8} more" if len(missing) > 8 else ""))


def _checkpoint_name(model: DecoderForCausalLM, loaded_name: str) -> str:
    if "#" not in loaded_name:
        return loaded_name
    name, shard_id = loaded_name.split("#")
    for original, (packed, sid) in model.packed_modules_mapping.items():
        if str(sid) == shard_id and f".{packed}." in name:
            return name.replace(f".{packed}.", f".{original}.")
    return loaded_name


def init_dummy_weights(model: nn.Module, seed: int = 0) -> None:
    """Random weights with the right shapes (for benchmarks): small normals, norms at one."""
    generators: dict[torch.device, torch.Generator] = {}
    for name, param in model.named_parameters():
        if "norm" in name.rsplit(".", 1)[0].rsplit(".", 1)[-1]:
            param.data.fill_(1.0)
            continue
        if param.device not in generators:
            generators[param.device] = torch.Generator(device=param.device).manual_seed(seed)
        param.data.normal_(0.0, 0.02, generator=generators[param.device])
