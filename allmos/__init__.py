"""allmos: a compact, fast LLM inference engine with a vLLM-compatible offline API.

The public names load on first use (module ``__getattr__``), so ``import allmos.cli`` and
``allmos --help`` do not import torch; ``from allmos import LLM, SamplingParams`` works as usual.
"""

from __future__ import annotations

import importlib
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from allmos.engine.llm import LLM
    from allmos.outputs import CompletionOutput, Logprob, RequestMetrics, RequestOutput
    from allmos.sampling_params import SamplingParams

# public name -> module that defines it (read-only)
_LAZY = MappingProxyType({
    "LLM": "allmos.engine.llm",
    "SamplingParams": "allmos.sampling_params",
    "RequestOutput": "allmos.outputs",
    "CompletionOutput": "allmos.outputs",
    "RequestMetrics": "allmos.outputs",
    "Logprob": "allmos.outputs",
})

__all__ = ["LLM", "SamplingParams", "RequestOutput", "CompletionOutput", "RequestMetrics", "Logprob"]
__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'allmos' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
