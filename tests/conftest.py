"""Shared fixtures: tiny random Hugging Face checkpoints built with transformers' own classes."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

# Idle OpenMP workers sleep instead of spinning: on a shared, busy CPU a spinning worker waits for a
# descheduled peer and a CPU test ran 10x slower (the engine-core process of `allmos serve` does the same).
# Read once when OpenMP starts, so it must precede torch's import.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402

if not torch.cuda.is_available():
    # Triton kernels run on CPU tensors through the interpreter; the variable must precede triton's import.
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def make_tiny_model(folder: Path, arch: str = "qwen3", *, num_kv_heads: int = 2, tie: bool = False,
                    vocab_size: int = 512, seed: int = 0, **overrides) -> Path:
    """Save a tiny random model of ``arch`` (transformers' classes) with generation_config.json."""
    import transformers

    torch.manual_seed(seed)
    common = dict(vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=num_kv_heads, max_position_embeddings=2048,
                  tie_word_embeddings=tie, rms_norm_eps=1e-6, bos_token_id=1, eos_token_id=2)
    common.update(overrides)
    if arch == "qwen3":
        cfg = transformers.Qwen3Config(**{"head_dim": 32, **common})
        model = transformers.Qwen3ForCausalLM(cfg)
    elif arch == "qwen2":
        cfg = transformers.Qwen2Config(**common)
        model = transformers.Qwen2ForCausalLM(cfg)
    elif arch == "llama":
        cfg = transformers.LlamaConfig(**common)
        model = transformers.LlamaForCausalLM(cfg)
    elif arch == "mistral":
        cfg = transformers.MistralConfig(**{"sliding_window": None, **common})
        model = transformers.MistralForCausalLM(cfg)
    else:
        raise ValueError(arch)
    with torch.no_grad():  # make logits less flat than the default init so greedy paths are decisive
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.08)
    model.to(torch.float32).save_pretrained(folder, safe_serialization=True)
    (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": 2, "bos_token_id": 1}))
    return folder


@pytest.fixture(scope="session")
def qwen3_dir(tmp_path_factory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("qwen3"), "qwen3")


@pytest.fixture(scope="session")
def tiny_model_factory(tmp_path_factory):
    cache: dict = {}

    def get(arch: str = "qwen3", **kwargs) -> Path:
        key = (arch, json.dumps(kwargs, sort_keys=True))
        if key not in cache:
            cache[key] = make_tiny_model(tmp_path_factory.mktemp(arch), arch, **kwargs)
        return cache[key]

    return get


@pytest.fixture(scope="session")
def default_model_dir() -> Path:
    """The embedded default model (SmolLM2-135M-Instruct), converted once into the user cache."""
    from allmos.models.default_model import default_gguf_path, default_model_path

    try:
        default_gguf_path()
    except (RuntimeError, ValueError) as exc:
        pytest.skip(f"embedded default model not installed: {exc}")
    return default_model_path()


@pytest.fixture(scope="session")
def tiny_llama_real_tokenizer(tmp_path_factory, default_model_dir) -> Path:
    """A tiny random Llama whose vocabulary is SmolLM2's byte-level BPE (tokenizer files copied in):
    random tokens often split multi-byte characters, which is what streaming tests need."""
    import shutil

    from safetensors.torch import load_file, save_file
    from transformers import AutoTokenizer

    folder = make_tiny_model(tmp_path_factory.mktemp("llama_tok"), "llama", vocab_size=49152, tie=False)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (default_model_dir / name).exists():
            shutil.copy(default_model_dir / name, folder / name)
    # make byte tokens that are only part of a UTF-8 character likely, so outputs split characters
    tok = AutoTokenizer.from_pretrained(folder)
    partial = [i for i in range(600) if tok.decode([i]) == "\ufffd"]
    weights = load_file(folder / "model.safetensors")
    weights["lm_head.weight"][partial] *= 8.0
    save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})
    return folder
