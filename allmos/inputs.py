"""The prompt forms the engine accepts (vLLM's): a text, a list of token ids, ``{"prompt": text}`` or
``{"prompt_token_ids": ids}``. Anything else raises ``ValueError`` saying what was given."""

from __future__ import annotations

import numbers
from dataclasses import dataclass
from typing import TypedDict


class TextPrompt(TypedDict):
    prompt: str


class TokensPrompt(TypedDict):
    prompt_token_ids: list[int]


PromptType = str | list[int] | TextPrompt | TokensPrompt

_FORMS = ("a str, a list of token ids, {'prompt': str} or {'prompt_token_ids': [int, ...]}")


@dataclass(frozen=True)
class ParsedPrompt:
    """Exactly one of ``text`` and ``token_ids`` is set; ``token_ids`` are plain ``int`` (the parser converts
    or refuses anything else)."""

    text: str | None
    token_ids: list[int] | None


def parse_prompt(prompt: object) -> ParsedPrompt:
    """One prompt in any accepted form; raises ValueError for any other value."""
    if isinstance(prompt, str):
        return ParsedPrompt(prompt, None)
    if isinstance(prompt, dict):
        return _parse_dict(prompt)
    if isinstance(prompt, (list, tuple)):
        return ParsedPrompt(None, _token_ids(prompt, "prompt"))
    raise ValueError(f"a prompt must be {_FORMS}; got {_describe(prompt)}")


def parse_prompts(prompts: object) -> list[ParsedPrompt]:
    """``generate``'s ``prompts``: one prompt in any form, or a list / tuple of them. A list of ints is one
    tokenized prompt (as in vLLM); a list mixing ints with other values is rejected."""
    if isinstance(prompts, (str, dict)):
        return [parse_prompt(prompts)]
    if not isinstance(prompts, (list, tuple)):
        raise ValueError(f"prompts must be {_FORMS}, or a list of these; got {_describe(prompts)}")
    if prompts and all(_is_token_id(t) for t in prompts):
        return [ParsedPrompt(None, [int(t) for t in prompts])]
    if any(_is_token_id(t) for t in prompts):
        bad = next(p for p in prompts if not _is_token_id(p))
        raise ValueError(f"prompts mixes token ids with {_describe(bad)}: give one list of token ids, or a list "
                         "of prompts")
    return [parse_prompt(p) for p in prompts]


def _parse_dict(prompt: dict) -> ParsedPrompt:
    keys = set(prompt)
    if keys == {"prompt"}:
        text = prompt["prompt"]
        if not isinstance(text, str):
            raise ValueError(f"the 'prompt' of a prompt dict must be a str, got {_describe(text)}")
        return ParsedPrompt(text, None)
    if keys == {"prompt_token_ids"}:
        ids = prompt["prompt_token_ids"]
        if not isinstance(ids, (list, tuple)):
            raise ValueError(f"'prompt_token_ids' must be a list of token ids, got {_describe(ids)}")
        return ParsedPrompt(None, _token_ids(ids, "prompt_token_ids"))
    raise ValueError(f"a prompt dict must have exactly one key, 'prompt' or 'prompt_token_ids'; got keys "
                     f"{sorted(map(str, keys))}")


def _token_ids(values: list | tuple, name: str) -> list[int]:
    if set(map(type, values)) == {int}:  # the common case, checked at a fraction of the cost below
        return list(values)
    for i, t in enumerate(values):
        if not _is_token_id(t):
            raise ValueError(f"{name} must hold integer token ids, got {_describe(t)} at index {i}")
    return [int(t) for t in values]


def _is_token_id(value: object) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _describe(value: object) -> str:
    text = repr(value)
    return f"{type(value).__name__} {text if len(text) <= 60 else text[:57] + '...'}"


def parse_token_id_prompts(prompt_token_ids: object) -> list[ParsedPrompt]:
    """vLLM's older ``generate(prompt_token_ids=...)``: one list of token ids or a list of such lists."""
    if not isinstance(prompt_token_ids, (list, tuple)):
        raise ValueError(f"prompt_token_ids must be a list of token ids or a list of such lists, got "
                         f"{_describe(prompt_token_ids)}")
    if prompt_token_ids and all(_is_token_id(t) for t in prompt_token_ids):
        return [ParsedPrompt(None, [int(t) for t in prompt_token_ids])]
    prompts = []
    for ids in prompt_token_ids:
        if not isinstance(ids, (list, tuple)):
            raise ValueError(f"prompt_token_ids must be a list of token ids or a list of such lists, got an "
                             f"element {_describe(ids)}")
        prompts.append(ParsedPrompt(None, _token_ids(ids, "prompt_token_ids")))
    return prompts
