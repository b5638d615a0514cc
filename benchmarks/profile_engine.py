"""Where the time goes on the standard workload: host phases per step and GPU kernels.

Wraps engine methods with wall-clock timers (from outside; the engine carries no instrumentation),
runs the workload once, then profiles a few decode steps at full batch with torch.profiler.
Usage: python benchmarks/profile_engine.py [--num-seqs 256] [--trace]
"""

from __future__ import annotations

import argparse
import collections
import functools
import time

import torch

from allmos import LLM, SamplingParams
from allmos.benchmark import DEFAULT_BENCH_MODEL, standard_workload

TIMES: collections.Counter = collections.Counter()
CALLS: collections.Counter = collections.Counter()


def timed(obj, name: str, label: str, sync: bool = False) -> None:
    fn = getattr(obj, name)

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        if sync:
            torch.cuda.synchronize()
        start = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            if sync:
                torch.cuda.synchronize()
            TIMES[label] += time.perf_counter() - start
            CALLS[label] += 1

    setattr(obj, name, wrapper)


class GpuIdle:
    """CUDA events around each ``runner.execute``: the GPU time between one step's last enqueued work and
    the next step's first is time the device sat idle waiting for the host. Each step's GPU time is also
    set against the bytes a decode step must move (weights once, each sequence's KV once) at the card's
    copy bandwidth, bucketed by batch size: where the device time goes beyond the physical minimum."""

    def __init__(self, runner) -> None:
        from allmos.benchmark import measure_copy_bandwidth

        self.marks: list[tuple[torch.cuda.Event, torch.cuda.Event, bool, int, int]] = []
        self.bandwidth = measure_copy_bandwidth() * 1e12  # bytes/s
        self.weight_bytes = sum(p.numel() * p.element_size() for p in runner.model.parameters())
        self.kv_per_token = runner.kv_spec.bytes_per_token
        fn = runner.execute

        @functools.wraps(fn)
        def wrapper(batch):
            begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            begin.record()
            out = fn(batch)
            end.record()
            is_decode = all(s.num_new_tokens == 1 for s in batch.seqs)
            self.marks.append((begin, end, is_decode, len(batch.seqs), sum(s.seq_len for s in batch.seqs)))
            return out

        runner.execute = wrapper

    def report(self) -> None:
        torch.cuda.synchronize()
        busy = [m[0].elapsed_time(m[1]) for m in self.marks]
        gaps = [a[1].elapsed_time(b[0]) for a, b in zip(self.marks, self.marks[1:], strict=False)]
        span = self.marks[0][0].elapsed_time(self.marks[-1][1])
        print(f"GPU span {span / 1000:.3f} s over {len(busy)} steps: within steps {sum(busy) / 1000:.3f} s, "
              f"idle between steps {sum(gaps) / 1000:.3f} s ({100 * sum(gaps) / span:.1f}%)")
        print("| steps | batch | count | GPU s | minimum s (bytes at copy BW) | efficiency |")
        print("| --- | --- | --- | --- | --- | --- |")
        buckets = [(1, 16), (17, 64), (65, 128), (129, 192), (193, 100000)]
        for kind in (True, False):
            for lo, hi in buckets:
                rows = [(t, m) for t, m in zip(busy, self.marks, strict=True) if m[2] is kind and lo <= m[3] <= hi]
                if not rows:
                    continue
                gpu = sum(t for t, _ in rows) / 1000
                ideal = sum(self.weight_bytes + m[4] * self.kv_per_token for _, m in rows) / self.bandwidth
                label = "decode" if kind else "with prefill"
                print(f"| {label} | {lo}-{hi} | {len(rows)} | {gpu:.3f} | {ideal:.3f} | {100 * ideal / gpu:.0f}% |")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--num-seqs", type=int, default=256)
    ap.add_argument("--sync", action="store_true", help="synchronize around each phase (GPU time per phase)")
    ap.add_argument("--extra", nargs="*", default=[], help="engine kwargs as key=value")
    ap.add_argument("--skip-kernels", action="store_true", help="no torch.profiler pass at the end")
    ap.add_argument("--gpu-idle", action="store_true", help="CUDA events: how long the GPU waits for the host")
    ap.add_argument("--cprofile", action="store_true", help="host profile of the whole run (cProfile)")
    a = ap.parse_args()
    kwargs = dict(kv.split("=") for kv in a.extra)
    kwargs = {k: (v == "True" if v in ("True", "False") else int(v) if v.isdigit() else v) for k, v in kwargs.items()}
    llm = LLM(str(DEFAULT_BENCH_MODEL), load_format="dummy", max_model_len=4096, **kwargs)
    llm.generate([[1, 2, 3]], SamplingParams(max_tokens=8), use_tqdm=False)
    engine, runner = llm.engine, llm.engine.runner
    timed(engine.scheduler, "schedule", "schedule")
    timed(engine.scheduler, "on_step_done", "on_step_done")
    timed(engine, "_read_back", "read_back")
    timed(runner, "_prepare", "prepare_inputs", a.sync)
    timed(runner.model, "compute_logits", "lm_head", a.sync)
    timed(runner.sampler, "forward", "sampler", a.sync)
    if runner.graphs is not None:
        timed(runner.graphs, "run", "graph_replay", a.sync)
    timed(runner, "execute", "execute(total)")
    idle = GpuIdle(runner) if a.gpu_idle else None
    w = standard_workload(num_seqs=a.num_seqs)
    params = [SamplingParams(temperature=0.6, ignore_eos=True, max_tokens=m) for m in w.max_tokens]
    start = time.perf_counter()
    if a.cprofile:
        import cProfile
        import pstats

        profiler = cProfile.Profile()
        profiler.enable()
    llm.generate(w.prompts, params, use_tqdm=False)
    total = time.perf_counter() - start
    if a.cprofile:
        profiler.disable()
        pstats.Stats(profiler).sort_stats("tottime").print_stats(30)
    steps = CALLS["schedule"]
    print(f"{torch.cuda.get_device_name()}: {sum(w.max_tokens) / total:.0f} tok/s, {total:.2f} s, {steps} steps")
    if idle is not None:
        idle.report()
        runner.execute = runner.execute.__wrapped__
    print("| phase | total s | ms/step |")
    print("| --- | --- | --- |")
    for label, secs in TIMES.most_common():
        print(f"| {label} | {secs:.3f} | {1000 * secs / max(steps, 1):.3f} |")

    if a.skip_kernels:
        return
    # kernel-level profile of a few full-batch decode steps
    from torch.profiler import ProfilerActivity, profile

    short = SamplingParams(temperature=0.6, ignore_eos=True, max_tokens=6)
    prompts = [p[:512] for p in w.prompts[: a.num_seqs]]
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        llm.generate(prompts, short, use_tqdm=False)
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=20, max_name_column_width=60))


if __name__ == "__main__":
    main()
