"""The engine-core process: runs the engine core's step loop and nothing else.

Started by the front end as ``python -m allmos.server.core_process CONFIG_JSON`` (a fresh interpreter:
nothing of the parent is pickled or imported). ``CONFIG_JSON`` holds ``model``, ``log_level`` and the
``EngineConfig`` keys. The wire format is in ``allmos.server.protocol``.

Threads: a reader turns stdin frames into commands on a queue; a writer sends the encoded step outputs;
the main thread only admits/aborts requests and steps the engine, so it never waits for the front end
(it blocks only when it has nothing to compute). ``EngineCore`` is the thin adapter between the engine
and the protocol: token ids in (validated by the engine's input processor), the core's columnar step
output out (``NewTokens``), no text: detokenization and stop strings live in the front end.
"""

from __future__ import annotations

import json
import logging
import os
import queue
import sys
import threading
import time
import traceback

import msgspec

from allmos.engine.core_types import CoreStepOutput, LogprobEntries
from allmos.server.protocol import (
    AbortRequests,
    AddRequest,
    Codec,
    CoreFailed,
    CoreMessage,
    CoreReady,
    CoreStats,
    FrontendMessage,
    NewTokens,
    Rejected,
    Scheduled,
    Shutdown,
    StepOutputs,
    frame_length,
)
from allmos.utils.fdio import read_exact, write_all

logger = logging.getLogger("allmos.core")

_DEFAULT_SAMPLING_KEYS = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty", "max_tokens")


class EngineCore:
    """Admits requests as token ids, steps ``engine.core`` and reports each step's new tokens, columnar.

    The ``LLMEngine`` is built for its parts: its input processor validates requests, its core computes;
    its output processor is not used (text is the front end's)."""

    def __init__(self, engine) -> None:
        self.engine = engine
        self.core = engine.core
        self._unscheduled: dict[str, int] = {}  # request id -> prompt length, until first scheduled
        self._prefix_queries = 0
        self._prefix_hits = 0

    def ready_message(self) -> CoreReady:
        engine = self.engine
        defaults = engine.default_sampling_params()
        return CoreReady(
            model_folder=str(engine.source.folder), has_tokenizer=engine.tokenizer is not None,
            max_model_len=engine.info.max_model_len,
            vocab_size=engine.info.vocab_size, eos_token_ids=sorted(engine.info.eos_token_ids),
            num_kv_blocks=engine.info.num_kv_blocks, block_size=engine.config.kvcache_block_size,
            default_sampling={k: getattr(defaults, k) for k in _DEFAULT_SAMPLING_KEYS})

    def add(self, msg: AddRequest) -> Rejected | None:
        from allmos.sampling_params import SamplingParams

        try:
            params = SamplingParams(**msgspec.structs.asdict(msg.sampling))
            request, _ = self.engine.input_processor.process(msg.request_id, msg.prompt_token_ids, params,
                                                             msg.arrival_time)
            self.core.add_request(request)
        except ValueError as exc:
            return Rejected(msg.request_id, str(exc))
        self._unscheduled[msg.request_id] = len(msg.prompt_token_ids)
        return None

    def abort(self, request_ids: list[str]) -> None:
        self.core.abort_requests(request_ids)
        for request_id in request_ids:
            self._unscheduled.pop(request_id, None)

    def has_work(self) -> bool:
        return self.core.has_unfinished()

    def step(self) -> tuple[NewTokens, list[Scheduled]]:
        start = time.time()
        return new_tokens(self.core.step()), self._newly_scheduled(start)

    def _newly_scheduled(self, step_start: float) -> list[Scheduled]:
        found = []
        for request_id, prompt_len in list(self._unscheduled.items()):
            cached = self.core.num_cached_tokens(request_id)
            if cached is None:
                continue
            del self._unscheduled[request_id]
            self._prefix_queries += prompt_len
            self._prefix_hits += cached
            found.append(Scheduled(request_id, step_start, cached))
        return found

    def stats(self) -> CoreStats:
        s = self.engine.get_stats()
        return CoreStats(num_running_reqs=s.num_running, num_waiting_reqs=s.num_waiting,
                         kv_cache_usage=s.kv_cache_usage, num_free_blocks=s.num_free_blocks,
                         num_kv_blocks=s.num_blocks, num_preemptions=s.num_preemptions,
                         prefix_cache_queries=self._prefix_queries, prefix_cache_hits=self._prefix_hits)


def new_tokens(step: CoreStepOutput) -> NewTokens:
    """The core's step output as the wire's ``NewTokens``: the columns as they are; logprob entries
    reduced to (token id, logprob) pairs without repeats (the sampled token keeps its place first)."""
    logprobs = {row: _logprob_pairs(entries) for row, entries in step.logprobs.items()}
    return NewTokens(step.request_ids, step.indices, step.token_ids, step.finished, logprobs)


def _logprob_pairs(entries: LogprobEntries) -> list[tuple[int, float]]:
    pairs: dict[int, float] = {}
    for token, logprob, _rank in entries:
        pairs.setdefault(token, logprob)
    return list(pairs.items())


# ---------------------------------------------------------------------- pipes
def _reader(fd: int, codec: Codec, inbox: queue.SimpleQueue) -> None:
    """Decode frames from ``fd`` onto ``inbox``; ``None`` marks end of file (or a broken stream)."""
    try:
        while True:
            header = read_exact(fd, 4)
            payload = read_exact(fd, frame_length(header)) if header is not None else None
            if payload is None:
                break
            inbox.put(codec.decode(payload))
    except Exception:  # a corrupt frame: nothing sensible can follow on this stream
        logger.exception("engine core: bad message from the front end")
    inbox.put(None)


def _writer(fd: int, outbox: queue.SimpleQueue) -> None:
    while True:
        data = outbox.get()
        if data is None:
            return
        try:
            write_all(fd, data)
        except OSError:  # the front end is gone; the reader sees end of file too
            return


class CoreLoop:
    """The process's main loop around an ``EngineCore``."""

    def __init__(self, core: EngineCore, inbox: queue.SimpleQueue, send) -> None:
        self.core = core
        self.inbox = inbox
        self.send = send

    def run(self) -> None:
        while True:
            commands = self._next_commands(block=not self.core.has_work())
            rejected, stop = self._apply(commands)
            if stop:
                return
            tokens, scheduled = self.core.step() if self.core.has_work() else (NewTokens(), [])
            if tokens.token_ids or rejected or scheduled or commands:
                self.send(StepOutputs(tokens, rejected, scheduled, self.core.stats(), time.time()))

    def _next_commands(self, block: bool) -> list:
        commands = [self.inbox.get()] if block else []
        while True:
            try:
                commands.append(self.inbox.get_nowait())
            except queue.Empty:
                return commands

    def _apply(self, commands: list) -> tuple[list[Rejected], bool]:
        rejected: list[Rejected] = []
        for command in commands:
            if command is None or isinstance(command, Shutdown):
                return rejected, True
            if isinstance(command, AddRequest):
                result = self.core.add(command)
                if result is not None:
                    rejected.append(result)
            elif isinstance(command, AbortRequests):
                self.core.abort(command.request_ids)
        return rejected, False


def _build_engine(config: dict):
    from allmos.config import EngineConfig
    from allmos.engine.llm_engine import LLMEngine

    kwargs = dict(config)
    model = kwargs.pop("model", None)
    return LLMEngine(EngineConfig.from_kwargs(model, **kwargs))


def serve_core(config: dict, in_fd: int, out_fd: int) -> int:
    """Build the engine, announce it, then run until shutdown or end of input. Returns the exit code."""
    codec = Codec(FrontendMessage)
    out_codec = Codec(CoreMessage)
    outbox: queue.SimpleQueue = queue.SimpleQueue()
    writer = threading.Thread(target=_writer, args=(out_fd, outbox), name="core-writer", daemon=True)
    writer.start()
    try:
        core = EngineCore(_build_engine(config))
    except Exception as exc:
        logger.error("engine core failed to start: %s", exc)
        outbox.put(out_codec.frame(CoreFailed(f"{type(exc).__name__}: {exc}")))
        outbox.put(None)
        writer.join(timeout=5)
        return 1
    outbox.put(out_codec.frame(core.ready_message()))
    inbox: queue.SimpleQueue = queue.SimpleQueue()
    threading.Thread(target=_reader, args=(in_fd, codec, inbox), name="core-reader", daemon=True).start()
    code = 0
    try:
        CoreLoop(core, inbox, lambda message: outbox.put(out_codec.frame(message))).run()
    except Exception as exc:
        logger.error("engine core crashed:\n%s", traceback.format_exc())
        outbox.put(out_codec.frame(CoreFailed(f"engine core crashed: {type(exc).__name__}: {exc}")))
        code = 1
    finally:
        outbox.put(None)
        writer.join(timeout=5)
        core.engine.shutdown()
    return code


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    config = json.loads(argv[0]) if argv else {}
    level = str(config.pop("log_level", "info")).upper()
    logging.basicConfig(level=level, stream=sys.stderr, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("allmos").setLevel(level)
    out_fd = os.dup(1)  # the protocol stream; fd 1 (stray prints) goes to stderr from here on
    os.dup2(2, 1)
    return serve_core(config, 0, out_fd)


if __name__ == "__main__":
    sys.exit(main())
