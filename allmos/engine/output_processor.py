"""Output processing: the core's ``CoreStepOutput`` -> ``RequestOutput``s with text.

Contract of ``OutputProcessor.process(step_output)``: in one pass over the step's rows (prompt-logprob
chunks first), for every request with a sequence that advanced (or finished) it detokenizes the new
tokens (``IncrementalDetokenizer``), checks stop strings, turns logprob entries into ``Logprob`` objects
with ``decoded_token``, files prompt-logprob chunks, and returns
``(outputs, to_abort)``: a ``RequestOutput`` per request that finished, or that streams and advanced, and
the (request id, completion index) of every sequence a stop string ended, which the caller aborts in the
core. The stop order is vLLM's: EOS / stop token ids (decided by the core), then stop strings, then the
length. A request's ``n`` completions form one ``RequestOutput``.

Output modes, per request: final only (default), cumulative (``stream``: every step, the whole text so
far) or ``delta`` (every step, only what is new: the completions that advanced, their new token ids, text
and logprobs; the prompt logprobs once). ``detokenize=False`` leaves ``text`` empty (stop strings still
work: they need the detokenizer, which then runs).
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass, field

from allmos.engine.core_types import (
    AbortedSequence,
    CoreStepOutput,
    EngineCoreRequest,
    LogprobEntries,
    PromptLogprobsResult,
)
from allmos.engine.detokenizer import IncrementalDetokenizer
from allmos.outputs import CompletionOutput, Logprob, RequestMetrics, RequestOutput
from allmos.sampling_params import SamplingParams


@dataclass(slots=True)
class _SeqState:
    """One completion as the caller sees it."""

    index: int
    detokenizer: IncrementalDetokenizer | None
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[dict[int, Logprob]] = field(default_factory=list)
    cumulative_logprob: float = 0.0
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    first_token_time: float | None = None
    num_cached_tokens: int = 0
    sent_tokens: int = 0  # delta mode: what earlier outputs carried
    sent_text: int = 0
    sent_logprobs: int = 0
    sent_final: bool = False


@dataclass(slots=True)
class _RequestState:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    params: SamplingParams
    seqs: list[_SeqState]
    arrival_time: float
    stream: bool
    delta: bool
    detokenize: bool
    prompt_logprobs: list[dict[int, Logprob]] = field(default_factory=list)  # prompt positions 1, 2, ...
    sent_prompt_logprobs: bool = False

    @property
    def finished(self) -> bool:
        return all(s.finish_reason is not None for s in self.seqs)


class OutputProcessor:
    """``CoreStepOutput``s in, ``RequestOutput``s out (see the module docstring)."""

    def __init__(self, tokenizer, eos_token_ids: Iterable[int]) -> None:
        self.tokenizer = tokenizer
        self.eos_token_ids = frozenset(eos_token_ids)
        self.requests: dict[str, _RequestState] = {}
        self._token_texts: dict[int, str] = {}  # decoded_token of logprob entries, per token id

    def add_request(self, request: EngineCoreRequest, prompt: str | None, *, stream: bool = False,
                    delta: bool = False, detokenize: bool = True) -> None:
        params = request.sampling_params
        needs_detokenizer = (detokenize and (stream or delta)) or bool(params.stop)
        seqs = [_SeqState(i, self._detokenizer(request.prompt_token_ids, params) if needs_detokenizer else None)
                for i in range(request.n)]
        self.requests[request.request_id] = _RequestState(
            request.request_id, prompt, request.prompt_token_ids, params, seqs, request.arrival_time,
            stream or delta, delta, detokenize)

    def _detokenizer(self, token_ids: list[int], params: SamplingParams) -> IncrementalDetokenizer | None:
        if self.tokenizer is None:
            return None
        return IncrementalDetokenizer(self.tokenizer, token_ids, skip_special_tokens=params.skip_special_tokens,
                                      stop=params.stop, include_stop_str_in_output=params.include_stop_str_in_output)

    def has_unfinished(self) -> bool:
        return bool(self.requests)

    # ------------------------------------------------------------------ core outputs
    def process(self, step: CoreStepOutput) -> tuple[list[RequestOutput], list[tuple[str, int]]]:
        for chunk in step.prompt_logprobs:
            self._store_prompt_logprobs(chunk)
        touched: dict[str, _RequestState] = {}
        to_abort: list[tuple[str, int]] = []
        now = time.time()
        requests, finished, logprobs = self.requests, step.finished, step.logprobs
        rare = finished.keys() | logprobs.keys() if finished or logprobs else ()  # rows with a finish or logprobs
        for row, (request_id, index, token, cached) in enumerate(zip(
                step.request_ids, step.indices, step.token_ids, step.num_cached_tokens, strict=True)):
            state = requests.get(request_id)
            if state is None:
                continue
            seq = state.seqs[index]
            seq.num_cached_tokens = cached
            if seq.finish_reason is not None:
                continue
            if not (state.stream or seq.detokenizer or row in rare):  # the common case
                seq.token_ids.append(token)
                if seq.first_token_time is None:
                    seq.first_token_time = now
                continue
            if self._advance(state, seq, token, finished.get(row, (None, None)), logprobs.get(row), now):
                to_abort.append((request_id, index))
            touched[request_id] = state
        outputs = []
        for state in touched.values():
            done = state.finished
            if done or state.stream:
                outputs.append(self._make_output(state))
            if done:
                del self.requests[state.request_id]
        return outputs, to_abort

    def _advance(self, state: _RequestState, seq: _SeqState, token: int, finish: tuple[str | None, int | None],
                 entries: LogprobEntries | None, now: float) -> bool:
        """Take ``token`` into ``seq`` and decide whether it finished (``finish``: the core's reason and stop
        token, or Nones); True when a stop string ended a sequence the core still runs."""
        seq.token_ids.append(token)
        if seq.first_token_time is None:
            seq.first_token_time = now
        if entries is not None and state.params.logprobs is not None:
            seq.cumulative_logprob += entries[0][1]
            seq.logprobs.append(self._logprob_dict(entries))
        stop_string = None
        if seq.detokenizer is not None:
            update = seq.detokenizer.update([token], check_stops=len(seq.token_ids) > state.params.min_tokens)
            stop_string = update.stop_string if update is not None else None
        reason, stop_reason = finish
        if reason != "stop" and stop_string is not None:
            reason, stop_reason = "stop", stop_string
        if reason is None:
            return False
        seq.finish_reason, seq.stop_reason = reason, stop_reason
        if seq.detokenizer is not None:
            seq.detokenizer.finish()
        return finish[0] is None

    def _store_prompt_logprobs(self, chunk: PromptLogprobsResult) -> None:
        """File one chunk's prompt logprobs (and completion 0's cached prompt tokens); a chunk recomputed
        after a preemption replaces what it covers, and once every position is filled later chunks are
        ignored."""
        state = self.requests.get(chunk.request_id)
        if state is None:
            return
        state.seqs[0].num_cached_tokens = chunk.num_cached_tokens
        stored, wanted = state.prompt_logprobs, len(state.prompt_token_ids) - 1
        if len(stored) >= wanted or chunk.start_pos > len(stored):
            return
        del stored[chunk.start_pos:]
        stored.extend(self._logprob_dict(e) for e in chunk.entries[:wanted - chunk.start_pos])

    def _logprob_dict(self, entries: LogprobEntries) -> dict[int, Logprob]:
        """token id -> Logprob of one position: the chosen token first (with its own rank), then the top-k
        not already in (a chosen token that is also in the top-k keeps its true rank)."""
        out: dict[int, Logprob] = {}
        for token, logprob, rank in entries:
            if token not in out:
                out[token] = Logprob(logprob, rank, self._token_text(token))
        return out

    def _token_text(self, token: int) -> str | None:
        if self.tokenizer is None:
            return None
        text = self._token_texts.get(token)
        if text is None:
            text = self._token_texts[token] = self.tokenizer.decode([token])
        return text

    # ------------------------------------------------------------------ aborts
    def abort(self, request_id: str, aborted: list[AbortedSequence]) -> RequestOutput | None:
        """The final output of an aborted request (``aborted``: what the core's ``abort_requests`` returned
        for it); None if the request is unknown or already finished."""
        state = self.requests.pop(request_id, None)
        if state is None:
            return None
        for seq in aborted:
            state.seqs[seq.index].num_cached_tokens = seq.num_cached_tokens
        for seq in state.seqs:
            if seq.finish_reason is None:
                seq.finish_reason = "abort"
        return self._make_output(state)

    # ------------------------------------------------------------------ outputs
    def _make_output(self, state: _RequestState) -> RequestOutput:
        completions = [self._completion(state, seq) for seq in state.seqs]  # delta: empty where nothing is new
        first = [s.first_token_time for s in state.seqs if s.first_token_time is not None]
        finished = state.finished
        metrics = RequestMetrics(state.arrival_time, min(first) if first else None, time.time() if finished else None)
        prompt_logprobs = None
        if state.params.prompt_logprobs is not None and not (state.delta and state.sent_prompt_logprobs):
            prompt_logprobs = [None, *state.prompt_logprobs]
            state.sent_prompt_logprobs = True
        return RequestOutput(state.request_id, state.prompt, state.prompt_token_ids, completions, finished,
                             state.seqs[0].num_cached_tokens, metrics, prompt_logprobs)

    @staticmethod
    def _has_news(seq: _SeqState) -> bool:
        return not seq.sent_final and (len(seq.token_ids) > seq.sent_tokens or seq.finish_reason is not None)

    def _completion(self, state: _RequestState, seq: _SeqState) -> CompletionOutput:
        text = self._text(state, seq)
        logprobs = seq.logprobs if state.params.logprobs is not None else None
        token_ids = seq.token_ids
        if state.delta:
            text, token_ids = text[seq.sent_text:], token_ids[seq.sent_tokens:]
            logprobs = logprobs[seq.sent_logprobs:] if logprobs is not None else None
            seq.sent_text += len(text)
            seq.sent_tokens += len(token_ids)
            seq.sent_logprobs += len(logprobs or ())
            seq.sent_final = seq.finish_reason is not None
        return CompletionOutput(index=seq.index, text=text, token_ids=list(token_ids),
                                cumulative_logprob=seq.cumulative_logprob if state.params.logprobs is not None
                                else None,
                                logprobs=list(logprobs) if logprobs is not None else None,
                                finish_reason=seq.finish_reason, stop_reason=seq.stop_reason)

    def _text(self, state: _RequestState, seq: _SeqState) -> str:
        if not state.detokenize:
            return ""
        if seq.detokenizer is not None:
            return seq.detokenizer.output_text
        if self.tokenizer is not None and seq.finish_reason is not None:
            return self.tokenizer.decode(self._strip_eos(seq), skip_special_tokens=state.params.skip_special_tokens)
        return ""

    def _strip_eos(self, seq: _SeqState) -> list[int]:
        ids = seq.token_ids
        if seq.finish_reason == "stop" and seq.stop_reason is None and ids and ids[-1] in self.eos_token_ids:
            return ids[:-1]
        return ids
