"""Where the host's time goes in one decode step, on the machine that runs it (GPU host or CPU).

Steady decode of ``--batch`` sequences (random Qwen3-0.6B weights on a GPU, CUDA graphs on; a tiny random
Qwen3 with ``--tiny``), ``LLMEngine.step`` timed as a whole and in parts with ``time.perf_counter`` wrappers:
scheduling, the runner's host work (host arrays, graph input copies, replay launch, sampler launch,
read-back copies), waiting for the device, the core's read-back and the output processor. The wait is the
time spent in ``torch.cuda.Event.synchronize``: when it is near zero the device waits for the host, and the
step's wall time is the host's time. A second pass runs the same steps under cProfile and prints the
functions with the most own time.

Usage (repo root): ``PYTHONPATH=$PWD python benchmarks/diag_host_phases.py --batch 1 8 [--steps 300]``
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import pstats
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

from bench_host_step import TINY_QWEN3, Timer  # this folder's host-step benchmark: its tiny model and timer


class Phases:
    """Accumulated seconds per named part (one ``bench_host_step.Timer`` each); ``patch(obj, attr, name)``
    wraps ``obj.attr``."""

    def __init__(self) -> None:
        self.timers: dict[str, Timer] = {}

    def patch(self, obj, attr: str, name: str) -> None:
        timer = self.timers.setdefault(name, Timer())
        setattr(obj, attr, timer.wrap(getattr(obj, attr)))

    def take(self) -> dict[str, float]:
        return {name: timer.take() for name, timer in self.timers.items()}


def build_engine(tiny: bool, max_num_seqs: int):
    from allmos import LLM
    from allmos.benchmark import DEFAULT_BENCH_MODEL

    if tiny:
        folder = Path(tempfile.mkdtemp(prefix="allmos-phases-"))
        (folder / "config.json").write_text(json.dumps(TINY_QWEN3))
        llm = LLM(str(folder), load_format="dummy", max_num_seqs=max_num_seqs, max_model_len=1024)
    else:
        llm = LLM(str(DEFAULT_BENCH_MODEL), load_format="dummy", max_model_len=4096, max_num_seqs=max_num_seqs)
    return llm, llm.engine


def instrument(engine) -> Phases:
    import torch

    from allmos.engine import model_runner

    phases = Phases()
    core, runner = engine.core, engine.core.runner
    runner = getattr(runner, "local", None) or runner
    phases.patch(engine, "step", "LLMEngine.step")
    phases.patch(core.scheduler, "schedule", "scheduler.schedule")
    phases.patch(core.scheduler, "on_step_done", "scheduler.on_step_done")
    phases.patch(core, "_reserve_samples", "core._reserve_samples")
    phases.patch(core, "_read_back", "core._read_back (incl. wait)")
    phases.patch(runner, "execute", "runner.execute")
    phases.patch(runner, "_host_step", "  runner._host_step")
    phases.patch(runner, "_sampling_tensors", "  runner._sampling_tensors")
    phases.patch(runner, "sampler", "  sampler (launch)")
    if runner.graphs is not None:
        phases.patch(runner.graphs, "load", "  graphs.load")
        phases.patch(runner.graphs, "replay", "  graphs.replay")
    phases.patch(model_runner.PendingStep, "__init__", "  PendingStep (read-back copies)")
    phases.patch(model_runner.PendingStep, "result", "PendingStep.result (incl. wait)")
    phases.patch(engine.output_processor, "process", "output_processor.process")
    if torch.cuda.is_available():
        phases.patch(torch.cuda.Event, "synchronize", "  wait for the device")
    return phases


def run_batch(engine, phases: Phases, batch: int, steps: int, ctx: int, top: int) -> None:
    from allmos import SamplingParams

    rng = random.Random(batch)
    params = SamplingParams(temperature=0.6, ignore_eos=True, max_tokens=4 * steps + 64)
    ids = [engine.add_request(f"p{batch}-{i}", [rng.randrange(400) for _ in range(ctx)], params)
           for i in range(batch)]
    while engine.get_stats().num_prefilling:
        engine.step()
    for _ in range(20):
        engine.step()
    phases.take()
    walls = []
    for _ in range(steps):
        start = time.perf_counter()
        engine.step()
        walls.append(time.perf_counter() - start)
    totals = phases.take()
    print(f"\n== batch {batch}: wall per step median {1e3 * statistics.median(walls):.3f} ms, "
          f"mean {1e3 * statistics.mean(walls):.3f} ms ({steps} steps)")
    for name, seconds in totals.items():
        print(f"  {1e3 * seconds / steps:8.3f} ms/step  {name}")
    profiler = cProfile.Profile()
    profiler.enable()
    for _ in range(steps):
        engine.step()
    profiler.disable()
    text = io.StringIO()
    pstats.Stats(profiler, stream=text).sort_stats("tottime").print_stats(top)
    print(f"-- cProfile, {steps} steps, by own time (profiling inflates Python-heavy code):")
    lines = text.getvalue().splitlines()
    first = next((i for i, line in enumerate(lines) if "ncalls" in line), 0)
    print("\n".join(line for line in lines[first:] if line.strip()))
    engine.abort_request(ids)
    while engine.has_unfinished():
        engine.step()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--top", type=int, default=30, help="cProfile rows")
    ap.add_argument("--tiny", action="store_true", help="a tiny random Qwen3 (CPU check of this script)")
    args = ap.parse_args()
    llm, engine = build_engine(args.tiny, max(args.batch))
    phases = instrument(engine)
    for batch in args.batch:
        run_batch(engine, phases, batch, args.steps, args.ctx, args.top)
    llm.shutdown()
    sys.stdout.flush()


if __name__ == "__main__":
    main()
