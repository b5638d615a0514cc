"""Where a steady decode step's time goes under tensor parallelism, at tp=1 and tp=2 (each in a fresh
process), on the benchmark model with random weights and CUDA graphs:

- wall ms per ``engine.step()`` and, inside it on the driver (rank 0): the runner's ``execute`` (for tp > 1
  the step channel's encode and send, then the driver's own launch), the wait for the device at read-back,
  and the rest (scheduling, read-back bookkeeping, outputs);
- from torch.profiler on the driver's GPU: kernel time per step, of which NCCL (all-reduce / gather)
  kernels, and kernels per step. An NCCL kernel runs until every rank has joined, so its time includes
  the wait for the slower rank; the shortest NCCL kernel of the window approximates the transfer alone.

Usage: python benchmarks/bench_tp_step.py [--tp 1 2] [--batches 1 64 256] [--steps 60]
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

PROMPT_LEN = 512


class Clock:
    """Accumulates seconds per name between ``take()`` calls."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)

    def wrap(self, name: str, fn):
        def timed(*args, **kwargs):
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.seconds[name] += time.perf_counter() - start
        return timed

    def take(self) -> dict[str, float]:
        out, self.seconds = dict(self.seconds), defaultdict(float)
        return out


def instrument(engine, clock: Clock) -> None:
    """Time the runner's parts on the driver (instance attributes and one class method, this process only)."""
    from allmos.engine import model_runner

    runner = engine.runner
    runner.execute = clock.wrap("execute", runner.execute)
    if hasattr(runner, "_dist"):
        channel = runner._dist.channel
        channel.encode = clock.wrap("encode", channel.encode)
        channel.send_bytes = clock.wrap("send", channel.send_bytes)
        runner.local.execute = clock.wrap("local_execute", runner.local.execute)
    model_runner.PendingStep.result = clock.wrap("wait_result", model_runner.PendingStep.result)


def sync() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def gpu_profile(engine, steps: int) -> dict:
    import torch
    from torch.profiler import ProfilerActivity, profile

    if not torch.cuda.is_available():
        return {}

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            engine.step()
        sync()
    kernels = [e for e in prof.events() if e.device_type.name == "CUDA"]
    nccl = [e.device_time for e in kernels if "nccl" in e.name.lower()]
    return {"gpu_ms": sum(e.device_time for e in kernels) / steps / 1e3,
            "nccl_ms": sum(nccl) / steps / 1e3, "kernels": len(kernels) / steps,
            "nccl_per_step": len(nccl) / steps, "nccl_min_us": min(nccl) if nccl else 0.0,
            "nccl_median_us": statistics.median(nccl) if nccl else 0.0}


def fill(engine, batch: int, steps: int, vocab: int) -> list[str]:
    """Admit ``batch`` requests and step until all of them decode; returns their ids."""
    from allmos import SamplingParams

    rng = random.Random(batch)
    params = SamplingParams(temperature=0.6, ignore_eos=True, max_tokens=3 * steps + 80)
    ids = [f"b{batch}-{i}-{rng.random()}" for i in range(batch)]
    for request_id in ids:
        engine.add_request(request_id, [rng.randrange(vocab) for _ in range(PROMPT_LEN)], params)
    while engine.get_stats().num_prefilling or engine.get_stats().num_waiting:
        engine.step()
    for _ in range(10):
        engine.step()
    sync()
    return ids


def drain(engine, ids: list[str]) -> None:
    engine.abort_request(ids)
    while engine.has_unfinished():
        engine.step()


def measure_batch(engine, clock: Clock, batch: int, steps: int, vocab: int) -> dict:
    """Wall and host parts per step (no profiler: once CUPTI has run, launches cost more for the rest of
    the process, so every wall figure is taken before the first profile)."""
    ids = fill(engine, batch, steps, vocab)
    clock.take()
    start = time.perf_counter()
    for _ in range(steps):
        engine.step()
    sync()
    wall = (time.perf_counter() - start) / steps
    parts = {name: seconds / steps * 1e3 for name, seconds in clock.take().items()}
    drain(engine, ids)
    other = wall * 1e3 - parts.get("execute", 0.0) - parts.get("wait_result", 0.0)
    return {"batch": batch, "wall_ms": wall * 1e3, "tok_s": batch / wall, **parts, "other": other}


def profile_batch(engine, batch: int, steps: int, vocab: int) -> dict:
    ids = fill(engine, batch, steps, vocab)
    row = gpu_profile(engine, steps)
    drain(engine, ids)
    return row


def run_child(tp: int, args: argparse.Namespace) -> list[dict]:
    from allmos import LLM
    from allmos.benchmark import DEFAULT_BENCH_MODEL

    extra = {} if args.device is None else {"device": args.device}
    llm = LLM(args.model or str(DEFAULT_BENCH_MODEL), load_format="dummy", tensor_parallel_size=tp,
              max_model_len=2048, **extra)
    engine = llm.llm_engine
    clock = Clock()
    instrument(engine, clock)
    vocab = engine.info.vocab_size
    vocab = min(vocab, 10000)
    rows = [{"tp": tp, **measure_batch(engine, clock, b, args.steps, vocab)} for b in args.batches]
    for row in rows:
        row.update(profile_batch(engine, row["batch"], args.steps, vocab))
    llm.shutdown()
    return rows


def print_table(rows: list[dict]) -> None:
    cols = ["tp", "batch", "wall_ms", "tok_s", "execute", "encode", "send", "local_execute", "wait_result",
            "other", "gpu_ms", "nccl_ms", "kernels", "nccl_per_step", "nccl_min_us", "nccl_median_us"]
    print("| " + " | ".join(cols) + " |")
    print("|" + "---|" * len(cols))
    for row in rows:
        cells = [f"{row.get(c, 0):.3f}" if isinstance(row.get(c, 0), float) else str(row.get(c, "")) for c in cols]
        print("| " + " | ".join(cells) + " |")
    print("ms per step; execute = the runner's execute on the driver (encode + send + local_execute for tp > 1); "
          "wait_result = the host waiting for the device at read-back; other = the rest of the step on the host")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tp", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 64, 256])
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--model", default=None, help="a model folder (default: the benchmark model, random weights)")
    ap.add_argument("--device", default=None)
    ap.add_argument("--child", type=int, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child is not None:
        print("RESULT " + json.dumps(run_child(args.child, args)), flush=True)
        return
    rows = []
    for tp in args.tp:
        cmd = [sys.executable, __file__, "--child", str(tp), "--steps", str(args.steps),
               "--batches", *map(str, args.batches), *(["--model", args.model] if args.model else []),
               *(["--device", args.device] if args.device else [])]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
        if proc.returncode or not lines:
            print(f"tp={tp} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
            continue
        rows += json.loads(lines[-1][len("RESULT "):])
    print_table(rows)


if __name__ == "__main__":
    main()
