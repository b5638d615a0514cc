"""Checkpoint loading: sharded index, and errors that name the file and the tensor."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from allmos import LLM, SamplingParams

PARAMS = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)


def copy_model(src, dst):
    shutil.copytree(src, dst)
    return dst


def test_sharded_index_loads_same_tokens(qwen3_dir, tmp_path):
    folder = copy_model(qwen3_dir, tmp_path / "sharded")
    tensors = load_file(folder / "model.safetensors")
    (folder / "model.safetensors").unlink()
    names = sorted(tensors)
    half = len(names) // 2
    shards = {"model-00001-of-00002.safetensors": names[:half], "model-00002-of-00002.safetensors": names[half:]}
    for file, keys in shards.items():
        save_file({k: tensors[k] for k in keys}, folder / file)
    index = {"metadata": {}, "weight_map": {k: f for f, keys in shards.items() for k in keys}}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    ref = LLM(str(qwen3_dir)).generate([[5, 6, 7]], PARAMS, use_tqdm=False)[0].token_ids
    assert LLM(str(folder)).generate([[5, 6, 7]], PARAMS, use_tqdm=False)[0].token_ids == ref


def test_missing_tensor_named(qwen3_dir, tmp_path):
    folder = copy_model(qwen3_dir, tmp_path / "m")
    tensors = load_file(folder / "model.safetensors")
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, folder / "model.safetensors")
    with pytest.raises(ValueError, match=r"missing tensor.*model\.layers\.1\.mlp\.up_proj\.weight"):
        LLM(str(folder))


def test_wrong_shape_named(qwen3_dir, tmp_path):
    folder = copy_model(qwen3_dir, tmp_path / "s")
    tensors = load_file(folder / "model.safetensors")
    tensors["model.layers.0.self_attn.o_proj.weight"] = torch.zeros(64, 32)
    save_file(tensors, folder / "model.safetensors")
    with pytest.raises(ValueError, match=r"model\.safetensors.*o_proj\.weight.*shape"):
        LLM(str(folder))


def test_truncated_file_named(qwen3_dir, tmp_path):
    folder = copy_model(qwen3_dir, tmp_path / "t")
    data = (folder / "model.safetensors").read_bytes()
    (folder / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=r"model\.safetensors"):
        LLM(str(folder))


def test_missing_shard_and_no_weights(qwen3_dir, tmp_path):
    folder = copy_model(qwen3_dir, tmp_path / "n")
    (folder / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="safetensors"):
        LLM(str(folder))
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"a": "gone.safetensors"}}))
    with pytest.raises(FileNotFoundError, match="gone.safetensors"):
        LLM(str(folder))


def test_pickle_checkpoints_are_not_loaded(qwen3_dir, tmp_path):
    folder = copy_model(qwen3_dir, tmp_path / "p")
    state = load_file(folder / "model.safetensors")
    (folder / "model.safetensors").unlink()
    torch.save(state, folder / "pytorch_model.bin")
    with pytest.raises(FileNotFoundError, match="only safetensors and GGUF"):
        LLM(str(folder))
