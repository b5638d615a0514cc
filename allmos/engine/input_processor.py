"""Input processing: a user's prompt and sampling settings -> a validated, text-free ``EngineCoreRequest``.

Contract of ``InputProcessor.process``: it normalizes the prompt (a text, token ids or vLLM's prompt dicts,
through ``allmos.inputs``), tokenizes text (a plain prompt gets the tokenizer's BOS, a chat-templated one
already carries it), validates the prompt against the model (vocabulary) and the engine (context limit),
validates the sampling settings against the vocabulary, fills in request ids and ``generation_config.json``
defaults, and draws one seed per sequence (a user seed gives completion ``i`` the seed
``seed + i * SIBLING_SEED_STRIDE``; otherwise seeds come from the engine's RNG, seeded by
``EngineConfig.seed``, in request order). Bad input raises ValueError and changes nothing but the RNG.
Whether the request fits the KV cache, and whether its id is free, the engine core decides.

It also applies chat templates (conversation -> prompt text).
"""

from __future__ import annotations

import array
import itertools
import random
import time
from typing import TYPE_CHECKING, Any

import numpy as np

from allmos.engine.core_types import EngineCoreRequest
from allmos.inputs import ParsedPrompt, PromptType, parse_prompt
from allmos.sampling_params import SamplingParams

if TYPE_CHECKING:  # both import torch; this module does not
    from allmos.config import EngineConfig
    from allmos.models.resolve import ModelSource

# n > 1 with a user seed: completion i samples with seed + i * this (mod 2**63)
SIBLING_SEED_STRIDE = 0x9E3779B97F4A7C15


def load_tokenizer(config: EngineConfig, source: ModelSource):
    """The model's Hugging Face tokenizer, or None for a checkpoint without one (no remote code)."""
    if not source.has_tokenizer:
        return None
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(config.tokenizer or source.folder, trust_remote_code=False)


def eos_token_ids(source: ModelSource, tokenizer) -> frozenset[int]:
    """EOS ids from generation_config.json, the model config and the tokenizer, together."""
    ids: set[int] = set()
    for value in (source.generation_config.get("eos_token_id"), list(source.model_config.eos_token_ids)):
        ids.update(_as_list(value))
    if tokenizer is not None and tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return frozenset(ids)


class InputProcessor:
    """Prompts and sampling settings in, ``EngineCoreRequest`` out (see the module docstring)."""

    def __init__(self, config: EngineConfig, source: ModelSource, tokenizer, max_model_len: int,
                 vocab_size: int) -> None:
        self.tokenizer = tokenizer
        self.generation_config = source.generation_config
        self.max_model_len = max_model_len
        self.vocab_size = vocab_size
        self._rng = random.Random(config.seed)
        self._ids = itertools.count()

    def default_sampling_params(self) -> SamplingParams:
        """SamplingParams() with the model's generation_config.json defaults applied (as vLLM does)."""
        gen = self.generation_config
        keys = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty")  # same names in both
        kwargs = {key: gen[key] for key in keys if gen.get(key) is not None}
        if isinstance(kwargs.get("top_k"), float) and kwargs["top_k"].is_integer():
            kwargs["top_k"] = int(kwargs["top_k"])  # some configs write 20.0; SamplingParams takes ints
        if gen.get("do_sample") is False:
            kwargs["temperature"] = 0.0
        if gen.get("max_new_tokens"):
            kwargs["max_tokens"] = int(gen["max_new_tokens"])
        return SamplingParams(**kwargs)

    def tokenize(self, prompt: str | list[int]) -> list[int]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError("this model has no tokenizer (e.g. load_format='dummy' from a bare config.json): "
                                 "pass prompts as lists of token ids")
            # a chat template already carries its special tokens; a plain prompt gets the usual BOS
            templated = bool(self.tokenizer.bos_token) and prompt.startswith(self.tokenizer.bos_token)
            return self.tokenizer.encode(prompt, add_special_tokens=not templated)
        return list(prompt)

    def apply_chat_template(self, conversation: list[dict], *, chat_template: str | None = None,
                            add_generation_prompt: bool = True, **kwargs: Any) -> str:
        """The prompt text for one conversation (a list of ``{"role", "content"}`` dicts)."""
        tokenizer = self.tokenizer
        if tokenizer is None:
            raise ValueError("this model has no tokenizer, so chat() cannot apply a chat template")
        if chat_template is None and not getattr(tokenizer, "chat_template", None):
            raise ValueError("the tokenizer has no chat template; pass chat_template='...' (a Jinja template) "
                             "or use generate() with a plain prompt")
        for message in conversation:
            if not isinstance(message, dict) or "role" not in message or "content" not in message:
                raise ValueError(f"each chat message must be a dict with 'role' and 'content', got {message!r}")
        return tokenizer.apply_chat_template(conversation, chat_template=chat_template, tokenize=False,
                                             add_generation_prompt=add_generation_prompt, **kwargs)

    def process(self, request_id: str | None, prompt: PromptType | ParsedPrompt, params: SamplingParams | None,
                arrival_time: float | None = None) -> tuple[EngineCoreRequest, str | None]:
        """The core request for one prompt, and the prompt's text (None when given as token ids)."""
        params = self.default_sampling_params() if params is None else params
        if not isinstance(params, SamplingParams):
            raise ValueError(f"sampling params must be a SamplingParams, got {type(params).__name__}")
        parsed = prompt if isinstance(prompt, ParsedPrompt) else parse_prompt(prompt)
        request_id = str(next(self._ids)) if request_id is None else str(request_id)
        token_ids = self.tokenize(parsed.text) if parsed.token_ids is None else list(parsed.token_ids)
        self._validate_prompt(token_ids, params)
        seeds = [self._seed(params, i) for i in range(params.n)]
        request = EngineCoreRequest(request_id, token_ids, params, seeds, arrival_time or time.time())
        return request, parsed.text

    def _validate_prompt(self, token_ids: list[int], params: SamplingParams) -> None:
        if not token_ids:
            raise ValueError("The prompt is empty: give at least one token")
        max_len = self.max_model_len
        if len(token_ids) >= max_len:
            raise ValueError(f"This model's maximum context length is {max_len} tokens. However, your request has "
                             f"{len(token_ids)} input tokens, which leaves no room for output. Please reduce "
                             "the length of the prompt (or raise max_model_len).")
        if not _all_in_range(token_ids, self.vocab_size):
            bad = [t for t in token_ids if not (type(t) is int and 0 <= t < self.vocab_size)]
            raise ValueError(f"prompt token id {bad[0]!r} is outside the vocabulary [0, {self.vocab_size})")
        params.validate_for_vocab(self.vocab_size)

    def _seed(self, params: SamplingParams, index: int) -> int:
        if params.seed is None:
            return self._rng.getrandbits(63)
        return (params.seed + SIBLING_SEED_STRIDE * index) % 2**63


def _all_in_range(token_ids: list[int], vocab_size: int) -> bool:
    """Whether every id is an int in ``[0, vocab_size)``: one C-level pass into a 64-bit array (it refuses
    anything but integers) and numpy's min / max, about 3x faster than Python's per-token tests on long
    prompts. Prompts reach here as exact ints (the parser or the tokenizer made them)."""
    try:
        ids = np.frombuffer(array.array("q", token_ids), dtype=np.int64)
    except (TypeError, OverflowError):
        return False
    return bool(ids.min() >= 0 and ids.max() < vocab_size)


def _as_list(value) -> list[int]:
    if value is None:
        return []
    return [int(v) for v in value] if isinstance(value, (list, tuple)) else [int(value)]
