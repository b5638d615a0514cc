"""Front-end output processing: the core's per-step new tokens (columnar) become text deltas per sequence.

For each open request the front end keeps a ``RequestState``: one ``IncrementalDetokenizer`` per
sequence (stop strings are matched here, so the core never sees text), timing for the metrics, and an
``asyncio.Queue`` on which the HTTP handler receives ``(state, list[SeqOutput])`` items, or
``(state, exception)`` when the request ends in an error (several states may share one queue).
``OutputProcessor.process`` handles one ``StepOutputs`` message in one pass over its ``NewTokens`` rows
(several rows of one sequence are taken in order and make one ``SeqOutput``; a request's outputs are put
on its queue in completion order) and returns the ids of requests that a stop string ended, which the
caller then aborts in the core.

Stop decisions follow the offline engine's order for the same token: a stop token id or EOS (decided
by the core) wins over a stop string, which wins over the length limit.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field

from allmos.engine.detokenizer import IncrementalDetokenizer
from allmos.sampling_params import SamplingParams
from allmos.server.protocol import NewTokens, Scheduled, StepOutputs


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
        to_abort: list[str] = []
        for request_id, outs in self._apply_tokens(step.outputs).items():
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
    def _apply_tokens(self, new: NewTokens) -> dict[str, list[SeqOutput]]:
        """Take every row into its sequence; returns each request's outputs, in completion order, for the
        requests with news (a sequence a stop string already ended here has none)."""
        updates: dict[str, dict[int, SeqOutput]] = {}
        finished, logprobs = new.finished, new.logprobs
        for row, (request_id, index, token) in enumerate(zip(new.request_ids, new.indices, new.token_ids,
                                                             strict=True)):
            state = self.states.get(request_id)
            if state is None:
                continue  # aborted here while the step ran
            seq = state.seqs[index]
            finish = finished.get(row)
            seq.core_finished |= finish is not None
            if seq.finish_reason is not None:
                continue  # ended here by a stop string while its siblings run on
            outs = updates.setdefault(request_id, {})
            out = outs.get(index)
            if out is None:
                out = outs[index] = SeqOutput(index, "", [], [] if state.params.logprobs is not None else None)
            self._apply(state, seq, out, token, finish, logprobs.get(row))
        return {request_id: [outs[i] for i in sorted(outs)] if len(outs) > 1 else list(outs.values())
                for request_id, outs in updates.items()}

    @staticmethod
    def _apply(state: RequestState, seq: SeqState, out: SeqOutput, token: int,
               finish: tuple[str, int | None] | None, entries: list[tuple[int, float]] | None) -> None:
        """One new token of ``seq`` into ``out``. The order of stop decisions for one token: a stop id or
        EOS (the core's "stop") wins over a stop string, which wins over the length limit."""
        seq.num_tokens += 1
        stop_string = None
        if seq.detokenizer is not None:
            update = seq.detokenizer.update([token], check_stops=seq.num_tokens > state.params.min_tokens)
            out.text += update.delta
            stop_string = update.stop_string
        out.token_ids.append(token)
        if out.logprobs is not None and entries is not None:
            out.logprobs.append(entries)
        finish_reason, stop_reason = finish if finish is not None else (None, None)
        if stop_string is not None and finish_reason != "stop":
            finish_reason, stop_reason = "stop", stop_string
        elif finish_reason is not None and stop_string is None and seq.detokenizer is not None:
            out.text += seq.detokenizer.finish()
        seq.finish_reason = out.finish_reason = finish_reason
        out.stop_reason = stop_reason

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
