"""Continuous batching under a token budget, with chunked prefill and preemption by recompute.

Policy per step (see ``ContinuousBatchingScheduler.schedule``):
1. Running sequences first, in admission order; each takes ``min(remaining, budget)`` tokens, so
   any sequence's prefill is chunked when the budget runs short. When KV blocks run out, the newest
   running sequence is preempted (blocks freed, ``num_computed_tokens`` reset) and goes to the front
   of the waiting queue, so it is re-admitted before new work.
2. Waiting sequences next, if nothing was preempted this step, while ``max_num_seqs`` and the budget
   allow; admission starts from the longest cached prefix (except for a request that still needs its
   prompt logprobs: those need the logits of every prompt position, so it computes its whole prompt).
Requests that could never fit the KV cache are rejected in ``add`` so every step makes progress.

Tokens not yet read back (``Request.num_pending_tokens``) are scheduled like any other token; the batch marks
them with ``ScheduledSeq.input_from_previous_sample`` (see ``allmos.engine.batch``). This module imports no
torch or Triton module.
"""

from __future__ import annotations

import abc
import logging
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from allmos.engine.batch import PromptLogprobsChunk, ScheduledBatch, ScheduledSeq
from allmos.engine.request import Request, RequestStatus
from allmos.engine.sampling_row import SamplingRow
from allmos.memory.block_manager import BlockManager

logger = logging.getLogger("allmos")


class Scheduler(abc.ABC):
    """Decides which tokens of which requests the next forward pass computes."""

    @abc.abstractmethod
    def add(self, request: Request) -> None:
        """Queue a request; raises ValueError if it can never be scheduled (``check_fits``). Request ids
        are unique: the caller (the engine core) checks them."""

    @abc.abstractmethod
    def check_fits(self, request: Request) -> None:
        """Raise ValueError if ``request`` could never be scheduled (its longest possible sequence needs
        more KV blocks than the whole cache has). The one place that decides whether a request fits."""

    @abc.abstractmethod
    def get_request(self, request_id: str) -> Request | None:
        """The queued (waiting or running) request with this id, else None."""

    @abc.abstractmethod
    def schedule(self) -> ScheduledBatch:
        """Pick the next step's work and reserve its KV blocks. May return an empty batch."""

    @abc.abstractmethod
    def on_step_done(self, batch: ScheduledBatch) -> None:
        """Record that ``batch``'s tokens are computed (before sampled tokens are appended)."""

    @abc.abstractmethod
    def finish(self, request: Request, reason: str | None) -> None:
        """Remove a request (finished or aborted) and release its blocks. ``reason`` None: the request
        needs no more compute but its outcome is not known yet (set by a later call)."""

    @abc.abstractmethod
    def has_unfinished(self) -> bool:
        """Whether any request is waiting or running."""

    @abc.abstractmethod
    def get_stats(self) -> SchedulerStats:
        """Counts for monitoring: queue lengths, preemptions, prefix-cache lookups, KV blocks."""


@dataclass(frozen=True)
class SchedulerStats:
    num_running: int
    num_waiting: int
    num_prefilling: int  # running or waiting requests whose prompt is not fully computed
    num_preemptions: int  # since start
    prefix_cache_queries: int  # prompt tokens looked up in the prefix cache at admission, since start
    prefix_cache_hits: int  # of those, tokens found cached
    num_free_blocks: int
    num_blocks: int


@dataclass(frozen=True)
class SchedulerConfig:
    max_num_seqs: int
    max_num_batched_tokens: int
    max_model_len: int


class ContinuousBatchingScheduler(Scheduler):
    def __init__(self, config: SchedulerConfig, block_manager: BlockManager) -> None:
        self.config = config
        self.block_manager = block_manager
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.requests: dict[str, Request] = {}
        self.num_preemptions = 0
        self.prefix_cache_queries = 0
        self.prefix_cache_hits = 0
        self.preemption_log = PreemptionLog()
        self._prompt_logprob_ids: set[str] = set()  # requests whose prompt logprobs are still to compute

    # ------------------------------------------------------------------ admission
    def add(self, request: Request) -> None:
        self.check_fits(request)
        self.requests[request.request_id] = request
        self.waiting.append(request)
        if request.num_prompt_logprobs is not None:
            self._prompt_logprob_ids.add(request.request_id)

    def check_fits(self, request: Request) -> None:
        max_len = min(request.num_prompt_tokens + _max_tokens(request), self.config.max_model_len)
        needed = self.block_manager.num_blocks_for(max_len)
        if needed > self.block_manager.num_blocks:
            raise ValueError(
                f"request {request.request_id!r} needs up to {max_len} tokens ({needed} KV blocks of "
                f"{self.block_manager.block_size}) but the whole KV cache holds "
                f"{self.block_manager.num_blocks} blocks; lower max_tokens or shorten the prompt")

    def get_request(self, request_id: str) -> Request | None:
        return self.requests.get(request_id)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def get_stats(self) -> SchedulerStats:
        prefilling = sum(r.num_computed_tokens < r.num_prompt_tokens for r in self.requests.values())
        return SchedulerStats(len(self.running), len(self.waiting), prefilling, self.num_preemptions,
                              self.prefix_cache_queries, self.prefix_cache_hits,
                              self.block_manager.num_free_blocks, self.block_manager.num_blocks)

    # ------------------------------------------------------------------ the policy
    def schedule(self) -> ScheduledBatch:
        budget = self.config.max_num_batched_tokens
        scheduled: list[tuple[Request, int]] = []
        budget, preempted = self._schedule_running(budget, scheduled)
        if not preempted:
            self._schedule_waiting(budget, scheduled)
        seqs = [self._to_scheduled_seq(r, n) for r, n in scheduled]
        has_prompt_logprobs = bool(self._prompt_logprob_ids) and any(s.prompt_logprobs is not None for s in seqs)
        return ScheduledBatch(seqs, has_prompt_logprobs)

    def _schedule_running(self, budget: int, out: list[tuple[Request, int]]) -> tuple[int, bool]:
        """Schedule running requests first; returns the budget left and whether anything was preempted."""
        any_preempted = False
        i = 0
        while i < len(self.running) and budget > 0:
            request = self.running[i]
            num_new = min(request.num_tokens - request.num_computed_tokens, budget)
            allocated, preempted = self._allocate_or_preempt(request, num_new)
            any_preempted |= preempted
            if not allocated:
                break  # ``request`` itself was the newest and got preempted
            out.append((request, num_new))
            budget -= num_new
            i += 1
        return budget, any_preempted

    def _allocate_or_preempt(self, request: Request, num_new: int) -> tuple[bool, bool]:
        """Allocate blocks for ``request``, preempting the newest running requests as needed.

        Returns (allocated, preempted_any)."""
        preempted = False
        while not self.block_manager.allocate(request, num_new):
            victim = self.running.pop()
            self._preempt(victim)
            preempted = True
            if victim is request:
                return False, True
        return True, preempted

    def _schedule_waiting(self, budget: int, out: list[tuple[Request, int]]) -> None:
        while self.waiting and budget > 0 and len(self.running) < self.config.max_num_seqs:
            request = self.waiting[0]
            use_cache = request.num_computed_tokens == 0 and request.num_prompt_logprobs is None
            cached = self.block_manager.find_cached_prefix(request) if use_cache else []
            num_cached_tokens = len(cached) * self.block_manager.block_size
            num_new = min(request.num_tokens - num_cached_tokens, budget)
            if not self.block_manager.allocate(request, num_new, cached):
                break  # head-of-line: wait for blocks rather than reorder
            request.num_computed_tokens = num_cached_tokens
            if request.num_cached_tokens < 0:
                request.num_cached_tokens = num_cached_tokens
                if use_cache and self.block_manager.enable_prefix_caching:
                    self.prefix_cache_queries += request.num_tokens
                    self.prefix_cache_hits += num_cached_tokens
            self.waiting.popleft()
            request.status = RequestStatus.RUNNING
            self.running.append(request)
            out.append((request, num_new))
            budget -= num_new

    def _preempt(self, request: Request) -> None:
        self.block_manager.free(request)
        request.num_computed_tokens = 0
        request.status = RequestStatus.WAITING
        self.waiting.appendleft(request)
        self.num_preemptions += 1
        self.preemption_log.record(self.num_preemptions)

    def _to_scheduled_seq(self, request: Request, num_new: int) -> ScheduledSeq:
        start = request.num_computed_tokens
        end = start + num_new
        samples = end == request.num_tokens
        num_pending = end - len(request.token_ids)  # inputs sampled on the device, not read back yet
        if num_pending > 1:
            raise RuntimeError(f"{request}: {num_pending} scheduled inputs are not read back (at most 1 can be)")
        return ScheduledSeq(
            request_id=request.request_id,
            input_token_ids=request.token_ids[start:end],
            input_from_previous_sample=num_pending == 1,
            start_pos=start,
            block_table=list(request.block_table),
            sampling=_sampling_row(request) if samples else None,
            prompt_logprobs=_prompt_logprobs_chunk(request, start, end) if request.num_prompt_logprobs is not None
            else None,
        )

    # ------------------------------------------------------------------ after the forward pass
    def on_step_done(self, batch: ScheduledBatch) -> None:
        for seq in batch.seqs:
            request = self.requests.get(seq.request_id)
            if request is None or request.status is not RequestStatus.RUNNING:
                continue
            request.num_computed_tokens = seq.seq_len
            self.block_manager.cache_full_blocks(request)
            if seq.prompt_logprobs is not None and seq.seq_len >= request.num_prompt_tokens - 1:
                self._prompt_logprobs_launched(request)

    def _prompt_logprobs_launched(self, request: Request) -> None:
        """Every prompt position's logprobs has been launched (results come back with the steps): the
        request stops asking, and a recompute after preemption may start from cached blocks again."""
        request.num_prompt_logprobs = None
        self._prompt_logprob_ids.discard(request.request_id)

    def finish(self, request: Request, reason: str | None) -> None:
        if self.requests.get(request.request_id) is request:  # else: never queued, or already removed
            if request.status is RequestStatus.RUNNING:
                self.running.remove(request)
            elif request.status is RequestStatus.WAITING:
                self.waiting.remove(request)
            self.block_manager.free(request)
            del self.requests[request.request_id]
            self._prompt_logprob_ids.discard(request.request_id)
        request.status = RequestStatus.FINISHED
        request.finish_reason = reason

    def check_integrity(self) -> None:
        """Block-manager invariants plus agreement with every live request's block table."""
        self.block_manager.check_integrity(list(self.requests.values()))
        for request in self.requests.values():
            if not 0 <= request.num_computed_tokens <= request.num_tokens:
                raise RuntimeError(f"{request}: num_computed_tokens out of range")


@dataclass
class PreemptionLog:
    """Preemptions as WARNING lines, at most one every ``interval_s`` seconds: each line counts the
    preemptions since the previous line (the first preemption is reported at once)."""

    interval_s: float = 10.0
    clock: Callable[[], float] = time.monotonic
    last_line: float | None = None  # clock() of the last line
    unreported: int = 0

    def record(self, total: int) -> None:
        """Count one preemption (``total`` so far) and log if the last line is ``interval_s`` old."""
        self.unreported += 1
        now = self.clock()
        if self.last_line is not None and now - self.last_line < self.interval_s:
            return
        since = "" if self.last_line is None else f" in the last {now - self.last_line:.0f} s"
        logger.warning("KV cache full: preempted %d sequence(s)%s (%d since start); they are recomputed, which "
                       "costs throughput. Give the KV cache more room (gpu_memory_utilization, num_kvcache_blocks) "
                       "or batch fewer sequences (max_num_seqs).", self.unreported, since, total)
        self.last_line, self.unreported = now, 0


def _max_tokens(request: Request) -> int:
    return request.params.max_tokens if request.params.max_tokens is not None else 1 << 62


def _prompt_logprobs_chunk(request: Request, start: int, end: int) -> PromptLogprobsChunk | None:
    """The prompt tokens that positions ``[start, end)`` predict (the logits at position j give token
    j + 1's logprob); None when the chunk predicts no prompt token."""
    last = min(end, request.num_prompt_tokens - 1)
    if start >= last:
        return None
    return PromptLogprobsChunk(request.num_prompt_logprobs, request.token_ids[start + 1:last + 1])


def _sampling_row(request: Request) -> SamplingRow:
    """The request's row: built once and reused, unless it carries per-step state (penalty token lists,
    EOS banned until min_tokens)."""
    params = request.params
    banned = request.banned_token_ids if request.num_output_tokens < params.min_tokens else ()
    penalized = params.has_penalties
    if not (penalized or banned):
        if request.sampling_row is None:
            request.sampling_row = _new_row(request, (), False)
        return request.sampling_row
    return _new_row(request, banned, penalized)


def _new_row(request: Request, banned, penalized: bool) -> SamplingRow:
    params = request.params
    return SamplingRow(
        temperature=params.temperature, top_k=params.top_k, top_p=params.top_p, min_p=params.min_p,
        seed=request.seed,
        presence_penalty=params.presence_penalty, frequency_penalty=params.frequency_penalty,
        repetition_penalty=params.repetition_penalty, num_logprobs=params.logprobs,
        prompt_token_ids=request.prompt_token_ids if penalized else (),
        output_token_ids=request.output_token_ids if penalized else (),
        banned_token_ids=banned,
    )
