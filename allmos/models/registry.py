"""Model classes keyed on ``config.json``'s ``architectures``."""

from __future__ import annotations

from collections.abc import Sequence

from allmos.models.decoder import DecoderForCausalLM
from allmos.models.llama import LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM
from allmos.models.model_config import ModelConfig
from allmos.models.qwen3 import Qwen3ForCausalLM

_REGISTRY: dict[str, type[DecoderForCausalLM]] = {
    "Qwen3ForCausalLM": Qwen3ForCausalLM,
    "Qwen2ForCausalLM": Qwen2ForCausalLM,
    "LlamaForCausalLM": LlamaForCausalLM,
    "MistralForCausalLM": MistralForCausalLM,
}


def supported_architectures() -> list[str]:
    return sorted(_REGISTRY)


def model_class_for(model_config: ModelConfig) -> type[DecoderForCausalLM]:
    return class_for_architectures(model_config.architectures)


def class_for_architectures(architectures: Sequence[str]) -> type[DecoderForCausalLM]:
    """The class of the first supported name in config.json's ``architectures``; ValueError if none is."""
    architectures = list(architectures)
    for name in architectures:
        if name in _REGISTRY:
            return _REGISTRY[name]
    raise ValueError(f"Unsupported model architecture {architectures or '(none in config.json)'}; "
                     f"supported: {', '.join(supported_architectures())}")
