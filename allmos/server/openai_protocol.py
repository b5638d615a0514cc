"""OpenAI request bodies (msgspec structs, vLLM's extra sampling fields included) and the error schema.

Decoding is strict about types (``"max_tokens": "5"`` is a 400 naming ``max_tokens``) and ignores
unknown fields, as OpenAI-compatible servers do. Values are checked later, when sampling parameters are
built (``allmos.server.serving``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import msgspec


@dataclass
class APIError(Exception):
    """An error answered in OpenAI's schema: ``{"error": {"message", "type", "param", "code"}}``."""

    status: int
    message: str
    type: str = "invalid_request_error"
    param: str | None = None
    code: str | None = None

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def bad_request(message: str, param: str | None = None) -> APIError:
    return APIError(400, message, "invalid_request_error", param, None)


class StreamOptions(msgspec.Struct):
    include_usage: bool = False
    continuous_usage_stats: bool = False


class _SamplingFields(msgspec.Struct):
    """Fields shared by completions and chat completions (None: not given)."""

    model: str | None = None
    n: int = 1
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    seed: int | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    include_stop_str_in_output: bool = False
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float | None = None
    ignore_eos: bool = False
    min_tokens: int = 0
    skip_special_tokens: bool = True
    stream: bool = False
    stream_options: StreamOptions | None = None
    logit_bias: dict[str, float] | None = None
    user: str | None = None


class CompletionRequest(_SamplingFields):
    prompt: str | list[str | int | list[int]] | None = None
    max_tokens: int | None = 16
    logprobs: int | None = None
    echo: bool = False
    best_of: int | None = None
    suffix: str | None = None


class ChatMessage(msgspec.Struct):
    role: str
    content: str | list[dict] | None = None
    name: str | None = None


class ChatCompletionRequest(_SamplingFields):
    messages: list[ChatMessage] | None = None
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = None
    tools: list[dict] | None = None
    tool_choice: str | dict | None = None
    response_format: dict | None = None
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    chat_template_kwargs: dict | None = None


class TokenizeRequest(msgspec.Struct):
    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: bool = True
    add_generation_prompt: bool = True


class DetokenizeRequest(msgspec.Struct):
    tokens: list[int]
    model: str | None = None


_PATH = re.compile(r"at `\$\.?([^`]*)`")


def decode_body(body: bytes, kind: type):
    """Decode a JSON request body into ``kind``; every failure is a 400 naming the field when there is one."""
    if not body.strip():
        raise bad_request("the request body is empty; send a JSON object")
    try:
        return msgspec.json.decode(body, type=kind)
    except msgspec.ValidationError as exc:
        raise bad_request(f"invalid request: {exc}", _error_param(str(exc))) from None
    except msgspec.DecodeError as exc:
        raise bad_request(f"the request body is not valid JSON: {exc}") from None


def _error_param(message: str) -> str | None:
    """The field a msgspec validation message points at (``$.messages[0]`` + missing ``role``)."""
    match = _PATH.search(message)
    path = match.group(1) if match else ""
    missing = re.search(r"missing required field `([^`]+)`", message)
    if missing:
        return f"{path}.{missing.group(1)}" if path else missing.group(1)
    return path or None
