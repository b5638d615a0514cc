"""The engine core: ``EngineCoreRequest`` in, one ``step()`` -> ``CoreStepOutput`` out.

Contract:
- ``add_request`` queues a validated request (``allmos.engine.input_processor`` validates prompts and
  sampling settings); it raises ValueError, and queues nothing, if the request id is in use or the request
  could never fit the KV cache. A request with ``n > 1`` becomes ``n`` sequences; completions 1..n-1 wait
  until completion 0 has computed the prompt, then start from its cached prompt blocks.
- ``step`` schedules and launches one forward pass, then reads back the previous one, and returns one
  ``CoreStepOutput``: a row per sequence that advanced (its new token, the finish reason when that token
  ended it, logprob entries when asked for) and the prompt-logprob chunks read back, column by column, so
  the step's bookkeeping costs no object per sequence. Stops decided here are by token: EOS, ``stop_token_ids``
  (not before ``min_tokens``), ``max_tokens`` and the context limit. Text, and so stop strings, belong to
  the caller, which ends a sequence with ``abort_sequences``.
- ``abort_requests`` ends whole requests and returns their sequences that were still running
  (``AbortedSequence``, finish reason "abort").
- ``has_unfinished`` / ``get_stats`` report state.

The core owns the scheduler, the block manager, the model runner and the in-flight step (overlap): tokens
sampled in step N stay on the device and feed step N + 1, which is launched before N's tokens are read
back. Between the two, a sequence counts its sampled tokens in ``Request.num_pending_tokens`` and the batch
marks inputs that come from the previous step's samples (``ScheduledSeq.input_from_previous_sample``). A
sequence that stopped at N wastes its slot in N + 1, which is dropped at read-back. Requests with
penalties need their real output tokens, so while one runs the previous step is read back before the next
is scheduled.

Nothing here knows text, so the core can run in its own process behind a typed channel: its inputs and
outputs (``allmos.engine.core_types``) are plain dataclasses.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import TYPE_CHECKING

from allmos.config import EngineConfig
from allmos.engine.batch import ScheduledBatch
from allmos.engine.core_types import (
    AbortedSequence,
    CoreStepOutput,
    EngineCoreRequest,
    EngineCoreStats,
    LogprobEntries,
    PromptLogprobsResult,
)
from allmos.engine.request import Request, RequestStatus
from allmos.engine.scheduler import ContinuousBatchingScheduler, Scheduler, SchedulerConfig
from allmos.memory.block_manager import BlockManager

if TYPE_CHECKING:
    from allmos.engine.model_runner import ModelRunner, PendingStep

logger = logging.getLogger("allmos")


class EngineCore:
    """Requests in, token ids out (see the module docstring)."""

    def __init__(self, config: EngineConfig, runner: ModelRunner, max_model_len: int,
                 eos_token_ids: Iterable[int]) -> None:
        self.runner = runner
        self.max_model_len = max_model_len
        self.eos_token_ids = frozenset(eos_token_ids)
        self.block_manager = BlockManager(runner.num_kv_blocks, config.kvcache_block_size,
                                          config.enable_prefix_caching)
        self.scheduler: Scheduler = ContinuousBatchingScheduler(
            SchedulerConfig(config.max_num_seqs, config.max_num_batched_tokens, max_model_len), self.block_manager)
        self._groups: dict[str, list[Request]] = {}  # request id -> its sequences, until all finished
        self._deferred: dict[str, list[Request]] = {}  # n > 1 siblings waiting for the shared prompt
        self._penalized: set[str] = set()  # requests whose sampling needs their real output tokens
        self._prompt_logprob_seqs: dict[str, Request] = {}  # sequence id -> completion 0 that computes them
        self._in_flight: tuple[PendingStep, list[Request]] | None = None  # launched, not read back
        self.num_generated_tokens = 0

    # ------------------------------------------------------------------ requests
    def add_request(self, request: EngineCoreRequest) -> None:
        """Queue ``request``; raises ValueError (queuing nothing) if its id is in use or it never fits."""
        if request.request_id in self._groups:
            raise ValueError(f"request id {request.request_id!r} is already in use")
        if len(request.seeds) != request.n:
            raise ValueError(f"request {request.request_id!r} has {len(request.seeds)} seeds for n={request.n}")
        seqs = [make_sequence(request, i, self.eos_token_ids) for i in range(request.n)]
        self.scheduler.add(seqs[0])  # the one place that checks the request fits
        if len(seqs) > 1:
            self._deferred[request.request_id] = seqs[1:]
        self._groups[request.request_id] = seqs
        if request.sampling_params.has_penalties:
            self._penalized.add(request.request_id)
        if seqs[0].num_prompt_logprobs is not None:
            self._prompt_logprob_seqs[seqs[0].request_id] = seqs[0]

    def abort_requests(self, request_ids: Iterable[str]) -> list[AbortedSequence]:
        """End these requests now and free their blocks; returns each of their sequences that was still
        running (finish reason "abort"). Unknown or finished ids are ignored."""
        aborted = []
        for request_id in request_ids:
            seqs = self._forget(request_id)
            for seq in seqs or ():
                if seq.finish_reason is None:
                    self._finish(seq, "abort")
                    aborted.append(AbortedSequence(request_id, seq.index, max(0, seq.num_cached_tokens)))
        return aborted

    def abort_sequences(self, seq_refs: Iterable[tuple[str, int]]) -> None:
        """End single sequences, given as (request id, completion index), that the caller finished (a stop
        string matched); nothing is reported for them."""
        for request_id, index in seq_refs:
            seqs = self._groups.get(request_id)
            if seqs is None or seqs[index].finish_reason is not None:
                continue
            self._finish(seqs[index], "abort")
            if all(s.finish_reason is not None for s in seqs):
                self._forget(request_id)

    def _finish(self, seq: Request, reason: str, stop_reason: int | None = None) -> None:
        seq.drop_pending_tokens()
        seq.stop_reason = stop_reason
        self.scheduler.finish(seq, reason)

    def _forget(self, request_id: str) -> list[Request] | None:
        self._penalized.discard(request_id)
        self._deferred.pop(request_id, None)
        seqs = self._groups.pop(request_id, None)
        if seqs is not None:
            self._prompt_logprob_seqs.pop(seqs[0].request_id, None)
        return seqs

    # ------------------------------------------------------------------ queries
    def has_unfinished(self) -> bool:
        return bool(self._groups) or self._in_flight is not None

    def num_cached_tokens(self, request_id: str) -> int | None:
        """Prompt tokens of ``request_id`` found in the prefix cache at its first scheduling; None while it
        has not been scheduled yet, or when the request is unknown."""
        seqs = self._groups.get(request_id)
        if not seqs or seqs[0].num_cached_tokens < 0:
            return None
        return seqs[0].num_cached_tokens

    def sequences(self, request_id: str) -> list[Request]:
        """The live sequences of a request (for inspection; empty once it finished)."""
        return list(self._groups.get(request_id, ()))

    def sequences_left(self) -> int:
        """How many requests the core still tracks (0 once every request finished or was aborted)."""
        return len(self._groups)

    def get_stats(self) -> EngineCoreStats:
        s = self.scheduler.get_stats()
        return EngineCoreStats(s.num_running, s.num_waiting, s.num_prefilling, s.num_free_blocks, s.num_blocks,
                               s.prefix_cache_queries, s.prefix_cache_hits, s.num_preemptions,
                               self.num_generated_tokens)

    # ------------------------------------------------------------------ the loop
    def step(self) -> CoreStepOutput:
        """Launch one forward pass, then read back the previous one (see the module docstring)."""
        output = self.read_back_if_sync()
        batch = self.scheduler.schedule()
        launched = None
        if not batch.is_empty:
            pending = self.runner.execute(batch)
            self.scheduler.on_step_done(batch)
            launched = (pending, self._reserve_samples(batch))
        if self._in_flight is not None:  # not read back by read_back_if_sync: ``output`` is empty
            output = self._read_back(self._in_flight)
        self._in_flight = launched
        return output

    def read_back_if_sync(self) -> CoreStepOutput:
        """Queue the n > 1 siblings whose shared prompt is computed; then, if the next step must see the
        previous step's tokens (a request with penalties runs), read that step back now (else the output is
        empty). ``step`` calls this itself; a driver that ends sequences on stop strings calls it first, so
        a sequence it ends is not scheduled again."""
        self._release_deferred()
        if self._in_flight is None or not self._penalized:
            return CoreStepOutput()
        in_flight, self._in_flight = self._in_flight, None
        return self._read_back(in_flight)

    def _release_deferred(self) -> None:
        for request_id in list(self._deferred):
            first = self._groups[request_id][0]
            if first.finish_reason is not None or first.num_computed_tokens >= first.num_prompt_tokens - 1:
                for seq in self._deferred.pop(request_id):
                    self.scheduler.add(seq)

    def _reserve_samples(self, batch: ScheduledBatch) -> list[Request]:
        """Count each sampled token as pending; sequences that reached their length limit leave the
        scheduler now (their last token is still read back and reported)."""
        sampled = []
        get_request, max_model_len = self.scheduler.get_request, self.max_model_len
        for seq_info in batch.sampled_seqs:
            seq = get_request(seq_info.request_id)
            if seq is None:
                continue
            seq.reserve_pending_token()
            sampled.append(seq)
            if _hit_length_limit(seq, max_model_len):
                self.scheduler.finish(seq, None)  # no more compute; the reason is set once read back
        return sampled

    def _read_back(self, in_flight: tuple[PendingStep, list[Request]]) -> CoreStepOutput:
        """The launched step's results as one ``CoreStepOutput``: each sampled sequence's token becomes
        known, and the few tokens that may end a sequence go through ``_check_stop``."""
        pending, sampled = in_flight
        result = pending.result()
        prompt = [c for chunk in result.prompt_logprobs if (c := self._prompt_chunk(chunk)) is not None]
        sampled, token_ids, logprobs = _running_rows(sampled, result.token_ids, result.logprobs)
        # a sampled sequence was admitted, so its num_cached_tokens is set (>= 0)
        output = CoreStepOutput([s.group_id for s in sampled], [s.index for s in sampled], token_ids,
                                [s.num_cached_tokens for s in sampled], prompt_logprobs=prompt)
        eos, finished = self.eos_token_ids, RequestStatus.FINISHED
        for row, seq in enumerate(sampled):
            token = token_ids[row]
            seq.resolve_pending_token(token)
            if seq.status is finished or token in eos or token in seq.params.stop_token_ids:
                self._check_stop(seq, token, output, row)  # else nothing can end it (the common case)
        if logprobs is not None:
            output.logprobs = {row: logprobs[row] for row, seq in enumerate(sampled) if seq.params.logprobs is not None}
        self.num_generated_tokens += len(sampled)
        return output

    def _prompt_chunk(self, chunk: PromptLogprobsResult) -> PromptLogprobsResult | None:
        """A runner's chunk (named by sequence) as the request's (completion 0 computes them)."""
        first = self._prompt_logprob_seqs.get(chunk.request_id)
        if first is None:
            return None
        return PromptLogprobsResult(first.group_id, chunk.start_pos, chunk.entries, max(0, first.num_cached_tokens))

    def _check_stop(self, seq: Request, token: int, output: CoreStepOutput, row: int) -> None:
        """Decide whether ``token`` (just read back) ends ``seq``: EOS / stop ids (from ``min_tokens`` on),
        then the length limit (the sequence left the scheduler when its last slot was reserved)."""
        params = seq.params
        reason, stop_reason = None, None
        if seq.num_known_output_tokens >= params.min_tokens:
            if token in params.stop_token_ids:
                reason, stop_reason = "stop", token
            elif not params.ignore_eos and token in self.eos_token_ids:
                reason = "stop"
        if reason is None and seq.status is RequestStatus.FINISHED and seq.num_pending_tokens == 0:
            reason = "length"
        if reason is None:
            return
        self._finish(seq, reason, stop_reason)
        output.finished[row] = (reason, stop_reason)
        seqs = self._groups.get(seq.group_id)
        if seqs is not None and all(s.finish_reason is not None for s in seqs):
            self._forget(seq.group_id)

    def shutdown(self) -> None:
        self.runner.shutdown()


def _hit_length_limit(seq: Request, max_model_len: int) -> bool:
    """Whether ``seq``, its pending tokens counted, reached ``max_tokens`` or the context limit."""
    num_tokens, max_tokens = seq.num_tokens, seq.params.max_tokens
    return num_tokens >= max_model_len or (max_tokens is not None and num_tokens - seq.num_prompt_tokens >= max_tokens)


def _running_rows(sampled: list[Request], token_ids: list[int], logprobs: list[LogprobEntries] | None):
    """The read-back rows of the sequences still running: a sequence aborted, or stopped in an earlier
    step, while its token was in flight has that token dropped. Returns (sequences, tokens, logprobs)."""
    if len(token_ids) == len(sampled) and all(seq.finish_reason is None for seq in sampled):
        return sampled, token_ids, logprobs  # the common case: nothing to drop
    rows = [row for row, seq in enumerate(sampled) if seq.finish_reason is None]
    return ([sampled[r] for r in rows], [token_ids[r] for r in rows],
            [logprobs[r] for r in rows] if logprobs is not None else None)


def make_sequence(request: EngineCoreRequest, index: int, eos_token_ids: frozenset[int]) -> Request:
    """Completion ``index`` of ``request`` as the scheduler sees it (ids: the request id for n == 1, else
    "<request id>#<index>"); completion 0 computes the prompt logprobs; EOS and stop ids are banned until
    ``min_tokens``."""
    params = request.sampling_params
    seq_id = request.request_id if params.n == 1 else f"{request.request_id}#{index}"
    seq = Request(seq_id, request.prompt_token_ids, params, request.seeds[index], request.arrival_time,
                  group_id=request.request_id, index=index)
    if index == 0 and params.prompt_logprobs is not None and len(request.prompt_token_ids) > 1:
        seq.num_prompt_logprobs = params.prompt_logprobs
    if params.min_tokens > 0:
        seq.banned_token_ids = tuple(sorted(set(params.stop_token_ids) | (
            set() if params.ignore_eos else set(eos_token_ids))))
    return seq


def make_runner(config: EngineConfig, source, device, dtype) -> ModelRunner:
    """The model runner for ``config``: one process, or one per tensor-parallel rank."""
    if config.tensor_parallel_size > 1:
        from allmos.engine.tp_runner import MultiprocessRunner
        return MultiprocessRunner(config, source, device, dtype)
    from allmos.engine.model_runner import LocalModelRunner
    return LocalModelRunner(config, source.model_config, source.folder, device, dtype)


def kv_cache_summary(num_blocks: int, block_size: int, max_model_len: int) -> str:
    """The start-up line: what the KV cache holds in tokens, and how many full-length sequences fit."""
    tokens = num_blocks * block_size
    line = (f"KV cache: {num_blocks} blocks x {block_size} tokens = {tokens} tokens; "
            f"max concurrency {tokens / max_model_len:.2f}x at max_model_len={max_model_len}")
    if tokens < max_model_len:
        line += f" (a request that may need more than {tokens} tokens is rejected)"
    return line
