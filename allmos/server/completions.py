"""``POST /v1/completions`` and ``POST /v1/chat/completions``: responses and streams in OpenAI's shapes."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from allmos.server.openai_protocol import APIError, ChatCompletionRequest, CompletionRequest, bad_request
from allmos.server.output_processor import RequestState, SeqOutput
from allmos.server.serving import (
    SSE_DONE,
    OpenAIServing,
    chat_messages,
    completion_prompts,
    new_id,
    sse,
    sse_error,
    to_api_error,
)


@dataclass
class _Choice:
    """Everything one choice has produced (non-streaming) or sent so far (streaming)."""

    index: int
    text: list[str] = field(default_factory=list)
    num_tokens: int = 0
    logprobs: list = field(default_factory=list)  # raw entries: [(sampled id, lp), (top id, lp), ...]
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    text_offset: int = 0  # completions logprobs: where the next token's text starts
    started: bool = False

    def add(self, out: SeqOutput) -> None:
        self.text.append(out.text)
        self.num_tokens += len(out.token_ids)
        if out.logprobs is not None:
            self.logprobs.extend(out.logprobs)
        if out.finish_reason is not None:
            self.finish_reason, self.stop_reason = out.finish_reason, out.stop_reason


@dataclass
class _Job:
    """One HTTP request's admitted work."""

    id: str
    created: int
    model: str
    states: list[RequestState]
    n: int
    num_logprobs: int | None
    include_usage: bool = False
    continuous_usage: bool = False
    echo: list[str] | None = None  # completions with echo: the prompt texts

    def choice_index(self, prompt_index: int, out: SeqOutput) -> int:
        return prompt_index * self.n + out.index

    def usage(self, completion_tokens: int) -> dict:
        prompt_tokens = sum(len(s.prompt_token_ids) for s in self.states)
        return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                "total_tokens": prompt_tokens + completion_tokens,
                "prompt_tokens_details": {"cached_tokens": sum(s.num_cached_tokens for s in self.states)}}


def _top_entries(entry: list[tuple[int, float]], k: int) -> list[tuple[int, float]]:
    """The top-k part of a logprob entry (sampled first, then the top k, deduplicated by token id)."""
    return list(entry[1:]) if len(entry) > k else sorted(entry, key=lambda e: -e[1])


def _merge(job: _Job, batch: list[tuple[int, SeqOutput]]) -> dict[int, list[SeqOutput]]:
    merged: dict[int, list[SeqOutput]] = {}
    for prompt_index, out in batch:
        merged.setdefault(job.choice_index(prompt_index, out), []).append(out)
    return merged


# ---------------------------------------------------------------------- completions
class CompletionEndpoint:
    def __init__(self, serving: OpenAIServing) -> None:
        self.serving = serving

    def admit(self, req: CompletionRequest) -> _Job:
        s = self.serving
        s.check_model(req.model)
        if req.best_of is not None and req.best_of != req.n:
            raise bad_request("best_of other than n is not supported", "best_of")
        if req.suffix:
            raise bad_request("suffix is not supported by this server", "suffix")
        if req.echo and req.logprobs is not None:
            raise bad_request("echo together with logprobs (prompt logprobs) is not supported", "echo")
        arrival = time.time()
        prompts = completion_prompts(req)
        token_lists = [s.encode(p) if isinstance(p, str) else p for p in prompts]
        for ids in token_lists:
            s.check_prompt(ids, "prompt")
        params = [s.sampling_params(req, max_tokens=req.max_tokens, max_tokens_param="max_tokens",
                                    logprobs=req.logprobs, logprobs_param="logprobs", prompt_len=len(ids))
                  for ids in token_lists]
        job_id = new_id("cmpl")
        echo = None
        if req.echo:
            if s.tokenizer is None:
                raise bad_request("echo needs a tokenizer, and this model has none", "echo")
            echo = [p if isinstance(p, str) else s.tokenizer.decode(p) for p in prompts]
        states = s.submit(token_lists, params, job_id, arrival)
        opts = req.stream_options
        return _Job(job_id, int(arrival), req.model or s.model_name, states, req.n, req.logprobs,
                    include_usage=bool(opts and opts.include_usage),
                    continuous_usage=bool(opts and opts.continuous_usage_stats), echo=echo)

    def _logprobs(self, choice: _Choice, entries: list, k: int) -> dict:
        text_of = self.serving.token_text
        tokens, token_logprobs, tops, offsets = [], [], [], []
        for entry in entries:
            token, logprob = entry[0]
            text = text_of(token)
            tokens.append(text)
            token_logprobs.append(logprob)
            tops.append({text_of(t): lp for t, lp in _top_entries(entry, k)})
            offsets.append(choice.text_offset)
            choice.text_offset += len(text)
        return {"tokens": tokens, "token_logprobs": token_logprobs, "top_logprobs": tops, "text_offset": offsets}

    def _echo(self, job: _Job, index: int) -> str:
        return job.echo[index // job.n] if job.echo is not None else ""

    async def full(self, job: _Job) -> dict:
        choices = [_Choice(i) for i in range(len(job.states) * job.n)]
        for choice in choices:
            choice.text.append(self._echo(job, choice.index))
            choice.text_offset = len(choice.text[0])
        async for batch in self.serving.outputs(job.states):
            for prompt_index, out in batch:
                choices[job.choice_index(prompt_index, out)].add(out)
        body = []
        for c in choices:
            logprobs = self._logprobs(c, c.logprobs, job.num_logprobs) if job.num_logprobs is not None else None
            body.append({"index": c.index, "text": "".join(c.text), "logprobs": logprobs,
                         "finish_reason": c.finish_reason, "stop_reason": c.stop_reason})
        return {"id": job.id, "object": "text_completion", "created": job.created, "model": job.model,
                "choices": body, "usage": job.usage(sum(c.num_tokens for c in choices))}

    def _chunk(self, job: _Job, choices: list[dict]) -> dict:
        return {"id": job.id, "object": "text_completion", "created": job.created, "model": job.model,
                "choices": choices}

    def _stream_choice(self, job: _Job, choice: _Choice, outs: list[SeqOutput]) -> dict | None:
        """One choice's entry in a stream chunk for what ``outs`` added (None when they added nothing)."""
        text = ""
        if not choice.started:  # the first chunk of a choice carries the echoed prompt
            text = self._echo(job, choice.index)
            choice.text_offset, choice.started = len(text), True
        entries = [e for o in outs for e in (o.logprobs or ())]
        num_before = choice.num_tokens
        for out in outs:
            choice.add(out)
        text += "".join(o.text for o in outs)
        finished = outs[-1].finish_reason is not None
        if not (text or choice.num_tokens > num_before or finished):
            return None
        logprobs = self._logprobs(choice, entries, job.num_logprobs) if job.num_logprobs is not None else None
        return {"index": choice.index, "text": text, "logprobs": logprobs,
                "finish_reason": choice.finish_reason if finished else None,
                "stop_reason": choice.stop_reason if finished else None}

    async def stream(self, job: _Job) -> AsyncIterator[bytes]:
        choices = [_Choice(i) for i in range(len(job.states) * job.n)]
        try:
            async for batch in self.serving.outputs(job.states):
                for index, outs in _merge(job, batch).items():
                    entry = self._stream_choice(job, choices[index], outs)
                    if entry is None:
                        continue
                    chunk = self._chunk(job, [entry])
                    if job.include_usage:
                        chunk["usage"] = job.usage(sum(c.num_tokens for c in choices)) if job.continuous_usage \
                            else None
                    yield sse(chunk)
            if job.include_usage:
                chunk = self._chunk(job, [])
                chunk["usage"] = job.usage(sum(c.num_tokens for c in choices))
                yield sse(chunk)
        except Exception as exc:  # after the headers: report in the stream, as OpenAI-compatible servers do
            yield sse_error(to_api_error(exc))
        yield SSE_DONE


# ---------------------------------------------------------------------- chat
class ChatEndpoint:
    def __init__(self, serving: OpenAIServing) -> None:
        self.serving = serving

    def prompt_text(self, messages: list[dict], *, add_generation_prompt: bool = True,
                    continue_final_message: bool = False, chat_template_kwargs: dict | None = None) -> str:
        s = self.serving
        template = s.config.chat_template
        if s.tokenizer is None:
            raise bad_request("this model has no tokenizer, so it cannot chat; use /v1/completions with token ids",
                              "messages")
        if template is None and not getattr(s.tokenizer, "chat_template", None):
            raise bad_request("the model has no chat template; start the server with --chat-template", "messages")
        try:
            return s.tokenizer.apply_chat_template(
                messages, chat_template=template, tokenize=False,
                add_generation_prompt=add_generation_prompt and not continue_final_message,
                continue_final_message=continue_final_message, **(chat_template_kwargs or {}))
        except Exception as exc:  # a template error is the request's fault (roles, order, content)
            raise bad_request(f"the chat template could not render these messages: {exc}", "messages") from None

    def admit(self, req: ChatCompletionRequest) -> _Job:
        s = self.serving
        s.check_model(req.model)
        if req.tools:
            raise bad_request("tools are not supported by this server", "tools")
        if req.response_format and req.response_format.get("type", "text") != "text":
            raise bad_request("only response_format {\"type\": \"text\"} is supported", "response_format")
        if req.top_logprobs is not None and not req.logprobs:
            raise bad_request("top_logprobs needs logprobs=true", "top_logprobs")
        arrival = time.time()
        text = self.prompt_text(chat_messages(req.messages), add_generation_prompt=req.add_generation_prompt,
                                continue_final_message=req.continue_final_message,
                                chat_template_kwargs=req.chat_template_kwargs)
        token_ids = s.encode(text)
        s.check_prompt(token_ids, "messages")
        max_tokens, param = req.max_tokens, "max_tokens"
        if req.max_completion_tokens is not None:
            max_tokens, param = req.max_completion_tokens, "max_completion_tokens"
        num_logprobs = (req.top_logprobs or 0) if req.logprobs else None
        params = s.sampling_params(req, max_tokens=max_tokens, max_tokens_param=param, logprobs=num_logprobs,
                                   logprobs_param="top_logprobs", prompt_len=len(token_ids))
        job_id = new_id("chatcmpl")
        states = s.submit([token_ids], [params], job_id, arrival)
        opts = req.stream_options
        return _Job(job_id, int(arrival), req.model or s.model_name, states, req.n, num_logprobs,
                    include_usage=bool(opts and opts.include_usage),
                    continuous_usage=bool(opts and opts.continuous_usage_stats))

    def _logprobs(self, entries: list, k: int) -> dict:
        text_of = self.serving.token_text

        def item(token: int, logprob: float) -> dict:
            text = text_of(token)
            return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8"))}

        content = []
        for entry in entries:
            first = item(*entry[0])
            first["top_logprobs"] = [item(t, lp) for t, lp in _top_entries(entry, k)]
            content.append(first)
        return {"content": content}

    def _chunk(self, job: _Job, choices: list[dict]) -> dict:
        return {"id": job.id, "object": "chat.completion.chunk", "created": job.created, "model": job.model,
                "choices": choices}

    async def full(self, job: _Job) -> dict:
        choices = [_Choice(i) for i in range(job.n)]
        async for batch in self.serving.outputs(job.states):
            for _, out in batch:
                choices[out.index].add(out)
        body = [{"index": c.index, "message": {"role": "assistant", "content": "".join(c.text)},
                 "logprobs": self._logprobs(c.logprobs, job.num_logprobs) if job.num_logprobs is not None else None,
                 "finish_reason": c.finish_reason, "stop_reason": c.stop_reason} for c in choices]
        return {"id": job.id, "object": "chat.completion", "created": job.created, "model": job.model,
                "choices": body, "usage": job.usage(sum(c.num_tokens for c in choices))}

    def _stream_choice(self, job: _Job, index: int, outs: list[SeqOutput]) -> dict | None:
        """One choice's entry in a stream chunk: the content delta (None when ``outs`` added nothing)."""
        text = "".join(o.text for o in outs)
        last = outs[-1]
        if not (text or any(o.token_ids for o in outs) or last.finish_reason):
            return None
        entries = [e for o in outs for e in (o.logprobs or ())]
        logprobs = self._logprobs(entries, job.num_logprobs) if job.num_logprobs is not None else None
        entry = {"index": index, "delta": {"content": text} if text else {}, "logprobs": logprobs,
                 "finish_reason": last.finish_reason}
        if last.finish_reason is not None:
            entry["stop_reason"] = last.stop_reason
        return entry

    async def stream(self, job: _Job) -> AsyncIterator[bytes]:
        total = 0

        def usage_field(chunk: dict) -> dict:
            if job.include_usage:
                chunk["usage"] = job.usage(total) if job.continuous_usage else None
            return chunk

        try:
            for index in range(job.n):  # OpenAI's first chunk per choice: the role
                yield sse(usage_field(self._chunk(job, [{"index": index, "delta": {"role": "assistant", "content": ""},
                                                         "logprobs": None, "finish_reason": None}])))
            async for batch in self.serving.outputs(job.states):
                for index, outs in _merge(job, batch).items():
                    total += sum(len(o.token_ids) for o in outs)
                    entry = self._stream_choice(job, index, outs)
                    if entry is not None:
                        yield sse(usage_field(self._chunk(job, [entry])))
            if job.include_usage:
                chunk = self._chunk(job, [])
                chunk["usage"] = job.usage(total)
                yield sse(chunk)
        except Exception as exc:  # after the headers: report in the stream, as OpenAI-compatible servers do
            yield sse_error(to_api_error(exc))
        yield SSE_DONE


__all__ = ["CompletionEndpoint", "ChatEndpoint", "APIError"]
