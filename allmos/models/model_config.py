"""What the engine knows about a model: one frozen ``ModelConfig``, read once from its Hugging Face config.

``ModelConfig.from_hf`` is the only reader of a transformers config object in allmos (apart from the GGUF
converter, which writes config.json files, and ``rope_config_from_hf``, which ``from_hf`` calls once).
The runner, the attention backends, the model classes, the loader and the tensor-parallel checks take a
``ModelConfig``; per-rank head counts and the context limit are derived here and nowhere else.

Invariants of a constructed ``ModelConfig``: every size is a positive integer; ``num_key_value_heads``
divides ``num_attention_heads``; ``rope.head_dim == head_dim``; ``eos_token_ids`` are non-negative.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from allmos.config import dtype_from_name
from allmos.layers.rotary import RopeConfig, rope_config_from_hf

_REQUIRED = object()

# Sizes config.json must state, and all sizes that must be positive integers (names as in config.json).
_REQUIRED_SIZES = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                   "max_position_embeddings")
_POSITIVE_FIELDS = (*_REQUIRED_SIZES, "num_key_value_heads", "head_dim")


@dataclass(frozen=True)
class ModelConfig:
    """The model facts the engine uses, with config.json's names; built by ``from_hf``."""

    architectures: tuple[str, ...]
    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    max_position_embeddings: int
    rms_norm_eps: float
    hidden_act: str
    rope: RopeConfig
    attention_bias: bool = False  # bias on q/k/v/o (Llama, Qwen3); Qwen2 always has a q/k/v bias
    mlp_bias: bool = False
    tie_word_embeddings: bool = False
    sliding_window: int | None = None
    use_sliding_window: bool = False  # Qwen2's switch for sliding_window
    eos_token_ids: tuple[int, ...] = ()  # from config.json (generation_config.json may add more)
    checkpoint_dtype: torch.dtype | None = None  # dtype the weights were saved in, when config.json says

    def __post_init__(self) -> None:
        for name in _POSITIVE_FIELDS:
            _check_positive_int(name, getattr(self, name))
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(f"model config: num_key_value_heads={self.num_key_value_heads} must divide "
                             f"num_attention_heads={self.num_attention_heads}")
        if isinstance(self.rms_norm_eps, bool) or not isinstance(self.rms_norm_eps, (int, float)) \
                or not self.rms_norm_eps > 0:
            raise ValueError(f"model config: rms_norm_eps must be a positive number, got {self.rms_norm_eps!r}")
        if self.rope.head_dim != self.head_dim:
            raise ValueError(f"model config: rope head_dim={self.rope.head_dim} differs from head_dim={self.head_dim}")
        if any(isinstance(t, bool) or not isinstance(t, int) or t < 0 for t in self.eos_token_ids):
            raise ValueError(f"model config: eos_token_id must hold non-negative integers, got {self.eos_token_ids!r}")

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_hf(cls, hf_config: Any) -> ModelConfig:
        """Read a transformers config object (``AutoConfig.from_pretrained``); ValueError names the field
        that is missing or invalid, or the unsupported architecture. Defaults follow transformers:
        ``num_key_value_heads`` = ``num_attention_heads``, ``head_dim`` = ``hidden_size // num_attention_heads``,
        ``hidden_act`` = silu."""
        from allmos.models.registry import class_for_architectures  # the model classes import this module

        architectures = tuple(_read(hf_config, "architectures", None) or ())
        class_for_architectures(architectures)  # an unsupported model fails on that, not on a missing field
        sizes = {name: _read(hf_config, name) for name in _REQUIRED_SIZES}
        sizes["num_key_value_heads"] = _read(hf_config, "num_key_value_heads", None) or sizes["num_attention_heads"]
        for name, value in sizes.items():  # before the derived values below are computed from them
            _check_positive_int(name, value)
        head_dim = _head_dim(hf_config, sizes["hidden_size"], sizes["num_attention_heads"])
        return cls(
            architectures=architectures,
            model_type=str(_read(hf_config, "model_type", None) or ""),
            **sizes,
            head_dim=head_dim,
            rms_norm_eps=_read(hf_config, "rms_norm_eps"),
            hidden_act=str(_read(hf_config, "hidden_act", None) or "silu"),
            rope=rope_config_from_hf(hf_config),
            attention_bias=bool(_read(hf_config, "attention_bias", False)),
            mlp_bias=bool(_read(hf_config, "mlp_bias", False)),
            tie_word_embeddings=bool(_read(hf_config, "tie_word_embeddings", False)),
            sliding_window=_read(hf_config, "sliding_window", None),
            use_sliding_window=bool(_read(hf_config, "use_sliding_window", False)),
            eos_token_ids=_token_ids(_read(hf_config, "eos_token_id", None)),
            checkpoint_dtype=_checkpoint_dtype(hf_config),
        )

    # ------------------------------------------------------------------ context length
    @property
    def context_limit(self) -> int:
        """Longest sequence the model supports: max_position_embeddings, extended by linear / dynamic / yarn
        RoPE scaling (as vLLM derives it; llama3 checkpoints already state the extended length)."""
        limit, rope = self.max_position_embeddings, self.rope
        if rope.rope_type in ("linear", "dynamic"):
            return int(limit * rope.scaling["factor"])
        if rope.rope_type == "yarn" and rope.scaling.get("factor") is not None:
            original = rope.scaling["original_max_position_embeddings"]
            return max(limit, int(original * rope.scaling["factor"]))
        return limit  # yarn without a factor (DeepSeek style) derives it from this very length

    def effective_max_model_len(self, requested: int) -> int:
        """The engine's max_model_len: the user's value capped by ``context_limit``."""
        return min(requested, self.context_limit)

    # ------------------------------------------------------------------ tensor parallelism
    def num_heads_per_rank(self, tp_size: int) -> int:
        """Query heads on each of ``tp_size`` ranks (they must split evenly)."""
        _check_tp_size(tp_size)
        if self.num_attention_heads % tp_size:
            raise ValueError(f"tensor_parallel_size={tp_size} must divide the model's "
                             f"num_attention_heads={self.num_attention_heads}")
        return self.num_attention_heads // tp_size

    def num_kv_heads_per_rank(self, tp_size: int) -> int:
        """KV heads on each rank: split evenly, or, when ranks outnumber them, each KV head replicated on
        ``tp_size // num_key_value_heads`` ranks (one head per rank)."""
        _check_tp_size(tp_size)
        kv_heads = self.num_key_value_heads
        if kv_heads % tp_size and tp_size % kv_heads:
            raise ValueError(f"tensor_parallel_size={tp_size} and the model's num_key_value_heads={kv_heads}: "
                             "one must divide the other")
        return max(1, kv_heads // tp_size)

    def verify_tensor_parallel_size(self, tp_size: int) -> None:
        """Raise ValueError naming the field when ``tp_size`` ranks cannot shard this model."""
        self.num_heads_per_rank(tp_size)
        self.num_kv_heads_per_rank(tp_size)
        if self.intermediate_size % tp_size:
            raise ValueError(f"tensor_parallel_size={tp_size} must divide the model's "
                             f"intermediate_size={self.intermediate_size}")


def load_model_config(folder: Path) -> ModelConfig:
    """The ModelConfig of a Hugging Face model folder (its config.json; never remote code)."""
    from transformers import AutoConfig

    return ModelConfig.from_hf(AutoConfig.from_pretrained(folder, trust_remote_code=False))


def _read(hf_config: Any, name: str, default: Any = _REQUIRED) -> Any:
    """``hf_config.name``; a missing or null required field raises ValueError naming it."""
    value = getattr(hf_config, name, None)
    if value is None:
        if default is _REQUIRED:
            raise ValueError(f"model config has no {name} (config.json must set it)")
        return default
    return value


def _head_dim(hf_config: Any, hidden_size: int, num_heads: int) -> int:
    head_dim = _read(hf_config, "head_dim", None)
    if head_dim is not None:
        return head_dim
    if hidden_size % num_heads:
        raise ValueError(f"model config has no head_dim and hidden_size={hidden_size} is not divisible by "
                         f"num_attention_heads={num_heads}")
    return hidden_size // num_heads


def _token_ids(value: Any) -> tuple[int, ...]:
    """config.json's eos_token_id: absent, one id or a list of ids."""
    if value is None:
        return ()
    return tuple(value) if isinstance(value, (list, tuple)) else (value,)


def _checkpoint_dtype(hf_config: Any) -> torch.dtype | None:
    name = getattr(hf_config, "dtype", None)
    if name is None:  # older transformers keep it only as torch_dtype (newer ones alias it, with a warning)
        name = getattr(hf_config, "__dict__", {}).get("torch_dtype")
    return dtype_from_name(name)


def _check_positive_int(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"model config: {name} must be a positive integer, got {value!r}")


def _check_tp_size(tp_size: int) -> None:
    if isinstance(tp_size, bool) or not isinstance(tp_size, int) or tp_size < 1:
        raise ValueError(f"tensor_parallel_size must be a positive integer, got {tp_size!r}")
