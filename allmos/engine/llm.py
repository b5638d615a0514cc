"""``LLM``: the offline API of docs/api.md (generate, chat, stream) over an ``LLMEngine``."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

from tqdm.auto import tqdm

from allmos.config import EngineConfig
from allmos.engine.llm_engine import LLMEngine
from allmos.inputs import ParsedPrompt, PromptType, parse_prompt, parse_prompts, parse_token_id_prompts
from allmos.outputs import RequestOutput
from allmos.sampling_params import SamplingParams


class LLM:
    """Offline inference: ``LLM(model=None, **config)``; docs/api.md lists the keys."""

    def __init__(self, model: str | None = None, **kwargs: Any) -> None:
        _default_logging()
        self.config = EngineConfig.from_kwargs(model, **kwargs)
        self.engine = LLMEngine(self.config)

    def shutdown(self) -> None:
        """Stop worker processes (tensor parallelism) and release the engine; idempotent."""
        engine = getattr(self, "engine", None)
        if engine is not None:
            engine.shutdown()

    def __del__(self) -> None:
        try:
            self.shutdown()
        except Exception:  # interpreter shutdown: the finalizer of the runner still cleans up
            pass

    @property
    def llm_engine(self) -> LLMEngine:
        """The engine (vLLM's name; the same object as ``engine``)."""
        return self.engine

    @property
    def tokenizer(self):
        return self.engine.tokenizer

    def get_tokenizer(self):
        return self.engine.tokenizer

    # ------------------------------------------------------------------ generate
    def generate(self, prompts: PromptType | Sequence[PromptType] | None = None,
                 sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
                 use_tqdm: bool = True, *, prompt_token_ids: list[int] | list[list[int]] | None = None
                 ) -> list[RequestOutput]:
        """Generate for every prompt; outputs come back in input order.

        ``prompts``: a text, a list of token ids, ``{"prompt": text}``, ``{"prompt_token_ids": ids}``, or a
        list of any of these. ``prompt_token_ids`` (vLLM's older keyword) instead: one list of token ids or
        a list of them. Anything else raises ``ValueError``."""
        prompt_list = _generate_prompts(prompts, prompt_token_ids)
        params = self._normalize_params(sampling_params, len(prompt_list))
        ids = self._add_all(prompt_list, params)
        return self._run(ids, use_tqdm)

    def abort(self, request_id: str | Iterable[str]) -> list[RequestOutput]:
        """Abort one request or several (ids as ``add_request`` / ``RequestOutput.request_id`` give them).

        As in vLLM, ids that are unknown or already finished are ignored. Returns the final outputs
        (``finish_reason="abort"``) of the requests that were actually aborted; the engine's next ``step``
        delivers them too, so a ``stream`` of an aborted request ends with that output."""
        return self.engine.abort_request(request_id)

    def _normalize_params(self, sampling_params, num_prompts: int) -> list[SamplingParams]:
        if sampling_params is None:
            return [self.engine.default_sampling_params()] * num_prompts
        if isinstance(sampling_params, SamplingParams):
            return [sampling_params] * num_prompts
        if not isinstance(sampling_params, (list, tuple)) or not all(
                isinstance(p, SamplingParams) for p in sampling_params):
            raise ValueError("sampling_params must be a SamplingParams or a list of them, got "
                             f"{type(sampling_params).__name__}")
        params = list(sampling_params)
        if len(params) != num_prompts:
            raise ValueError(f"got {len(params)} SamplingParams for {num_prompts} prompts; "
                             "give one for all or one per prompt")
        return params

    def _add_all(self, prompts: list[ParsedPrompt], params: list[SamplingParams]) -> list[str]:
        """Queue every prompt, or none: a bad prompt removes the ones already queued and re-raises."""
        ids: list[str] = []
        try:
            for prompt, p in zip(prompts, params):
                ids.append(self.engine.add_request(None, prompt, p))
        except Exception:
            for request_id in ids:
                self.engine.abort(request_id, emit_output=False)
            raise
        return ids

    def _run(self, ids: list[str], use_tqdm: bool) -> list[RequestOutput]:
        finished: dict[str, RequestOutput] = {}
        bar = tqdm(total=len(ids), desc="Processed prompts", dynamic_ncols=True) if use_tqdm else None
        start, tokens_at_start = time.perf_counter(), self.engine.num_generated_tokens
        wanted = set(ids)
        try:
            while len(finished) < len(ids):
                for out in self.engine.step():
                    if out.finished and out.request_id in wanted:
                        finished[out.request_id] = out
                        if bar is not None:
                            bar.update(1)
                if bar is not None:
                    generated = self.engine.num_generated_tokens - tokens_at_start
                    bar.set_postfix_str(f"{generated / max(time.perf_counter() - start, 1e-9):.0f} tok/s")
        except BaseException:
            for request_id in ids:
                if request_id not in finished:
                    self.engine.abort(request_id, emit_output=False)
            raise
        finally:
            if bar is not None:
                bar.close()
        return [finished[i] for i in ids]

    # ------------------------------------------------------------------ chat
    def chat(self, messages: list[dict] | list[list[dict]],
             sampling_params: SamplingParams | Sequence[SamplingParams] | None = None, use_tqdm: bool = True, *,
             chat_template: str | None = None, add_generation_prompt: bool = True,
             chat_template_kwargs: dict | None = None) -> list[RequestOutput]:
        """Generate replies to one conversation (a list of ``{"role", "content"}``) or a list of them,
        through the tokenizer's chat template (or ``chat_template``)."""
        conversations = [messages] if messages and isinstance(messages[0], dict) else list(messages)
        prompts = [self.apply_chat_template(c, chat_template=chat_template,
                                            add_generation_prompt=add_generation_prompt, **(chat_template_kwargs or {}))
                   for c in conversations]
        return self.generate(prompts, sampling_params, use_tqdm)

    def apply_chat_template(self, conversation: list[dict], *, chat_template: str | None = None,
                            add_generation_prompt: bool = True, **kwargs: Any) -> str:
        """The prompt text for one conversation."""
        return self.engine.input_processor.apply_chat_template(
            conversation, chat_template=chat_template, add_generation_prompt=add_generation_prompt, **kwargs)

    # ------------------------------------------------------------------ stream
    def stream(self, prompt: PromptType, sampling_params: SamplingParams | None = None) -> Iterator[dict]:
        """Yield ``{"text": delta, "token_ids": new_ids, "finished": bool, "output": RequestOutput}``
        as tokens arrive (single sequence, ``outputs[0]``). The deltas concatenate to the final text.

        ``prompt`` is one prompt in any form ``generate`` accepts for one prompt; several prompts raise
        ``ValueError`` (call ``stream`` once per prompt, or use ``generate``)."""
        request_id = self.engine.add_request(None, _one_prompt(prompt), sampling_params, stream=True)
        sent_text, sent_tokens = "", 0
        try:
            while True:
                for out in self.engine.step():
                    if out.request_id != request_id:
                        continue
                    completion = out.outputs[0]
                    delta = completion.text[len(sent_text):]
                    new_ids = completion.token_ids[sent_tokens:]
                    sent_text, sent_tokens = completion.text, len(completion.token_ids)
                    if delta or new_ids or out.finished:
                        yield {"text": delta, "token_ids": new_ids, "finished": out.finished, "output": out}
                    if out.finished:
                        return
        finally:
            self.engine.abort(request_id, emit_output=False)


def _default_logging() -> None:
    """Show allmos's INFO lines (KV-cache size at start-up) unless the application configured logging."""
    logger = logging.getLogger("allmos")
    if not logger.handlers and not logging.getLogger().handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(levelname)s allmos: %(message)s"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)


def _generate_prompts(prompts, prompt_token_ids) -> list[ParsedPrompt]:
    if prompt_token_ids is not None:
        if prompts is not None:
            raise ValueError("give prompts or prompt_token_ids, not both")
        return parse_token_id_prompts(prompt_token_ids)
    if prompts is None:
        raise ValueError("generate() needs prompts (or prompt_token_ids)")
    return parse_prompts(prompts)


def _one_prompt(prompt) -> ParsedPrompt:
    """``stream``'s single prompt; a list of prompts (texts, dicts, token lists) is refused."""
    if isinstance(prompt, (list, tuple)) and any(isinstance(p, (str, dict, list, tuple)) for p in prompt):
        raise ValueError(f"stream() takes one prompt, got a list of {len(prompt)} prompts; call stream() once "
                         "per prompt, or use generate()")
    return parse_prompt(prompt)


__all__ = ["LLM", "EngineConfig"]
