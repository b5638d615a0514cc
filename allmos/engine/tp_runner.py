"""Tensor parallelism over processes: the driver is rank 0, ranks 1..N-1 are spawned workers.

Invariant: a step reaches every rank as one typed message (the serialized ``ScheduledBatch``), written
by the driver into each worker's step pipe before it runs its own shard; every rank then runs the same
``LocalModelRunner.execute`` and samples the same tokens (see ``allmos.engine.worker``). Only the
driver's ``PendingStep`` is read by the engine.

Failure handling: a watchdog thread in the driver waits on the workers' error pipes (a worker's exit
closes its pipe, so exits wake it too). A worker that raises sends its formatted traceback and exits;
the driver then aborts its NCCL group (gloo notices the closed sockets by itself), stops the other
workers, and the engine call in progress raises ``WorkerError`` carrying that traceback. Workers exit
when the driver dies (they poll their parent pid, and read end-of-file on the step pipe) and ignore
Ctrl-C, which the driver turns into an orderly stop.
"""

from __future__ import annotations

import logging
import multiprocessing.connection
import os
import subprocess
import sys
import threading
import time
import weakref
from collections.abc import Callable
from typing import Any

import torch

from allmos.config import EngineConfig
from allmos.engine.batch import ScheduledBatch
from allmos.engine.model_runner import LocalModelRunner, ModelRunner, PendingStep, StepResult
from allmos.engine.serialization import Message, MessageKind
from allmos.engine.worker import (
    DEFAULT_TIMEOUT_S,
    JOINED_KEY,
    DebugOptions,
    RankGroups,
    StepChannel,
    WorkerSpec,
    check_same_tokens,
    connect_store,
    init_rank_groups,
    make_step_pipe,
    set_nccl_env,
)
from allmos.models.model_config import ModelConfig
from allmos.models.resolve import ModelSource

logger = logging.getLogger("allmos")

FAILURE_GRACE_S = 5.0  # after a collective fails, how long to wait for the worker's own error report
STOP_TIMEOUT_S = 10.0  # graceful shutdown: how long workers get to exit before they are terminated
WATCH_INTERVAL_S = 0.2


class WorkerError(RuntimeError):
    """A tensor-parallel worker failed; the message carries its traceback."""


def validate_tp(config: EngineConfig, model_config: ModelConfig, device: torch.device) -> None:
    """Raise ValueError naming the field when ``tensor_parallel_size`` cannot shard this model here."""
    tp = config.tensor_parallel_size
    model_config.verify_tensor_parallel_size(tp)
    if device.type == "cuda":
        first = device.index or 0
        available = torch.cuda.device_count()
        if first + tp > available:
            raise ValueError(f"tensor_parallel_size={tp} needs GPUs cuda:{first}..cuda:{first + tp - 1}, "
                             f"found {available}")


def rank_device(device: torch.device, rank: int) -> torch.device:
    """CPU for every rank, or ``cuda:{first + rank}`` where ``first`` is the configured GPU (default 0)."""
    if device.type != "cuda":
        return device
    return torch.device("cuda", (device.index or 0) + rank)


def rendezvous_address() -> tuple[str, int]:
    """MASTER_ADDR / MASTER_PORT when set; else 127.0.0.1 and port 0 (the store picks a free one)."""
    addr = os.environ.get("MASTER_ADDR") or "127.0.0.1"
    port = os.environ.get("MASTER_PORT")
    if port is None or port == "":
        return addr, 0
    try:
        return addr, int(port)
    except ValueError as exc:
        raise ValueError(f"MASTER_PORT must be an integer, got {port!r}") from exc


def _timeout_from_env() -> float:
    value = os.environ.get("ALLMOS_TP_TIMEOUT_S")
    if not value:
        return DEFAULT_TIMEOUT_S
    try:
        timeout = float(value)
    except ValueError:
        timeout = -1.0
    if not timeout > 0:
        raise ValueError(f"ALLMOS_TP_TIMEOUT_S must be a positive number of seconds, got {value!r}")
    return timeout


# --------------------------------------------------------------------------- workers


class WorkerProcess:
    """One worker: a fresh interpreter running ``python -m allmos.engine.worker`` (never the user's main
    module), its spec sent as JSON on standard input, the read end of its error pipe and the write end of
    its step pipe (``step_fd``, closed by ``close_step_pipe``)."""

    def __init__(self, spec: WorkerSpec) -> None:
        read_fd, write_fd = os.pipe()
        step_read_fd, self.step_fd = make_step_pipe()
        try:
            self.popen = subprocess.Popen(
                [sys.executable, "-m", "allmos.engine.worker", str(write_fd), str(step_read_fd)],
                stdin=subprocess.PIPE, pass_fds=(write_fd, step_read_fd), env=_worker_env())
        except BaseException:
            os.close(read_fd)
            os.close(self.step_fd)
            raise
        finally:
            os.close(write_fd)  # the child holds the write end now; EOF here means it is gone
            os.close(step_read_fd)  # and the read end of its step pipe
        self.conn = multiprocessing.connection.Connection(read_fd, writable=False)
        self.popen.stdin.write((spec.to_json() + "\n").encode())
        self.popen.stdin.close()

    @property
    def pid(self) -> int:
        return self.popen.pid

    @property
    def exitcode(self) -> int | None:
        return self.popen.poll()

    def is_alive(self) -> bool:
        return self.popen.poll() is None

    def join(self, timeout: float) -> None:
        try:
            self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            pass

    def terminate(self) -> None:
        self.popen.terminate()

    def kill(self) -> None:
        self.popen.kill()

    def close_step_pipe(self) -> None:
        """Close the write end of the step pipe (idempotent); the worker then reads end-of-file."""
        if self.step_fd >= 0:
            os.close(self.step_fd)
            self.step_fd = -1


def _worker_env() -> dict[str, str]:
    """The driver's environment, with the folder that holds this ``allmos`` first on the import path."""
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    path = os.environ.get("PYTHONPATH")
    return {**os.environ, "PYTHONPATH": root + (os.pathsep + path if path else "")}


class WorkerPool:
    """Worker processes of one engine, their error pipes, and the watchdog that reports failures."""

    def __init__(self, specs: list[WorkerSpec]) -> None:
        self.processes: list[WorkerProcess] = []
        self.failure: str | None = None
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._failed = threading.Event()
        self._watchdog: threading.Thread | None = None
        self._on_failure: Callable[[], None] | None = None
        self._term_lock = threading.Lock()
        self.stopped = False
        try:
            for spec in specs:
                self.processes.append(WorkerProcess(spec))
        except BaseException:
            self.stop()
            raise

    @property
    def _conns(self) -> list[Any]:
        return [proc.conn for proc in self.processes]

    # ------------------------------------------------------------------ failure detection
    def poll(self) -> str | None:
        """Collect error reports and unexpected exits without blocking; the first failure is kept."""
        with self._lock:
            for rank, (proc, conn) in enumerate(zip(self.processes, self._conns, strict=True), start=1):
                message = _read_error(conn)
                if message is not None:
                    self._record(f"tensor-parallel worker rank {rank} raised:\n{message}")
                elif not proc.is_alive() and not self._stopping.is_set():
                    self._record(f"tensor-parallel worker rank {rank} (pid {proc.pid}) exited with code "
                                 f"{proc.exitcode}")
            return self.failure

    def _record(self, failure: str) -> None:
        if self.failure is None:
            self.failure = failure
            self._failed.set()

    def wait_failure(self, timeout: float) -> str | None:
        """Poll for a failure for up to ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        while True:
            if self.poll() is not None or time.monotonic() >= deadline:
                return self.failure
            self._failed.wait(min(0.05, max(0.0, deadline - time.monotonic())))

    def wait_joined(self, store: Any, timeout_s: float) -> None:
        """Wait until every worker reached the store, raising WorkerError if one fails first."""
        keys = [JOINED_KEY.format(rank=rank) for rank in range(1, len(self.processes) + 1)]
        deadline = time.monotonic() + timeout_s
        while not store.check(keys):
            if self.poll() is not None:
                raise WorkerError(self.failure)
            if time.monotonic() > deadline:
                raise TimeoutError(f"tensor-parallel workers did not start within {timeout_s:.0f} s")
            time.sleep(0.02)

    def start_watchdog(self, on_failure: Callable[[], None]) -> None:
        """From now on a thread reports failures as they happen and calls ``on_failure`` once."""
        self._on_failure = on_failure
        self._watchdog = threading.Thread(target=self._watch, name="allmos-tp-watchdog", daemon=True)
        self._watchdog.start()

    def _watch(self) -> None:
        waitables = list(self._conns)  # a worker's exit closes its pipe: EOF wakes this wait too
        while not self._stopping.is_set():
            try:
                multiprocessing.connection.wait(waitables, timeout=WATCH_INTERVAL_S)
            except (OSError, ValueError):  # closed under us by stop()
                return
            if self._stopping.is_set() or self.poll() is None:
                continue
            logger.error("%s", self.failure)
            if self._on_failure is not None:
                self._on_failure()  # unblock the driver's collectives
            self._terminate_all()
            return

    # ------------------------------------------------------------------ stop
    def stop(self, send_shutdown: Callable[[], None] | None = None, timeout_s: float = STOP_TIMEOUT_S) -> None:
        """Ask workers to exit (``send_shutdown``, only while all are healthy), wait, then terminate and
        kill stragglers. Idempotent."""
        with self._lock:
            if self.stopped:
                return
            self.stopped = True
            healthy = self.failure is None and all(p.is_alive() for p in self.processes)
            self._stopping.set()
        if send_shutdown is not None and healthy:
            try:
                send_shutdown()
            except Exception:  # a worker vanished meanwhile: terminate below
                timeout_s = 0.0
        else:
            timeout_s = 0.0
        deadline = time.monotonic() + timeout_s
        for proc in self.processes:
            proc.join(max(0.0, deadline - time.monotonic()))
        self._terminate_all()
        if self._watchdog is not None and self._watchdog is not threading.current_thread():
            self._watchdog.join(1.0)
        for conn in self._conns:
            conn.close()
        for proc in self.processes:
            proc.close_step_pipe()

    def _terminate_all(self) -> None:
        with self._term_lock:
            for proc in self.processes:
                if proc.is_alive():
                    proc.terminate()
            for proc in self.processes:
                proc.join(2.0)
                if proc.is_alive():
                    proc.kill()
                    proc.join(2.0)


def _read_error(conn: Any) -> str | None:
    try:
        if conn.closed or not conn.poll():
            return None
        return conn.recv_bytes().decode(errors="replace")
    except (EOFError, OSError):
        return None


# --------------------------------------------------------------------------- runner


class _Distributed:
    """What the finalizer needs to stop one engine's ranks (never the runner itself)."""

    def __init__(self, pool: WorkerPool) -> None:
        self.pool = pool
        self.groups: RankGroups | None = None
        self.channel: StepChannel | None = None
        self.broken = False  # a step was cut short: workers may sit in a collective, so no SHUTDOWN message
        self.local: LocalModelRunner | None = None  # the driver's shard, released before the groups
        self._abort_lock = threading.Lock()

    def attach(self, groups: RankGroups) -> None:
        self.groups = groups
        self.channel = StepChannel(send_fds=[proc.step_fd for proc in self.pool.processes])

    def close(self) -> None:
        graceful = not self.broken and self.pool.failure is None and self.channel is not None
        channel = self.channel
        self.pool.stop((lambda: channel.send(Message(MessageKind.SHUTDOWN))) if graceful else None)
        if self.local is not None and graceful:
            self.local.release_graphs(synchronize=True)
        self.abort()
        self.local = None
        if self.groups is not None:
            self.groups.close()

    def abort(self) -> None:
        """Make the driver's pending NCCL work fail instead of waiting for a dead peer; any thread, idempotent.

        NCCL's abort returns only after every CUDA graph that captured the communicator is destroyed (on
        2x H100 it hung with the decode graphs alive), so the graphs go first, without a synchronize: their
        kernels may be the ones waiting for the dead peer, and the abort is what stops them."""
        with self._abort_lock:  # both steps are idempotent; the lock keeps the order across threads
            if self.local is not None:
                self.local.release_graphs(synchronize=False)
            if self.groups is not None:
                self.groups.abort_model()


class _WatchedStep(PendingStep):
    """A GPU step whose ``result()`` waits by polling, so a dead worker raises instead of hanging."""

    def __init__(self, inner: PendingStep, pool: WorkerPool) -> None:
        super().__init__(None, [])
        self._inner = inner
        self._pool = pool

    def is_ready(self) -> bool:
        return self._inner.is_ready()

    def result(self) -> StepResult:
        spins = 0
        while not self._inner.is_ready():
            if self._pool.failure is not None:
                raise WorkerError(self._pool.failure)
            spins += 1
            time.sleep(0 if spins < 2000 else 1e-4)
        if self._pool.failure is not None:  # the values may come from an aborted collective
            raise WorkerError(self._pool.failure)
        return self._inner.result()


class MultiprocessRunner(ModelRunner):
    """``ModelRunner`` over ``config.tensor_parallel_size`` processes; this process is rank 0.

    Rendezvous: ``MASTER_ADDR`` / ``MASTER_PORT`` when set (one engine per port), otherwise a free port
    on 127.0.0.1. Workers are fresh interpreters running ``allmos.engine.worker`` (see ``WorkerProcess``),
    so any script can build an engine, with or without a ``__main__`` guard.
    """

    def __init__(self, config: EngineConfig, source: ModelSource, device: torch.device, dtype: torch.dtype,
                 debug: DebugOptions | None = None) -> None:
        world = config.tensor_parallel_size
        if world < 2:
            raise ValueError(f"tensor_parallel_size must be >= 2 for MultiprocessRunner, got {world}")
        validate_tp(config, source.model_config, device)
        self.config, self.world_size = config, world
        self.debug = debug or DebugOptions.from_env()
        self.device = rank_device(device, 0)
        self.timeout_s = _timeout_from_env()
        self.local: LocalModelRunner | None = None
        self._closed_reason: str | None = None
        if self.device.type == "cuda":
            set_nccl_env()  # before the driver's NCCL init and before the workers inherit the environment
        addr, port = rendezvous_address()
        try:
            store = connect_store(addr, port, world, 0, self.timeout_s)
        except Exception as exc:
            raise RuntimeError(f"tensor parallelism: cannot host the rendezvous store on {addr}:{port} "
                               f"({exc}); unset MASTER_PORT to pick a free port") from exc
        pool = WorkerPool([self._spec(source, dtype, rank, addr, store.port) for rank in range(1, world)])
        self._dist = _Distributed(pool)
        self._finalizer = weakref.finalize(self, self._dist.close)
        try:
            pool.wait_joined(store, self.timeout_s)
            groups = init_rank_groups(store, 0, world, self.device, self.timeout_s)
            self._dist.attach(groups)
            pool.start_watchdog(self._dist.abort)
            self.local = LocalModelRunner(config, source.model_config, source.folder, self.device, dtype, groups.tp)
            self._dist.local = self.local
        except BaseException as exc:
            self._fail(exc)
        self.num_kv_blocks = self.local.num_kv_blocks  # already the minimum over ranks

    def _spec(self, source: ModelSource, dtype: torch.dtype, rank: int, addr: str, port: int) -> WorkerSpec:
        return WorkerSpec(config=self.config, model_folder=str(source.folder),
                          device=str(rank_device(self.device, rank)), dtype=dtype, rank=rank,
                          world_size=self.world_size, master_addr=addr, master_port=port,
                          timeout_s=self.timeout_s,
                          num_threads=max(1, torch.get_num_threads() // self.world_size), debug=self.debug)

    @property
    def workers(self) -> list[Any]:
        """The worker processes (ranks 1..N-1), for inspection."""
        return list(self._dist.pool.processes)

    # ------------------------------------------------------------------ one step
    def execute(self, batch: ScheduledBatch) -> PendingStep:
        self._check_usable()
        if batch.is_empty:
            return PendingStep(None, [])
        data = self._dist.channel.encode(Message(MessageKind.STEP, batch))  # fails before anything is sent
        try:
            self._dist.channel.send_bytes(data)
            pending = self.local.execute(batch)
            if self.debug.verify_tokens and batch.sampled_seqs:
                check_same_tokens(self._dist.groups.control, self.world_size, pending.result().token_ids)
        except BaseException as exc:
            self._fail(exc)
        if self._dist.pool.failure is not None:
            self._fail(WorkerError(self._dist.pool.failure))
        if self.device.type == "cuda":
            return _WatchedStep(pending, self._dist.pool)
        return pending

    def _check_usable(self) -> None:
        failure = self._dist.pool.failure
        if failure is not None:
            self._fail(WorkerError(failure))
        if self._closed_reason is not None:
            raise RuntimeError(f"the tensor-parallel runner is shut down ({self._closed_reason}); "
                               "create a new LLM")

    def _fail(self, exc: BaseException) -> None:
        """Stop every rank and raise. A ``RuntimeError`` may be the symptom of a worker's failure (a
        collective whose peer died): then ``WorkerError`` with the worker's traceback is raised from it.
        Anything else (the driver's own ``ValueError``, ``KeyboardInterrupt``...) is raised as it is."""
        is_symptom = isinstance(exc, RuntimeError) and not isinstance(exc, WorkerError)
        failure = self._dist.pool.wait_failure(FAILURE_GRACE_S if is_symptom else 0.0)
        if self._closed_reason is None:
            self._closed_reason = "a worker failed" if failure else f"interrupted by {type(exc).__name__}"
        self._dist.broken = True
        self._dist.abort()
        self._close()
        if is_symptom and failure is not None:
            raise WorkerError(failure) from exc
        raise exc

    # ------------------------------------------------------------------ lifecycle
    def shutdown(self) -> None:
        """Send SHUTDOWN, join the workers (terminating stragglers) and release the process groups."""
        if self._closed_reason is None:
            self._closed_reason = "shutdown() was called"
        self._close()

    def _close(self) -> None:
        self._finalizer()
        self.local = None
