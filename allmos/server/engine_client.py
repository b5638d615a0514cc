"""The front end's handle on the engine-core process (see ``allmos.server.protocol`` for the wire).

``EngineClient.start`` launches ``python -m allmos.server.core_process`` and waits for ``CoreReady``.
Then one asyncio task reads the core's step messages and hands them to the ``OutputProcessor``; request
handlers call ``add`` and ``abort``. When the core's stdout ends (it exited, crashed or was killed) the
client marks itself dead, fails every open request with ``EngineDeadError`` and refuses new ones.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import sys

from allmos.server.output_processor import OutputProcessor, RequestState
from allmos.server.protocol import (
    AbortRequests,
    AddRequest,
    Codec,
    CoreFailed,
    CoreMessage,
    CoreReady,
    FrontendMessage,
    SamplingSettings,
    Shutdown,
    frame_length,
)

logger = logging.getLogger("allmos.server")

_SHUTDOWN_GRACE_S = 10.0


class EngineDeadError(RuntimeError):
    """The engine-core process is gone; no request can be served."""


class EngineClient:
    def __init__(self, proc: asyncio.subprocess.Process, ready: CoreReady, processor: OutputProcessor) -> None:
        self.proc = proc
        self.ready = ready
        self.processor = processor
        self.dead_reason: str | None = None
        self._codec = Codec(FrontendMessage)
        self._incoming = Codec(CoreMessage)
        self._reader_task: asyncio.Task | None = None
        self._stopping = False

    @classmethod
    async def start(cls, engine_config: dict, processor: OutputProcessor, log_level: str = "info") -> EngineClient:
        """Launch the core and wait until its engine is built; raises RuntimeError if it cannot start."""
        config = json.dumps({**engine_config, "log_level": log_level})
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "allmos.server.core_process", config,
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, env=core_environment())
        codec = Codec(CoreMessage)
        try:
            first = codec.decode(await _read_frame(proc.stdout))
        except (asyncio.IncompleteReadError, ValueError) as exc:
            await proc.wait()
            raise RuntimeError(f"the engine core exited during start-up (exit code {proc.returncode})") from exc
        if isinstance(first, CoreFailed):
            await proc.wait()
            raise RuntimeError(f"the engine could not start: {first.message}")
        if not isinstance(first, CoreReady):
            proc.kill()
            raise RuntimeError(f"the engine core sent {type(first).__name__} before it was ready")
        client = cls(proc, first, processor)
        client._reader_task = asyncio.create_task(client._read_outputs(), name="engine-core-outputs")
        return client

    @property
    def is_alive(self) -> bool:
        return self.dead_reason is None

    @property
    def pid(self) -> int:
        return self.proc.pid

    # ------------------------------------------------------------------ commands
    def add(self, state: RequestState, settings: SamplingSettings) -> None:
        """Register ``state`` with the output processor and send the request to the core."""
        self._check_alive()
        self.processor.add(state)
        self._send(AddRequest(state.request_id, state.prompt_token_ids, settings, state.arrival_time))

    def abort(self, request_ids: list[str]) -> None:
        """Forget the requests here and stop them in the core (their KV blocks are freed)."""
        known = [r for r in request_ids if self.processor.remove(r) is not None]
        if known and self.is_alive:
            self._send(AbortRequests(known))

    def _send(self, message) -> None:
        self.proc.stdin.write(self._codec.frame(message))

    def _check_alive(self) -> None:
        if not self.is_alive:
            raise EngineDeadError(f"the engine is not running: {self.dead_reason}")

    # ------------------------------------------------------------------ outputs
    async def _read_outputs(self) -> None:
        reason = "the engine core process exited"
        try:
            while True:
                message = self._incoming.decode(await _read_frame(self.proc.stdout))
                if isinstance(message, CoreFailed):
                    reason = message.message
                    break
                to_abort = self.processor.process(message)
                if to_abort:
                    self._send(AbortRequests(to_abort))
        except asyncio.IncompleteReadError:
            reason = await self._exit_reason()
        except asyncio.CancelledError:
            reason = "the server is shutting down"
            raise
        except Exception as exc:  # a corrupt stream: treat as a dead core
            logger.exception("engine core output stream failed")
            reason = f"bad message from the engine core: {exc}"
        finally:
            self._mark_dead(reason)

    async def _exit_reason(self) -> str:
        try:
            code = await asyncio.wait_for(self.proc.wait(), 5.0)
        except asyncio.TimeoutError:
            return "the engine core process closed its output"
        if code < 0:
            return f"the engine core process was killed by signal {-code}"
        return f"the engine core process exited with code {code}"

    def _mark_dead(self, reason: str) -> None:
        if self.dead_reason is not None:
            return
        self.dead_reason = reason
        log = logger.info if self._stopping else logger.error
        log("engine core is gone (%s); failing %d open request(s)", reason, len(self.processor.states))
        self.processor.fail_all(EngineDeadError(f"the engine stopped: {reason}"))
        if self.proc.returncode is None:
            try:
                self.proc.kill()
            except ProcessLookupError:
                pass

    async def shutdown(self) -> None:
        """Ask the core to stop, wait a little, then kill it. Idempotent."""
        self._stopping = True
        if self.proc.returncode is None:
            try:
                self._send(Shutdown())
                await asyncio.wait_for(self.proc.wait(), _SHUTDOWN_GRACE_S)
            except (asyncio.TimeoutError, ConnectionError, RuntimeError):
                pass
        if self.proc.returncode is None:
            try:
                self.proc.kill()
            except ProcessLookupError:
                pass
            await self.proc.wait()
        if self._reader_task is not None:
            self._reader_task.cancel()
            try:
                await self._reader_task
            except (asyncio.CancelledError, Exception):
                pass


def core_environment() -> dict[str, str]:
    """The core's environment: ours, with OpenMP's idle threads sleeping instead of spinning unless the user
    chose otherwise. The core shares the CPUs with the front end (and often its clients); spinning OpenMP
    workers then steal the time the others need (on a 2-core machine, a 10x slower server was measured)."""
    return {**os.environ, "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY", "PASSIVE")}


async def _read_frame(stream: asyncio.StreamReader) -> bytes:
    header = await stream.readexactly(4)
    return await stream.readexactly(frame_length(header))
