"""Front-end output processing: the core's per-step token deltas become text deltas per sequence.

For each open request the front end keeps a ``RequestState``: one ``IncrementalDetokenizer`` per
sequence (stop strings are matched here, so the core never sees text), timing for the metrics, and an
``asyncio.Queue`` on which the HTTP handler receives ``(state, list[SeqOutput])`` items, or
``(state, exception)`` when the request ends in an error (several states may share one queue).
``OutputProcessor.process`` handles one ``StepOutputs`` message and returns the ids of requests that a
stop string ended, which the caller then aborts in the core.

Stop decisions follow the offline engine's order for the same token: a stop token id or EOS (decided
by the core) wins over a stop string, which wins over the length limit.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field

from allmos.engine.detokenizer import IncrementalDetokenizer
from allmos.sampling_params import SamplingParams
from allmos.server.protocol import Scheduled, SeqDelta, StepOutputs


@dataclass
class SeqOutput:
    """What one step added to one sequence."""

    index: int
    text: str
    token_ids: list[int]
    logprobs: list[list[tuple[int, float]]] | None  # per token: sampled (id, logprob) first, then top-k
    finish_reason: str | None = None
    stop_reason: int | str | None = None


@dataclass
class SeqState:
    detokenizer: IncrementalDetokenizer | None  # None: the model has no tokenizer (token ids only)
    num_tokens: int = 0
    finish_reason: str | None = None
    core_finished: bool = False  # the core reported its end (else a stop string ended it here)


@dataclass
class RequestState:
    """One request (``n`` sequences) between admission and its end."""

    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams  # with the stop strings, which the core does not get
    seqs: list[SeqState]
    arrival_time: float
    queue: asyncio.Queue = field(default_factory=asyncio.Queue)
    num_cached_tokens: int = 0
    first_token_time: float | None = None
    last_token_time: float | None = None
    num_output_tokens: int = 0

    @property
    def finished(self) -> bool:
        return all(s.finish_reason is not None for s in self.seqs)


def new_request_state(request_id: str, prompt_token_ids: list[int], params: SamplingParams, tokenizer,
                      arrival_time: float | None = None) -> RequestState:
    def detokenizer() -> IncrementalDetokenizer | None:
        if tokenizer is None:
            return None
        return IncrementalDetokenizer(tokenizer, prompt_token_ids, skip_special_tokens=params.skip_special_tokens,
                                      stop=params.stop, include_stop_str_in_output=params.include_stop_str_in_output)

    seqs = [SeqState(detokenizer()) for _ in range(params.n)]
    return RequestState(request_id, prompt_token_ids, params, seqs, arrival_time or time.time())


class OutputProcessor:
    """Owns the open ``RequestState``s; ``metrics`` (optional) observes their timings."""

    def __init__(self, metrics=None) -> None:
        self.states: dict[str, RequestState] = {}
        self.metrics = metrics

    def add(self, state: RequestState) -> None:
        if state.request_id in self.states:
            raise ValueError(f"request id {state.request_id!r} is already in use")
        self.states[state.request_id] = state

    def remove(self, request_id: str) -> RequestState | None:
        return self.states.pop(request_id, None)

    def process(self, step: StepOutputs) -> list[str]:
        """Apply one step; returns the request ids to abort in the core (ended here by a stop string)."""
        now = time.time()
        for item in step.scheduled:
            self._on_scheduled(item)
        for rejected in step.rejected:
            state = self.states.pop(rejected.request_id, None)
            if state is not None:
                state.queue.put_nowait((state, ValueError(rejected.message)))
        updates: dict[str, list[SeqOutput]] = {}
        to_abort: list[str] = []
        for delta in step.outputs:
            state = self.states.get(delta.request_id)
            if state is None:
                continue  # aborted here while the step ran
            out = self._apply(state, delta)
            if out is not None:
                updates.setdefault(delta.request_id, []).append(out)
        for request_id, outs in updates.items():
            state = self.states[request_id]
            self._observe_tokens(state, outs, now)
            if state.finished:
                del self.states[request_id]
                if not all(s.core_finished for s in state.seqs):
                    to_abort.append(request_id)  # the core is still generating for it
                self._observe_finish(state, now)
            state.queue.put_nowait((state, outs))
        if self.metrics is not None:
            self.metrics.observe_core_stats(step.stats)
        return to_abort

    def fail_all(self, error: Exception) -> None:
        """End every open request with ``error`` (the core died)."""
        states, self.states = self.states, {}
        for state in states.values():
            state.queue.put_nowait((state, error))

    # ------------------------------------------------------------------ per sequence
    def _apply(self, state: RequestState, delta: SeqDelta) -> SeqOutput | None:
        seq = state.seqs[delta.index]
        seq.core_finished |= delta.finish_reason is not None
        if seq.finish_reason is not None:
            return None  # ended here by a stop string while its siblings run on
        params = state.params
        text, kept, stop_string = self._detokenize(seq, delta.token_ids, params)
        logprobs = delta.logprobs[:kept] if delta.logprobs is not None else None
        token_ids = delta.token_ids[:kept]
        finish_reason, stop_reason = delta.finish_reason, delta.stop_reason
        core_stopped_here = finish_reason == "stop" and kept == len(delta.token_ids)
        if stop_string is not None and not core_stopped_here:
            finish_reason, stop_reason = "stop", stop_string  # a stop id / EOS on the same token wins
        elif finish_reason is not None and stop_string is None and seq.detokenizer is not None:
            text += seq.detokenizer.finish()
        seq.finish_reason = finish_reason
        return SeqOutput(delta.index, text, token_ids, logprobs, finish_reason, stop_reason)

    @staticmethod
    def _detokenize(seq: SeqState, token_ids: list[int], params: SamplingParams) -> tuple[str, int, str | None]:
        """Feed the tokens; returns (text, number of tokens kept, stop string matched or None)."""
        detok = seq.detokenizer
        if detok is None:
            seq.num_tokens += len(token_ids)
            return "", len(token_ids), None
        if not params.stop:
            seq.num_tokens += len(token_ids)
            return detok.update(token_ids).delta, len(token_ids), None
        parts = []
        for i, token in enumerate(token_ids):  # token by token: a stop string ends the output exactly there
            seq.num_tokens += 1
            update = detok.update([token], check_stops=seq.num_tokens > params.min_tokens)
            parts.append(update.delta)
            if update.stop_string is not None:
                return "".join(parts), i + 1, update.stop_string
        return "".join(parts), len(token_ids), None

    # ------------------------------------------------------------------ timings
    def _on_scheduled(self, item: Scheduled) -> None:
        state = self.states.get(item.request_id)
        if state is None:
            return
        state.num_cached_tokens = item.num_cached_tokens
        if self.metrics is not None:
            self.metrics.observe_scheduled(state, item)

    def _observe_tokens(self, state: RequestState, outs: list[SeqOutput], now: float) -> None:
        num_new = sum(len(o.token_ids) for o in outs)
        state.num_output_tokens += num_new
        if num_new and self.metrics is not None:
            self.metrics.observe_tokens(state, num_new, now)
        if num_new:
            if state.first_token_time is None:
                state.first_token_time = now
            state.last_token_time = now

    def _observe_finish(self, state: RequestState, now: float) -> None:
        if self.metrics is not None:
            self.metrics.observe_finished(state, now)
