"""One tensor-parallel rank: rendezvous, process groups, the step channel and the worker loop.

Invariant: every rank executes the same sequence of ``ScheduledBatch`` es, in the same order, with a
``LocalModelRunner`` holding its own shard. Rank 0 (the driver) writes each batch as one typed
message into every worker's step pipe before it runs the step itself; ranks 1..N-1 receive, run and repeat.
The model's collectives leave every rank with the same all-gathered logits, and the sampler is a pure
function of (logits, seed, position), so every rank samples the same tokens and fills its own
inputs taken from its own previous step's samples: no token travels between ranks.

Process groups are built directly on a ``TCPStore`` (``torch.distributed``'s env:// recipe without the
process-global default group), so one driver process can hold several engines, each with its own store,
port and workers.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import os
import signal
import sys
import threading
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from allmos.config import EngineConfig
from allmos.engine.serialization import (
    BatchDecoder,
    BatchEncoder,
    Message,
    MessageKind,
    decode_message,
    encode_message,
)
from allmos.engine.warmup import is_warmup_batch
from allmos.layers.tp import TPGroup
from allmos.utils.fdio import read_exact, write_all
from allmos.utils.heap import freeze_startup_heap

DEFAULT_TIMEOUT_S = 1800.0  # rendezvous and collectives (the first one waits for the slowest rank to load)
PIPE_BYTES = 1 << 20  # step-pipe capacity asked for
PARENT_POLL_S = 0.5
NCCL_ENV = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}
JOINED_KEY = "allmos/joined/{rank}"


@dataclass(frozen=True)
class DebugOptions:
    """Test hooks, read from the driver's environment and handed to every worker.

    ``ALLMOS_TP_VERIFY=1``: after every step all ranks all-gather their sampled tokens and raise on any
    difference (one host sync per step). ``ALLMOS_TP_FAIL_AT=RANK:STEP``: rank RANK raises in its
    STEP-th step (1-based; 0 = while starting, before it loads the model), to test failure handling."""

    verify_tokens: bool = False
    fail_rank: int | None = None
    fail_at_step: int | None = None  # counts steps that carry user requests (the start-up warm-up's do not)

    @classmethod
    def from_env(cls) -> DebugOptions:
        verify = os.environ.get("ALLMOS_TP_VERIFY", "") not in ("", "0")
        fail = os.environ.get("ALLMOS_TP_FAIL_AT", "")
        if not fail:
            return cls(verify)
        try:
            rank, step = (int(x) for x in fail.split(":"))
        except ValueError as exc:
            raise ValueError(f"ALLMOS_TP_FAIL_AT must look like RANK:STEP, got {fail!r}") from exc
        return cls(verify, rank, step)


@dataclass(frozen=True)
class WorkerSpec:
    """Everything a worker process needs, handed over once when it starts."""

    config: EngineConfig
    model_folder: str
    device: str  # "cpu" or "cuda:{index}"
    dtype: torch.dtype
    rank: int
    world_size: int
    master_addr: str
    master_port: int
    timeout_s: float = DEFAULT_TIMEOUT_S
    num_threads: int = 1  # intra-op threads on the CPU
    debug: DebugOptions = field(default_factory=DebugOptions)

    def to_json(self) -> str:
        """The spec as JSON (plain values only: no pickle crosses the process boundary)."""
        fields = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        fields["config"] = {f.name: _json_value(getattr(self.config, f.name))
                            for f in dataclasses.fields(self.config)}
        fields["dtype"] = _json_value(self.dtype)
        fields["debug"] = dataclasses.asdict(self.debug)
        return json.dumps(fields)

    @classmethod
    def from_json(cls, text: str) -> WorkerSpec:
        fields = json.loads(text)
        fields["config"] = EngineConfig(**fields["config"])
        fields["dtype"] = getattr(torch, fields["dtype"])
        fields["debug"] = DebugOptions(**fields["debug"])
        return cls(**fields)


def _json_value(value: Any) -> Any:
    """torch dtypes as their names ("bfloat16"); everything else in a spec is already plain."""
    return str(value).removeprefix("torch.") if isinstance(value, torch.dtype) else value


# --------------------------------------------------------------------------- groups


def connect_store(addr: str, port: int, world_size: int, rank: int, timeout_s: float) -> dist.TCPStore:
    """Rank 0 hosts the store (``port=0`` picks a free port: read it back from ``store.port``)."""
    return dist.TCPStore(addr, port, world_size, rank == 0, timeout=datetime.timedelta(seconds=timeout_s),
                         wait_for_workers=False)


@dataclass
class RankGroups:
    """This rank's process groups: ``control`` (gloo, CPU) for host-side checks (the debug token check);
    ``model`` (gloo on the CPU, NCCL on GPUs) carries the model's all-reduce / all-gather through ``tp``."""

    store: Any
    control: Any
    model: Any
    tp: TPGroup
    uses_nccl: bool
    aborted: bool = False

    def close(self) -> None:
        """Release the groups. NCCL communicators are aborted, which is local to this rank (a graceful
        ``ncclCommFinalize`` could wait for peers that already exited); gloo needs nothing."""
        self.abort_model()
        self.control = self.model = self.store = None
        self.tp = TPGroup()

    def abort_model(self) -> None:
        """Make pending NCCL work on this rank fail instead of waiting for a dead peer (any thread)."""
        if not self.uses_nccl or self.model is None or self.aborted:
            return
        self.aborted = True
        for name in ("abort", "_abort"):
            fn = getattr(self.model, name, None)
            if fn is not None:
                try:
                    fn()
                    return
                except Exception:  # best effort: the process is giving the group up anyway
                    continue


def init_rank_groups(store: Any, rank: int, world_size: int, device: torch.device, timeout_s: float) -> RankGroups:
    """Build the control and model groups; every rank calls this in the same order."""
    timeout = datetime.timedelta(seconds=timeout_s)
    control = dist.ProcessGroupGloo(dist.PrefixStore("allmos/control/", store), rank, world_size, timeout)
    model_store = dist.PrefixStore("allmos/model/", store)
    if device.type == "cuda":
        options = dist.ProcessGroupNCCL.Options()
        options.is_high_priority_stream = False
        options._timeout = timeout
        model = dist.ProcessGroupNCCL(model_store, rank, world_size, options)
    else:
        model = dist.ProcessGroupGloo(model_store, rank, world_size, timeout)
    return RankGroups(store, control, model, TPGroup(rank, world_size, model), device.type == "cuda")


# --------------------------------------------------------------------------- step channel


class StepChannel:
    """Typed messages from rank 0 to every rank, each through its own pipe: an 8-byte little-endian
    length, then the message bytes. The driver's write returns once the bytes are in the pipe (it never
    waits for a worker to be ready to receive, unlike a collective); pipes keep the order. Steps are
    encoded against what the receivers hold (``BatchEncoder`` / ``BatchDecoder``), so every encoded step
    must be sent, in order. A worker reading end-of-file knows the driver is gone."""

    def __init__(self, send_fds: list[int] | None = None, receive_fd: int | None = None) -> None:
        self.send_fds = list(send_fds or [])
        self.receive_fd = receive_fd
        self._encoder = BatchEncoder()
        self._decoder = BatchDecoder()

    def encode(self, message: Message) -> bytes:
        """The bytes of ``message``; a STEP advances the encoder, so send them next."""
        return encode_message(message, self._encoder)

    def send(self, message: Message) -> None:
        self.send_bytes(self.encode(message))

    def send_bytes(self, data: bytes) -> None:
        """Write one frame to every worker (raises BrokenPipeError if a worker is gone)."""
        frame = len(data).to_bytes(8, "little") + data
        for fd in self.send_fds:
            write_all(fd, frame)

    def receive(self) -> Message:
        """Wait (indefinitely: the driver may idle between requests) for the next message; a closed
        pipe (the driver exited) reads as SHUTDOWN."""
        header = read_exact(self.receive_fd, 8)
        payload = read_exact(self.receive_fd, int.from_bytes(header, "little")) if header else None
        if payload is None:
            return Message(MessageKind.SHUTDOWN)
        return decode_message(payload, self._decoder)


def make_step_pipe() -> tuple[int, int]:
    """(read fd, write fd) of a pipe with room for many steps (1 MiB where Linux allows), so the driver's
    writes do not wait while a worker is still launching the previous step."""
    read_fd, write_fd = os.pipe()
    try:
        import fcntl

        fcntl.fcntl(write_fd, getattr(fcntl, "F_SETPIPE_SZ", 1031), PIPE_BYTES)
    except (ImportError, OSError):
        pass  # the default size works, with less slack
    return read_fd, write_fd


def check_same_tokens(group: Any, world_size: int, token_ids: list[int]) -> None:
    """Debug check: every rank sampled exactly ``token_ids`` (all-gathered over ``group``)."""
    mine = torch.tensor(token_ids, dtype=torch.int64)  # [num_sampled]
    parts = [torch.empty_like(mine) for _ in range(world_size)]
    group.allgather([parts], [mine]).wait()
    for rank, part in enumerate(parts):
        if not torch.equal(part, parts[0]):
            raise RuntimeError(f"tensor-parallel ranks sampled different tokens: rank 0 {parts[0].tolist()}, "
                               f"rank {rank} {part.tolist()}")


def set_nccl_env() -> None:
    """NVLink multicast (NVLS / symmetric-memory multicast) stays off for every rank."""
    for key, value in NCCL_ENV.items():
        os.environ.setdefault(key, value)


# --------------------------------------------------------------------------- worker process


def worker_main(spec: WorkerSpec, error_conn: Any, step_fd: int) -> None:
    """Run ranks 1..N-1 of one engine. Never returns: exits 0 after SHUTDOWN, 1 after sending its
    formatted traceback through ``error_conn``, and at once when the driver process is gone."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the driver's to handle; it stops us
    _exit_when_orphaned(os.getppid())
    if os.environ.get("ALLMOS_TP_STACKS_AFTER_S"):  # debugging aid: dump every thread's stack if stuck
        import faulthandler

        faulthandler.dump_traceback_later(float(os.environ["ALLMOS_TP_STACKS_AFTER_S"]), repeat=False)
    code = 0
    try:
        _run_worker(spec, step_fd)
    except BaseException:
        code = 1
        try:
            error_conn.send_bytes(traceback.format_exc().encode())
        except Exception:
            pass
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)  # skip interpreter teardown: nothing left to clean, and NCCL teardown could block


def main(argv: list[str] | None = None) -> None:
    """``python -m allmos.engine.worker ERROR_FD STEP_FD``: the worker process's own entry point.

    The driver starts workers as fresh interpreters running this module (never re-importing the user's
    main script, so any script works: no ``__main__`` guard needed, standard input scripts too). The
    ``WorkerSpec`` arrives as JSON on standard input; steps arrive through the inherited pipe ``STEP_FD``
    (``StepChannel``); a failure's traceback goes back through the inherited pipe ``ERROR_FD``
    (length-prefixed bytes)."""
    from multiprocessing.connection import Connection

    args = sys.argv[1:] if argv is None else argv
    error_conn = Connection(int(args[0]), readable=False)
    spec = WorkerSpec.from_json(sys.stdin.readline())
    worker_main(spec, error_conn, int(args[1]))


def _exit_when_orphaned(parent_pid: int) -> None:
    def watch() -> None:
        while os.getppid() == parent_pid:
            time.sleep(PARENT_POLL_S)
        os._exit(0)

    threading.Thread(target=watch, name="allmos-parent-watch", daemon=True).start()


def _run_worker(spec: WorkerSpec, step_fd: int) -> None:
    from allmos.engine.model_runner import LocalModelRunner
    from allmos.models.resolve import load_model_source

    os.environ.update(RANK=str(spec.rank), LOCAL_RANK=str(spec.rank), WORLD_SIZE=str(spec.world_size),
                      MASTER_ADDR=spec.master_addr, MASTER_PORT=str(spec.master_port))
    device = torch.device(spec.device)
    if device.type == "cuda":
        set_nccl_env()
        torch.cuda.set_device(device)
    else:
        torch.set_num_threads(spec.num_threads)
    store = connect_store(spec.master_addr, spec.master_port, spec.world_size, spec.rank, spec.timeout_s)
    store.set(JOINED_KEY.format(rank=spec.rank), "1")
    groups = init_rank_groups(store, spec.rank, spec.world_size, device, spec.timeout_s)
    if spec.debug.fail_rank == spec.rank and spec.debug.fail_at_step == 0:
        raise RuntimeError(f"injected failure on rank {spec.rank} at start-up (ALLMOS_TP_FAIL_AT)")
    source = load_model_source(spec.model_folder)
    runner = LocalModelRunner(spec.config, source.model_config, Path(spec.model_folder), device, spec.dtype, groups.tp)
    freeze_startup_heap()  # a full collection in one rank stalls every rank's collectives
    serve(runner, StepChannel(receive_fd=step_fd), groups, spec)
    if device.type == "cuda":
        torch.cuda.synchronize(device)  # our collectives are done, so the driver's can finish too


def serve(runner: Any, channel: StepChannel, groups: RankGroups, spec: WorkerSpec) -> None:
    """Receive a message, run it, repeat; returns on SHUTDOWN."""
    step = 0
    while True:
        message = channel.receive()
        if message.kind is MessageKind.SHUTDOWN:
            return
        step += not is_warmup_batch(message.batch)
        if spec.debug.fail_rank == spec.rank and spec.debug.fail_at_step == step:
            raise RuntimeError(f"injected failure on rank {spec.rank} at step {step} (ALLMOS_TP_FAIL_AT)")
        pending = runner.execute(message.batch)
        if spec.debug.verify_tokens and message.batch.sampled_seqs:
            check_same_tokens(groups.control, spec.world_size, pending.result().token_ids)


if __name__ == "__main__":
    main()
