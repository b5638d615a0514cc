"""The OpenAI endpoints' logic: requests -> sampling parameters and token ids -> core requests ->
responses (JSON, or server-sent events exactly as OpenAI frames them).

Every request is validated completely before anything reaches the core, so a bad request (400) never
touches other requests. Streams are driven by the request's output queue (see ``output_processor``);
whatever ends a handler early (client disconnect, cancellation, an error) aborts its requests in the
core, which frees their KV blocks.
"""

from __future__ import annotations

import asyncio
import re
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass

import msgspec

from allmos.sampling_params import SamplingParams
from allmos.server.engine_client import EngineClient, EngineDeadError
from allmos.server.openai_protocol import (
    APIError,
    ChatMessage,
    CompletionRequest,
    bad_request,
)
from allmos.server.output_processor import RequestState, SeqOutput, new_request_state
from allmos.server.protocol import SamplingSettings

MAX_LOGPROBS = 20
_SAMPLING_FIELD = re.compile(r"SamplingParams\.(\w+)")
_JSON = msgspec.json.Encoder()


@dataclass(frozen=True)
class ServingConfig:
    served_model_names: tuple[str, ...]
    max_num_seqs: int
    max_queued_requests: int
    chat_template: str | None = None


class OpenAIServing:
    """What the OpenAI endpoints share: validation, tokenization, submission to the core, output streams."""

    def __init__(self, client: EngineClient, tokenizer, config: ServingConfig, metrics=None) -> None:
        self.client = client
        self.metrics = metrics
        self.tokenizer = tokenizer
        self.config = config
        self.info = client.ready
        self._token_text: dict[int, str] = {}

    @property
    def model_name(self) -> str:
        return self.config.served_model_names[0]

    # ------------------------------------------------------------------ shared checks
    def check_model(self, model: str | None) -> None:
        if model is not None and model not in self.config.served_model_names:
            raise APIError(404, f"The model `{model}` does not exist.", "invalid_request_error", "model",
                           "model_not_found")

    def check_capacity(self) -> None:
        if not self.client.is_alive:
            raise APIError(503, f"the engine is not running: {self.client.dead_reason}", "server_error", None,
                           "engine_unavailable")
        limit = self.config.max_num_seqs + self.config.max_queued_requests
        if len(self.client.processor.states) >= limit:
            raise APIError(503, f"the server is overloaded ({limit} requests open); retry later", "server_error",
                           None, "overloaded")

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of a prompt; a text that already starts with BOS (a chat template's) gets no second one."""
        if self.tokenizer is None:
            raise bad_request("this model has no tokenizer: send prompts as token ids", "prompt")
        bos = self.tokenizer.bos_token
        templated = bool(bos) and text.startswith(bos)
        return self.tokenizer.encode(text, add_special_tokens=add_special_tokens and not templated)

    def check_prompt(self, token_ids: list[int], param: str) -> None:
        if not token_ids:
            raise bad_request("the prompt is empty: give at least one token", param)
        vocab = self.info.vocab_size
        bad = next((t for t in token_ids if not 0 <= t < vocab), None)
        if bad is not None:
            raise bad_request(f"prompt token id {bad} is outside the vocabulary [0, {vocab})", param)
        max_len = self.info.max_model_len
        if len(token_ids) >= max_len:
            raise bad_request(f"This model's maximum context length is {max_len} tokens. However, your request has "
                              f"{len(token_ids)} input tokens, which leaves no room for output. Please reduce the "
                              "length of the input.", param)

    def token_text(self, token_id: int) -> str:
        """A token's text for logprobs (``token_id:N`` without a tokenizer, as vLLM's token-id option)."""
        if self.tokenizer is None:
            return f"token_id:{token_id}"
        text = self._token_text.get(token_id)
        if text is None:
            text = self._token_text[token_id] = self.tokenizer.decode([token_id])
        return text

    # ------------------------------------------------------------------ sampling parameters
    def sampling_params(self, req, *, max_tokens: int | None, max_tokens_param: str, logprobs: int | None,
                        logprobs_param: str, prompt_len: int) -> SamplingParams:
        """SamplingParams for ``req`` (400 naming the field when a value is invalid). Unset fields take
        the model's generation_config defaults, an unset ``max_tokens`` the rest of the context (as vLLM)."""
        self._check_request_limits(req, logprobs, logprobs_param)
        max_tokens = self._max_tokens(max_tokens, max_tokens_param, prompt_len)
        defaults = self.info.default_sampling

        def pick(value, key, fallback):
            return value if value is not None else defaults.get(key, fallback)

        try:
            params = SamplingParams(
                n=req.n, temperature=pick(req.temperature, "temperature", 1.0), top_p=pick(req.top_p, "top_p", 1.0),
                top_k=pick(req.top_k, "top_k", -1), min_p=pick(req.min_p, "min_p", 0.0), seed=req.seed,
                max_tokens=max_tokens, min_tokens=req.min_tokens, ignore_eos=req.ignore_eos, stop=req.stop,
                stop_token_ids=req.stop_token_ids, include_stop_str_in_output=req.include_stop_str_in_output,
                presence_penalty=req.presence_penalty, frequency_penalty=req.frequency_penalty,
                repetition_penalty=pick(req.repetition_penalty, "repetition_penalty", 1.0), logprobs=logprobs,
                skip_special_tokens=req.skip_special_tokens)
            params.validate_for_vocab(self.info.vocab_size)
        except ValueError as exc:
            raise _field_error(exc, {"logprobs": logprobs_param, "max_tokens": max_tokens_param}) from None
        self._check_fits(prompt_len, params)
        return params

    def _check_request_limits(self, req, logprobs: int | None, logprobs_param: str) -> None:
        """What SamplingParams does not check: unsupported fields and the server's own limits."""
        if req.logit_bias:
            raise bad_request("logit_bias is not supported by this server", "logit_bias")
        if req.stream_options is not None and not req.stream:
            raise bad_request("stream_options is only allowed together with stream=true", "stream_options")
        if req.stop and self.tokenizer is None:
            raise bad_request("stop strings need a tokenizer, and this model has none; use stop_token_ids", "stop")
        if req.n > self.config.max_num_seqs:
            raise bad_request(f"n must be <= {self.config.max_num_seqs} (max_num_seqs), got {req.n}", "n")
        if logprobs is not None and not 0 <= logprobs <= MAX_LOGPROBS:
            raise bad_request(f"{logprobs_param} must be between 0 and {MAX_LOGPROBS}, got {logprobs}",
                              logprobs_param)

    def _max_tokens(self, max_tokens: int | None, param: str, prompt_len: int) -> int | None:
        """The request's output limit; prompt + output beyond the context is a 400 (as vLLM), not a cut."""
        max_len = self.info.max_model_len
        if max_tokens is None:
            return max_len - prompt_len
        if isinstance(max_tokens, int) and max_tokens >= 1 and prompt_len + max_tokens > max_len:
            raise bad_request(f"This model's maximum context length is {max_len} tokens. However, you requested "
                              f"{prompt_len + max_tokens} tokens ({prompt_len} in the input, {max_tokens} in the "
                              "completion). Please reduce the length of the input or completion.", param)
        return max_tokens  # other bad values: SamplingParams names them

    def _check_fits(self, prompt_len: int, params: SamplingParams) -> None:
        info = self.info
        longest = min(prompt_len + params.max_tokens, info.max_model_len)
        needed = -(-longest // info.block_size)
        if needed > info.num_kv_blocks:
            raise bad_request(f"this request needs up to {longest} tokens ({needed} KV blocks of {info.block_size}) "
                              f"but the whole KV cache holds {info.num_kv_blocks} blocks; lower max_tokens or "
                              "shorten the prompt", "max_tokens")

    # ------------------------------------------------------------------ submitting
    def submit(self, prompts: list[list[int]], params: list[SamplingParams], prefix: str,
               arrival: float) -> list[RequestState]:
        """Create one core request per prompt (ids ``{prefix}-{i}``), all sharing one output queue."""
        self.check_capacity()
        shared: asyncio.Queue = asyncio.Queue()
        states = []
        try:
            for i, (token_ids, p) in enumerate(zip(prompts, params)):
                state = new_request_state(f"{prefix}-{i}", token_ids, p, self.tokenizer, arrival)
                state.queue = shared
                self.client.add(state, _core_settings(p))
                states.append(state)
        except EngineDeadError as exc:
            self.client.abort([s.request_id for s in states])
            raise APIError(503, str(exc), "server_error", None, "engine_unavailable") from None
        return states

    async def outputs(self, states: list[RequestState]) -> AsyncIterator[list[tuple[int, SeqOutput]]]:
        """Yield what arrived, as (prompt index, output) pairs, until every sequence ended; aborts what is
        still running when the consumer stops early (disconnect, error)."""
        position = {s.request_id: i for i, s in enumerate(states)}
        remaining = sum(s.params.n for s in states)
        queue = states[0].queue
        try:
            while remaining:
                items = [await queue.get()]
                while not queue.empty():
                    items.append(queue.get_nowait())
                batch = []
                for state, outs in items:
                    if isinstance(outs, Exception):
                        raise outs
                    for out in outs:
                        remaining -= out.finish_reason is not None
                        batch.append((position[state.request_id], out))
                yield batch
        finally:
            open_ids = [s.request_id for s in states if s.request_id in self.client.processor.states]
            if open_ids:
                self.client.abort(open_ids)
                if self.metrics is not None:
                    for _ in open_ids:
                        self.metrics.count_finished("abort")


# ---------------------------------------------------------------------- helpers
def _field_error(exc: ValueError, api_names: dict[str, str]) -> APIError:
    """A SamplingParams ValueError as a 400 naming the request's field (``max_completion_tokens``, ...)."""
    match = _SAMPLING_FIELD.search(str(exc))
    if match is None:
        return bad_request(str(exc))
    name = match.group(1)
    param = api_names.get(name, name)
    return bad_request(str(exc).replace(f"SamplingParams.{name}", param), param)


def _core_settings(params: SamplingParams) -> SamplingSettings:
    return SamplingSettings(
        n=params.n, temperature=params.temperature, top_p=params.top_p, top_k=params.top_k, min_p=params.min_p,
        seed=params.seed, max_tokens=params.max_tokens, min_tokens=params.min_tokens, ignore_eos=params.ignore_eos,
        stop_token_ids=list(params.stop_token_ids), presence_penalty=params.presence_penalty,
        frequency_penalty=params.frequency_penalty, repetition_penalty=params.repetition_penalty,
        logprobs=params.logprobs)


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


# Line separators that JSON leaves raw inside strings but line splitters such as str.splitlines() honour:
# escaped, so no client can cut an event in two.
_RAW_SEPARATORS = ((b"\xe2\x80\xa8", b"\\u2028"), (b"\xe2\x80\xa9", b"\\u2029"), (b"\xc2\x85", b"\\u0085"))


def sse(payload) -> bytes:
    """One server-sent event: ``data: <json>`` and a blank line."""
    data = _JSON.encode(payload)
    if b"\xe2\x80" in data or b"\xc2\x85" in data:
        for raw, escaped in _RAW_SEPARATORS:
            data = data.replace(raw, escaped)
    return b"data: " + data + b"\n\n"


SSE_DONE = b"data: [DONE]\n\n"


def sse_error(error: APIError) -> bytes:
    return sse(error.body())


def to_api_error(exc: Exception) -> APIError:
    """The API error for an exception that ended a request after admission."""
    if isinstance(exc, APIError):
        return exc
    if isinstance(exc, EngineDeadError):
        return APIError(503, str(exc), "server_error", None, "engine_unavailable")
    if isinstance(exc, ValueError):  # rejected by the engine at admission
        return bad_request(str(exc))
    return APIError(500, f"internal error: {type(exc).__name__}: {exc}", "server_error")


def chat_messages(messages: list[ChatMessage] | None) -> list[dict]:
    """Messages as the chat template wants them; multi-part content must be text parts."""
    if not messages:
        raise bad_request("messages must be a non-empty list", "messages")
    result = []
    for i, message in enumerate(messages):
        content = message.content
        if isinstance(content, list):
            parts = []
            for j, part in enumerate(content):
                if part.get("type") != "text" or not isinstance(part.get("text"), str):
                    raise bad_request("only text content parts ({\"type\": \"text\", \"text\": ...}) are supported",
                                      f"messages[{i}].content[{j}]")
                parts.append(part["text"])
            content = "\n".join(parts)
        entry = {"role": message.role, "content": content if content is not None else ""}
        if message.name is not None:
            entry["name"] = message.name
        result.append(entry)
    return result


def completion_prompts(req: CompletionRequest) -> list[str | list[int]]:
    """The prompts of a completion request: texts or token-id lists (OpenAI's four shapes)."""
    prompt = req.prompt
    if prompt is None:
        raise bad_request("prompt is required", "prompt")
    if isinstance(prompt, str):
        return [prompt]
    if not prompt:
        raise bad_request("prompt must not be an empty list", "prompt")
    if all(isinstance(p, int) for p in prompt):
        return [list(prompt)]
    if all(isinstance(p, str) for p in prompt):
        return list(prompt)
    if all(isinstance(p, list) for p in prompt):
        return [list(p) for p in prompt]
    raise bad_request("prompt must be a string, a list of strings, a list of token ids or a list of lists of token "
                      "ids (not a mix)", "prompt")
