"""The engine loop: admission and validation, one scheduler + runner step, stop checks, outputs.

Usable online: ``add_request`` / ``step`` / ``abort`` / ``has_unfinished`` (a server drives this loop).
"""

from __future__ import annotations

import itertools
import logging
import random
import time
from collections.abc import Iterable
from dataclasses import dataclass, field

import torch

from allmos.config import EngineConfig
from allmos.engine.batch import ScheduledBatch
from allmos.engine.core_types import LogprobEntries, PromptLogprobsResult
from allmos.engine.detokenizer import IncrementalDetokenizer
from allmos.engine.model_runner import LocalModelRunner, ModelRunner
from allmos.engine.warmup import warm_up
from allmos.inputs import ParsedPrompt, PromptType, parse_prompt
from allmos.models.resolve import ModelSource, load_model_source
from allmos.outputs import CompletionOutput, Logprob, RequestMetrics, RequestOutput
from allmos.sampling_params import SamplingParams
from allmos.utils.heap import freeze_startup_heap
from legacy_engine.request import PENDING_TOKEN, Request, RequestStatus
from legacy_engine.scheduler import ContinuousBatchingScheduler, SchedulerConfig
from legacy_engine.sentinel import SentinelBlockManager, SentinelRunner

logger = logging.getLogger("allmos")


@dataclass(frozen=True)
class RuntimeInfo:
    """Values found at start-up (never written back into the config)."""

    max_model_len: int
    vocab_size: int
    eos_token_ids: frozenset[int]
    num_kv_blocks: int
    device: torch.device
    dtype: torch.dtype


@dataclass
class _Group:
    """A user request: one prompt, ``n`` sequences."""

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    params: SamplingParams
    seqs: list[Request]
    detokenizers: list[IncrementalDetokenizer | None]
    arrival_time: float
    stream: bool = False  # report every step (not only the final output)
    prompt_logprobs: list[dict[int, Logprob]] = field(default_factory=list)  # prompt positions 1, 2, ...

    @property
    def finished(self) -> bool:
        return all(s.finish_reason is not None for s in self.seqs)


class LLMEngine:
    def __init__(self, config: EngineConfig, runner: ModelRunner | None = None) -> None:
        self.config = config
        self.source: ModelSource = load_model_source(config.model)
        self.tokenizer = self._load_tokenizer()
        device = config.resolved_device()
        model_config = self.source.model_config
        dtype = config.resolved_dtype(self.source.checkpoint_dtype, device)
        self.runner = runner or self._make_runner(device, dtype)
        self.info = RuntimeInfo(
            max_model_len=model_config.effective_max_model_len(config.max_model_len),
            vocab_size=model_config.vocab_size,
            eos_token_ids=frozenset(self._eos_ids()),
            num_kv_blocks=self.runner.num_kv_blocks,
            device=device, dtype=dtype,
        )
        self.block_manager = SentinelBlockManager(self.runner.num_kv_blocks, config.kvcache_block_size,
                                          config.enable_prefix_caching)
        self.scheduler = ContinuousBatchingScheduler(
            SchedulerConfig(config.max_num_seqs, config.max_num_batched_tokens, self.info.max_model_len),
            self.block_manager)
        self._groups: dict[str, _Group] = {}
        self._pending_outputs: list[RequestOutput] = []
        self._in_flight = None  # (PendingStep, reserved token slots) of the last launched step
        self._penalized: set[str] = set()  # requests whose sampling needs their real output tokens
        self._deferred: dict[str, list[Request]] = {}  # n > 1 siblings waiting for the shared prompt
        self._prompt_logprob_groups: dict[str, _Group] = {}  # sequence id -> group collecting prompt logprobs
        self._token_texts: dict[int, str] = {}  # decoded_token of logprob entries, per token id
        self._rng = random.Random(config.seed)
        self._ids = itertools.count()
        self.num_generated_tokens = 0
        logger.info(kv_cache_summary(self.info.num_kv_blocks, config.kvcache_block_size, self.info.max_model_len)
                    + f"; {device} {dtype}")
        if device.type == "cuda":  # Triton compiles kernel variants on first use: do it now, not mid-request
            warm_up(self)
        freeze_startup_heap()

    # ------------------------------------------------------------------ set-up
    def _make_runner(self, device: torch.device, dtype: torch.dtype) -> ModelRunner:
        if self.config.tensor_parallel_size > 1:
            from allmos.engine.tp_runner import MultiprocessRunner
            return SentinelRunner(MultiprocessRunner(self.config, self.source, device, dtype))
        return SentinelRunner(LocalModelRunner(self.config, self.source.model_config, self.source.folder, device,
                                               dtype))

    def _load_tokenizer(self):
        if not self.source.has_tokenizer:
            return None
        from transformers import AutoTokenizer
        return AutoTokenizer.from_pretrained(self.config.tokenizer or self.source.folder, trust_remote_code=False)

    def _eos_ids(self) -> set[int]:
        ids: set[int] = set()
        for value in (self.source.generation_config.get("eos_token_id"),
                      list(self.source.model_config.eos_token_ids)):
            ids.update(_as_list(value))
        if self.tokenizer is not None and self.tokenizer.eos_token_id is not None:
            ids.add(self.tokenizer.eos_token_id)
        return ids

    def default_sampling_params(self) -> SamplingParams:
        """SamplingParams() with the model's generation_config.json defaults applied (as vLLM does)."""
        gen = self.source.generation_config
        keys = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty")  # same names in both
        kwargs = {key: gen[key] for key in keys if gen.get(key) is not None}
        if isinstance(kwargs.get("top_k"), float) and kwargs["top_k"].is_integer():
            kwargs["top_k"] = int(kwargs["top_k"])  # some configs write 20.0; SamplingParams takes ints
        if gen.get("do_sample") is False:
            kwargs["temperature"] = 0.0
        if gen.get("max_new_tokens"):
            kwargs["max_tokens"] = int(gen["max_new_tokens"])
        return SamplingParams(**kwargs)

    # ------------------------------------------------------------------ requests
    def tokenize(self, prompt: str | list[int]) -> list[int]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError("this model has no tokenizer (e.g. load_format='dummy' from a bare config.json): "
                                 "pass prompts as lists of token ids")
            # a chat template already carries its special tokens; a plain prompt gets the usual BOS
            templated = bool(self.tokenizer.bos_token) and prompt.startswith(self.tokenizer.bos_token)
            return self.tokenizer.encode(prompt, add_special_tokens=not templated)
        return list(prompt)

    def add_request(self, request_id: str | None, prompt: PromptType | ParsedPrompt,
                    params: SamplingParams | None = None, *, stream: bool = False,
                    arrival_time: float | None = None) -> str:
        """Validate and queue a request; raises ValueError (and queues nothing) on bad input.

        ``prompt``: a text, a list of token ids, ``{"prompt": text}`` or ``{"prompt_token_ids": ids}``."""
        params = self.default_sampling_params() if params is None else params
        if not isinstance(params, SamplingParams):
            raise ValueError(f"sampling params must be a SamplingParams, got {type(params).__name__}")
        parsed = prompt if isinstance(prompt, ParsedPrompt) else parse_prompt(prompt)
        request_id = str(next(self._ids)) if request_id is None else str(request_id)
        if request_id in self._groups:
            raise ValueError(f"request id {request_id!r} is already in use")
        token_ids = self.tokenize(parsed.text) if parsed.token_ids is None else list(parsed.token_ids)
        self._validate_prompt(token_ids, params)
        arrival = arrival_time or time.time()
        seqs = [self._make_seq(request_id, i, token_ids, params, arrival) for i in range(params.n)]
        self.scheduler.check_fits(seqs[0])
        self.scheduler.add(seqs[0])
        if len(seqs) > 1:
            # siblings wait until the first one's prompt is in the KV cache, then share its full blocks
            self._deferred[request_id] = seqs[1:]
        needs_stream_text = stream or bool(params.stop)
        group = _Group(request_id, parsed.text, token_ids, params, seqs,
                       [self._detokenizer(token_ids, params) if needs_stream_text else None for _ in seqs],
                       arrival, stream)
        self._groups[request_id] = group
        if params.has_penalties:
            self._penalized.add(request_id)
        if seqs[0].num_prompt_logprobs is not None:
            self._prompt_logprob_groups[seqs[0].request_id] = group
        return request_id

    def _validate_prompt(self, token_ids: list[int], params: SamplingParams) -> None:
        if not token_ids:
            raise ValueError("The prompt is empty: give at least one token")
        max_len = self.info.max_model_len
        if len(token_ids) >= max_len:
            raise ValueError(f"This model's maximum context length is {max_len} tokens. However, your request has "
                             f"{len(token_ids)} input tokens, which leaves no room for output. Please reduce "
                             "the length of the prompt (or raise max_model_len).")
        bad = [t for t in token_ids if not (isinstance(t, int) and 0 <= t < self.info.vocab_size)]
        if bad:
            raise ValueError(f"prompt token id {bad[0]!r} is outside the vocabulary [0, {self.info.vocab_size})")
        params.validate_for_vocab(self.info.vocab_size)

    def _make_seq(self, request_id: str, index: int, token_ids: list[int], params: SamplingParams,
                  arrival: float) -> Request:
        seq_id = request_id if params.n == 1 else f"{request_id}#{index}"
        seed = self._rng.getrandbits(63) if params.seed is None else (params.seed + 0x9E3779B97F4A7C15 * index) % 2**63
        seq = Request(seq_id, token_ids, params, seed, arrival, group_id=request_id, index=index)
        if index == 0 and params.prompt_logprobs is not None and len(token_ids) > 1:
            seq.num_prompt_logprobs = params.prompt_logprobs  # the first sequence computes them for the group
        if params.min_tokens > 0:
            seq.banned_token_ids = tuple(sorted(set(params.stop_token_ids) | (
                set() if params.ignore_eos else set(self.info.eos_token_ids))))
        return seq

    def _detokenizer(self, token_ids: list[int], params: SamplingParams) -> IncrementalDetokenizer | None:
        if self.tokenizer is None:
            return None
        return IncrementalDetokenizer(self.tokenizer, token_ids, skip_special_tokens=params.skip_special_tokens,
                                      stop=params.stop, include_stop_str_in_output=params.include_stop_str_in_output)

    def abort(self, request_id: str, *, emit_output: bool = True) -> RequestOutput | None:
        """Stop a request now and free its blocks; its final output (``finish_reason='abort'``) is returned
        and, with ``emit_output``, also delivered by the next ``step``. An unknown or already finished id
        changes nothing and returns None."""
        group = self._remove(request_id)
        if group is None:
            return None
        for seq in group.seqs:
            if seq.finish_reason is None:
                seq.drop_pending_tail()
                self.scheduler.finish(seq, "abort")
        out = self._make_output(group)
        if emit_output:
            self._pending_outputs.append(out)
        return out

    def abort_request(self, request_id: str | Iterable[str]) -> list[RequestOutput]:
        """vLLM's name: abort one request id or an iterable of them. Unknown or already finished ids are
        ignored (as in vLLM); returns the final outputs of the requests actually aborted, which the next
        ``step`` also delivers."""
        ids = [request_id] if isinstance(request_id, str) else request_id
        if not isinstance(ids, Iterable):
            raise ValueError(f"request_id must be a str or an iterable of str, got {type(request_id).__name__}")
        ids = list(ids)
        bad = [i for i in ids if not isinstance(i, str)]
        if bad:
            raise ValueError(f"request ids are strings, got {type(bad[0]).__name__} {bad[0]!r}")
        return [out for out in map(self.abort, ids) if out is not None]

    def has_unfinished(self) -> bool:
        return bool(self._groups) or bool(self._pending_outputs) or self._in_flight is not None

    # ------------------------------------------------------------------ the loop
    def step(self) -> list[RequestOutput]:
        """Launch one forward pass, then read back the previous one; returns an output for every request
        that finished, and for every streaming request that advanced, in the step read back.

        Overlap: tokens sampled in step N stay on the device and feed step N+1 directly; the host appends
        ``PENDING_TOKEN`` for them, schedules and launches N+1, and only then waits for N's tokens (stop
        checks, detokenization). A request that stopped at N wastes its slot in N+1, which is dropped.
        Requests with penalties need their real output tokens, so their presence makes a step synchronous.
        """
        outputs, self._pending_outputs = self._pending_outputs, []
        self._release_deferred()
        if self._in_flight is not None and self._needs_sync():
            outputs += self._read_back(self._in_flight)
            self._in_flight = None
        batch = self.scheduler.schedule()
        launched = None
        if not batch.is_empty:
            pending = self.runner.execute(batch)
            self.scheduler.on_step_done(batch)
            launched = (pending, self._append_pending(batch))
        if self._in_flight is not None:
            outputs += self._read_back(self._in_flight)
        self._in_flight = launched
        return outputs

    def _release_deferred(self) -> None:
        """Queue the n > 1 siblings whose first sequence has computed its prompt (they then start from
        its cached prompt blocks instead of computing the prompt again)."""
        for request_id in list(self._deferred):
            first = self._groups[request_id].seqs[0]
            if first.finish_reason is not None or first.num_computed_tokens >= first.num_prompt_tokens - 1:
                for seq in self._deferred.pop(request_id):
                    self.scheduler.add(seq)

    def _needs_sync(self) -> bool:
        return bool(self._penalized)

    def _append_pending(self, batch: ScheduledBatch) -> list[tuple[Request, int]]:
        """Reserve each sampled token's slot; requests that reached their length limit leave the scheduler
        now (their last token is still read back and reported)."""
        slots = []
        for seq_info in batch.sampled_seqs:
            seq = self.scheduler.requests.get(seq_info.request_id)
            if seq is None:
                continue
            slots.append((seq, seq.append_token(PENDING_TOKEN)))
            if self._hit_length_limit(seq):
                self.scheduler.finish(seq, None)  # no more compute; the reason is set once read back
        return slots

    def _hit_length_limit(self, seq: Request) -> bool:
        max_tokens = seq.params.max_tokens
        return (max_tokens is not None and seq.num_output_tokens >= max_tokens) or \
            seq.num_tokens >= self.info.max_model_len

    def _read_back(self, in_flight) -> list[RequestOutput]:
        pending, slots = in_flight
        result = pending.result()
        for chunk in result.prompt_logprobs:  # before the tokens: the step may finish the request
            self._store_prompt_logprobs(chunk)
        touched: dict[str, _Group] = {}
        now = time.time()
        for row, (seq, index) in enumerate(slots):
            group = self._groups.get(seq.group_id)
            if group is None or seq.finish_reason is not None:
                continue  # aborted, or stopped in an earlier step: this token is dropped
            token = result.token_ids[row]
            seq.token_ids[index] = token
            self.num_generated_tokens += 1
            if seq.first_token_time is None:
                seq.first_token_time = now
            if result.logprobs is not None and group.params.logprobs is not None:
                entries = result.logprobs[row]
                seq.cumulative_logprob += entries[0][1]
                seq.output_logprobs.append(self._logprob_dict(entries))
            self._check_stop(group, seq, token)
            touched[group.request_id] = group
        outputs = []
        for group in touched.values():
            finished = group.finished
            if finished or group.stream:
                outputs.append(self._make_output(group))
            if finished:
                self._remove(group.request_id)
        return outputs

    def _remove(self, request_id: str) -> _Group | None:
        self._penalized.discard(request_id)
        self._deferred.pop(request_id, None)
        group = self._groups.pop(request_id, None)
        if group is not None:
            self._prompt_logprob_groups.pop(group.seqs[0].request_id, None)
        return group

    def _store_prompt_logprobs(self, chunk: PromptLogprobsResult) -> None:
        """File one chunk's prompt logprobs; a chunk recomputed after a preemption replaces what it
        covers, and once every position is filled later chunks are ignored."""
        group = self._prompt_logprob_groups.get(chunk.request_id)
        if group is None:
            return
        stored, wanted = group.prompt_logprobs, len(group.prompt_token_ids) - 1
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

    def _check_stop(self, group: _Group, seq: Request, token: int) -> None:
        """Decide whether ``token`` (just read back) ends ``seq``; vLLM's order: EOS / stop ids, stop
        strings, then length. Below ``min_tokens`` only the length can end it (stop ids and EOS are also
        banned in the sampler; a stop string must end after the ``min_tokens``-th token)."""
        params = group.params
        detok = group.detokenizers[seq.index]
        produced = self._num_known_outputs(seq)
        update = detok.update([token], check_stops=produced > params.min_tokens) if detok is not None else None
        stop_string = update.stop_string if update is not None else None
        reason, stop_reason = None, None
        if produced >= params.min_tokens:
            if token in params.stop_token_ids:
                reason, stop_reason = "stop", token
            elif not params.ignore_eos and token in self.info.eos_token_ids:
                reason = "stop"
        if reason is None and stop_string is not None:
            reason, stop_reason = "stop", stop_string
        if reason is None and seq.status is RequestStatus.FINISHED and not seq.has_pending_token:
            reason = "length"  # left the scheduler when its last slot was reserved
        if reason is None:
            return
        seq.drop_pending_tail()
        seq.stop_reason = stop_reason
        if detok is not None:
            detok.finish()
        self.scheduler.finish(seq, reason)

    @staticmethod
    def _num_known_outputs(seq: Request) -> int:
        """Output tokens up to the one just read back (a later slot may still be pending)."""
        return seq.num_output_tokens - int(seq.has_pending_token)

    # ------------------------------------------------------------------ outputs
    def _make_output(self, group: _Group) -> RequestOutput:
        completions = [self._completion(group, i, seq) for i, seq in enumerate(group.seqs)]
        first = [s.first_token_time for s in group.seqs if s.first_token_time is not None]
        finished = group.finished
        metrics = RequestMetrics(group.arrival_time, min(first) if first else None,
                                 time.time() if finished else None)
        prompt_logprobs = [None, *group.prompt_logprobs] if group.params.prompt_logprobs is not None else None
        return RequestOutput(group.request_id, group.prompt, group.prompt_token_ids, completions, finished,
                             max(0, group.seqs[0].num_cached_tokens), metrics, prompt_logprobs)

    def _completion(self, group: _Group, index: int, seq: Request) -> CompletionOutput:
        detok = group.detokenizers[index]
        if detok is not None:
            text = detok.output_text
        elif self.tokenizer is not None and seq.finish_reason is not None:
            text = self.tokenizer.decode(_strip_eos(seq, self.info.eos_token_ids),
                                         skip_special_tokens=group.params.skip_special_tokens)
        else:
            text = ""
        return CompletionOutput(index=index, text=text, token_ids=_read_output_ids(seq),
                               cumulative_logprob=seq.cumulative_logprob if group.params.logprobs is not None else None,
                               logprobs=list(seq.output_logprobs) if group.params.logprobs is not None else None,
                               finish_reason=seq.finish_reason, stop_reason=seq.stop_reason)

    def shutdown(self) -> None:
        self.runner.shutdown()


def kv_cache_summary(num_blocks: int, block_size: int, max_model_len: int) -> str:
    """The start-up line: what the KV cache holds in tokens, and how many full-length sequences fit."""
    tokens = num_blocks * block_size
    line = (f"KV cache: {num_blocks} blocks x {block_size} tokens = {tokens} tokens; "
            f"max concurrency {tokens / max_model_len:.2f}x at max_model_len={max_model_len}")
    if tokens < max_model_len:
        line += f" (a request that may need more than {tokens} tokens is rejected)"
    return line


def _read_output_ids(seq: Request) -> list[int]:
    """The output tokens read back so far (a streaming output is made while the next slot is pending)."""
    ids = seq.output_token_ids
    end = len(ids)
    while end and ids[end - 1] == PENDING_TOKEN:
        end -= 1
    return ids[:end]


def _strip_eos(seq: Request, eos_ids: frozenset[int]) -> list[int]:
    ids = seq.output_token_ids
    if seq.finish_reason == "stop" and seq.stop_reason is None and ids and ids[-1] in eos_ids:
        return ids[:-1]
    return ids


def _as_list(value) -> list[int]:
    if value is None:
        return []
    return [int(v) for v in value] if isinstance(value, (list, tuple)) else [int(value)]

