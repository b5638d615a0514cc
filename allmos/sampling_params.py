"""User-facing sampling parameters (vLLM names and defaults), validated on construction."""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

# Largest ``n`` (completions per prompt). Every completion is a sequence of its own, so a huge ``n`` would
# queue that many sequences behind one call; vLLM's OpenAI server has no bound, allmos picks this one.
MAX_N = 1024

_INT_FIELDS = ("n", "top_k", "min_tokens")
_OPTIONAL_INT_FIELDS = ("seed", "max_tokens", "logprobs", "prompt_logprobs")
_FLOAT_FIELDS = ("temperature", "top_p", "min_p", "presence_penalty", "frequency_penalty", "repetition_penalty")
_BOOL_FIELDS = ("ignore_eos", "include_stop_str_in_output", "skip_special_tokens")


@dataclass
class SamplingParams:
    """How one request is sampled and when it stops.

    ``temperature=0`` is greedy; ``top_k`` of 0 or -1 is off. ``n`` is at most ``MAX_N`` (1024).
    ``max_tokens`` defaults to 64 (vLLM's default is 16); ``None`` generates up to ``max_model_len``.
    ``logprobs=k`` returns, per generated token, a dict ``token_id -> Logprob`` holding the sampled token
    and the ``k`` most likely ones; ``prompt_logprobs=k`` the same for every prompt position (the first is
    ``None``), and such a request computes its whole prompt (no prefix-cache hits).

    Types are checked as well as ranges: integer fields take ints (not bools, not strings), float fields
    take ints or floats (finite), flags take bools. Every invalid value raises ``ValueError`` naming the
    field. Values that need the vocabulary (token ids, logprob counts) are checked again by the engine.
    """

    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    min_p: float = 0.0
    seed: int | None = None
    max_tokens: int | None = 64
    min_tokens: int = 0
    ignore_eos: bool = False
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    include_stop_str_in_output: bool = False
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    skip_special_tokens: bool = True

    def __post_init__(self) -> None:
        self._coerce_types()
        self._validate()

    def _coerce_types(self) -> None:
        """Check every field's type and store plain Python values (numpy scalars become int / float)."""
        for name in _INT_FIELDS:
            setattr(self, name, _as_int(name, getattr(self, name)))
        for name in _OPTIONAL_INT_FIELDS:
            value = getattr(self, name)
            setattr(self, name, None if value is None else _as_int(name, value))
        for name in _FLOAT_FIELDS:
            setattr(self, name, _as_float(name, getattr(self, name)))
        for name in _BOOL_FIELDS:
            value = getattr(self, name)
            _check(isinstance(value, bool), name, f"must be True or False, got {_describe(value)}")
        self.stop = _as_stop_list(self.stop)
        self.stop_token_ids = _as_token_list(self.stop_token_ids)

    def _validate(self) -> None:
        _check(1 <= self.n <= MAX_N, "n", f"must be an integer in [1, {MAX_N}], got {self.n}")
        _check(self.temperature >= 0, "temperature", f"must be >= 0, got {self.temperature}")
        _check(0 < self.top_p <= 1, "top_p", f"must be in (0, 1], got {self.top_p}")
        _check(self.top_k >= -1, "top_k", f"must be -1 (off), 0 (off) or a positive integer, got {self.top_k}")
        _check(0 <= self.min_p <= 1, "min_p", f"must be in [0, 1], got {self.min_p}")
        _check(self.seed is None or 0 <= self.seed < 2**63, "seed",
               f"must be None or an integer in [0, 2**63), got {self.seed}")
        _check(self.max_tokens is None or self.max_tokens >= 1, "max_tokens",
               f"must be an integer >= 1, got {self.max_tokens}")
        _check(self.min_tokens >= 0, "min_tokens", f"must be an integer >= 0, got {self.min_tokens}")
        _check(self.max_tokens is None or self.min_tokens <= self.max_tokens, "min_tokens",
               f"({self.min_tokens}) must be <= max_tokens ({self.max_tokens})")
        _check(-2 <= self.presence_penalty <= 2, "presence_penalty",
               f"must be in [-2, 2], got {self.presence_penalty}")
        _check(-2 <= self.frequency_penalty <= 2, "frequency_penalty",
               f"must be in [-2, 2], got {self.frequency_penalty}")
        _check(self.repetition_penalty > 0, "repetition_penalty", f"must be > 0, got {self.repetition_penalty}")
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(self, name)
            _check(value is None or value >= 0, name, f"must be None or an integer >= 0, got {value}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def has_penalties(self) -> bool:
        """Presence, frequency or repetition penalty active: sampling then reads the request's tokens."""
        return bool(self.presence_penalty or self.frequency_penalty or self.repetition_penalty != 1.0)

    def validate_for_vocab(self, vocab_size: int) -> None:
        """Check token ids against the model's vocabulary (called by the engine at admission)."""
        for t in self.stop_token_ids:
            _check(t < vocab_size, "stop_token_ids", f"token id {t} is outside the vocabulary (size {vocab_size})")
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(self, name)
            _check(value is None or value <= vocab_size, name,
                   f"must be <= the vocabulary size {vocab_size}, got {value}")


def _check(ok: bool, name: str, message: str) -> None:
    if not ok:
        raise ValueError(f"SamplingParams.{name} {message}")


def _describe(value: object) -> str:
    return f"{type(value).__name__} {value!r}"


def _as_int(name: str, value: object) -> int:
    _check(isinstance(value, numbers.Integral) and not isinstance(value, bool), name,
           f"must be an integer, got {_describe(value)}")
    return int(value)


def _as_float(name: str, value: object) -> float:
    _check(isinstance(value, numbers.Real) and not isinstance(value, bool), name,
           f"must be a number, got {_describe(value)}")
    value = float(value)
    _check(math.isfinite(value), name, f"must be finite, got {value}")
    return value


def _as_stop_list(stop: object) -> list[str]:
    if stop is None:
        return []
    if isinstance(stop, str):
        stop = [stop]
    _check(isinstance(stop, (list, tuple)), "stop", f"must be a string or a list of strings, got {_describe(stop)}")
    for s in stop:
        _check(isinstance(s, str), "stop", f"must hold strings (stop strings), got {_describe(s)}")
        _check(len(s) > 0, "stop", "must hold non-empty strings, got ''")
    return list(stop)


def _as_token_list(ids: object) -> list[int]:
    if ids is None:
        return []
    _check(isinstance(ids, (list, tuple)), "stop_token_ids",
           f"must be a list of token ids, got {_describe(ids)}")
    out = []
    for t in ids:
        _check(isinstance(t, numbers.Integral) and not isinstance(t, bool) and t >= 0, "stop_token_ids",
               f"must hold token ids (integers >= 0), got {_describe(t)}")
        out.append(int(t))
    return out
