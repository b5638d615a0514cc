"""Where a model comes from: a local folder or .gguf file, a hub id, or the embedded default model."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from allmos.models.model_config import ModelConfig, load_model_config


@dataclass(frozen=True)
class ModelSource:
    """A Hugging Face-format folder plus what the engine reads from it once (config.json as a ModelConfig)."""

    folder: Path
    model_config: ModelConfig
    generation_config: dict
    has_tokenizer: bool

    @property
    def checkpoint_dtype(self):
        return self.model_config.checkpoint_dtype


def resolve_model_folder(model: str | None) -> Path:
    """A local folder for ``model``: local paths win, .gguf files are converted once, ``None`` is the
    embedded default model, anything else is looked up as a hub id."""
    if model is None:
        from allmos.models.default_model import default_model_path
        return default_model_path()
    path = Path(model).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        from allmos.models.gguf_loader import resolve_gguf
        return resolve_gguf(path)
    if path.is_dir():
        if not (path / "config.json").exists():
            raise ValueError(f"model folder {path} has no config.json")
        return path
    if path.exists():
        raise ValueError(f"model {model!r} is a file but not a .gguf file; give a model folder or a .gguf file")
    return _from_hub(model)


def _from_hub(repo_id: str) -> Path:
    if repo_id.count("/") != 1 or repo_id.startswith((".", "/")):
        raise ValueError(f"model {repo_id!r} is neither a local folder, a .gguf file nor a hub id "
                         "such as 'Qwen/Qwen3-0.6B'")
    from huggingface_hub import snapshot_download
    patterns = ["*.json", "*.safetensors", "tokenizer*", "*.txt", "*.model"]
    try:
        return Path(snapshot_download(repo_id, local_files_only=True, allow_patterns=patterns))
    except Exception:
        pass
    try:
        return Path(snapshot_download(repo_id, allow_patterns=patterns))
    except Exception as exc:
        raise ValueError(
            f"model {repo_id!r} is not in the local Hugging Face cache and could not be downloaded ({exc}). "
            f"Download it where there is network access with `huggingface-cli download {repo_id}` "
            "(or `hf download`), or pass a local folder.") from exc


def load_model_source(model: str | None) -> ModelSource:
    folder = resolve_model_folder(model)
    model_config = load_model_config(folder)
    gen_path = folder / "generation_config.json"
    generation_config = json.loads(gen_path.read_text()) if gen_path.exists() else {}
    has_tokenizer = any((folder / f).exists() for f in ("tokenizer.json", "tokenizer.model", "tokenizer_config.json"))
    return ModelSource(folder, model_config, generation_config, has_tokenizer)
