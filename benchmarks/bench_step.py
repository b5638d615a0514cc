"""GPU time per decode step (CUDA graphs on) at batch 1, 8, 64 and 256, context ~512, beside what reading
the weights and the KV cache once would take at the copy bandwidth measured in the same run.

For each batch: wall time per engine step, the device time of one replay of the step's CUDA graph (replays
back to back, CUDA events: the GPU's own step time with the gaps between kernels, no host; also with the
draw graph that samples inside graphs after each replay, where the tree has one), the summed kernel
time and kernels per step (torch.profiler, CUDA activity: every kernel inside the graph replays, plus the
sampler and copies; with programmatic dependent launch, kernels overlap and a kernel's time includes its wait
for the one before, so this sum overstates), the busiest kernels, and a
check of the step's logits against the same forward on the torch path (decode kernels switched off in the
same process: gemv tables cleared, separate q/k-norm+RoPE and K/V store).

``--compare-env VAR=VALUE`` runs the benchmark twice, each in a fresh process: once with the environment as
it is and once with ``VAR=VALUE`` (e.g. ``ALLMOS_DECODE_KERNELS=1``: the experimental decode kernels,
off by default), and prints both side by side with their ratio. Random Qwen3-0.6B weights
(``load_format="dummy"``), so no checkpoint is needed. Logs go to stderr; the table is printed last.

Usage (GPU machine, repo root):
    PYTHONPATH=$PWD python benchmarks/bench_step.py --compare-env ALLMOS_DECODE_KERNELS=1
    PYTHONPATH=$PWD python benchmarks/bench_step.py --batch 1 8 --kernels 20     # this process only
    PYTHONPATH=$PWD python benchmarks/bench_step.py --batch 1 8 --top-k 20 --top-p 0.95   # filtered sampling
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import random
import subprocess
import sys
import time
from collections import defaultdict
from dataclasses import asdict, dataclass, field

WARM_STEPS = 10
NON_KERNEL_PREFIXES = ("Memcpy", "Memset", "memcpy", "memset")


@dataclass
class BatchResult:
    batch: int
    ctx: float  # mean context length over the measured steps
    wall_ms: float  # per engine step (host + device, overlapped)
    replay_ms: float  # one replay of the step's CUDA graph, back to back on the device (no host in the loop)
    draw_ms: float  # the same with the step's draw graph after each replay (nan where the tree has none)
    gpu_ms: float  # device busy time per step (kernels + copies)
    kernels: float  # kernel launches per step (copies and memsets not counted)
    ideal_ms: float  # weights once + each sequence's KV once, at the measured copy bandwidth
    logits_rel_err: float  # max |new - torch path| / max |torch path| over the step's logits
    top: list[tuple[str, float, float]] = field(default_factory=list)  # (kernel, us/step, launches/step)


def add_requests(engine, batch: int, ctx: int, filters: dict | None = None) -> list[str]:
    """``batch`` requests of ``ctx`` random prompt tokens that outlive the measurement (they are aborted after
    it): every measured step decodes exactly ``batch`` sequences, also the last ones, which the logits check
    re-runs at that size. ``filters``: top_k / top_p for the sampling params. Returns the request ids."""
    from allmos import SamplingParams

    rng = random.Random(batch)
    params = SamplingParams(temperature=0.6, ignore_eos=True, max_tokens=2048, **(filters or {}))
    return [engine.add_request(f"b{batch}-{i}", [rng.randrange(10000) for _ in range(ctx)], params)
            for i in range(batch)]


def finish_prefill(engine) -> None:
    while engine.get_stats().num_prefilling:
        engine.step()


def kernel_profile(engine, steps: int):
    """(GPU ms per step, kernels per step, [(name, us/step, launches/step)] busiest first)."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            engine.step()
        torch.cuda.synchronize()
    per_name: dict[str, list[float]] = defaultdict(lambda: [0, 0.0])
    busy_us, kernels = 0.0, 0
    for e in prof.events():
        if e.device_type.name != "CUDA":
            continue
        busy_us += e.device_time
        if not e.name.startswith(NON_KERNEL_PREFIXES):
            kernels += 1
        entry = per_name[e.name[:100]]
        entry[0] += 1
        entry[1] += e.device_time
    top = sorted(((name, us / steps, n / steps) for name, (n, us) in per_name.items()), key=lambda t: -t[1])
    return busy_us / steps / 1e3, kernels / steps, top


def logits_vs_torch_path(engine, batch: int) -> float:
    """Re-run the last decode step's graph size eagerly with and without the decode kernels; relative error."""
    import torch

    graphs, model = engine.runner.graphs, engine.runner.model
    if graphs is None or batch > graphs.max_batch_size or not hasattr(model, "gemv_sites"):
        return float("nan")
    bs = next(s for s in graphs.sizes if s >= batch)
    sites = model.gemv_sites()
    saved = {role: modules[0].gemv_table for role, (_, modules) in sites.items()}
    fused_store = model.model.layers[0].self_attn.fuse_kv_store
    with torch.inference_mode():
        new = graphs._forward(bs)[:batch].float()
        model.use_decode_kernels({role: None for role in sites}, fuse_kv_store=False)
        try:
            ref = graphs._forward(bs)[:batch].float()
        finally:
            model.use_decode_kernels(saved, fuse_kv_store=fused_store)
    return ((new - ref).abs().max() / ref.abs().max().clamp_min(1e-30)).item()


def graph_replay_ms(engine, batch: int, reps: int = 200, draw: bool = False, filtered: bool = False) -> float:
    """Device time of one replay of the decode graph that holds ``batch`` rows (inputs as the last step
    loaded them), from CUDA events around ``reps`` back-to-back replays: the GPU's own time per step,
    gaps between kernels included, with no host in the loop (PDL overlap shows here, not in kernel sums).
    ``draw``: each replay followed by the size's draw graph (the sampling inside graphs; ``filtered``: the
    one with top-k / top-p, where the tree has it); nan without one."""
    import torch

    graphs = engine.runner.graphs
    key = graphs.size_for(batch), False
    draws = getattr(graphs, "draw_graphs", {})
    draw_graph = draws.get((*key, filtered), draws.get(key))  # (size, cascade, filtered); older trees: no filtered
    if draw and draw_graph is None:
        return float("nan")
    replays = [graphs.graphs[key]] + ([draw_graph] if draw else [])
    for _ in range(10):
        for graph in replays:
            graph.replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        for graph in replays:
            graph.replay()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / reps


def weight_bytes(model) -> int:
    seen, total = set(), 0
    for p in model.parameters():
        if p.data_ptr() not in seen:
            seen.add(p.data_ptr())
            total += p.numel() * p.element_size()
    return total


def measure(args: argparse.Namespace) -> dict:
    import torch

    from allmos import LLM
    from allmos.benchmark import DEFAULT_BENCH_MODEL, measure_copy_bandwidth

    llm = LLM(str(DEFAULT_BENCH_MODEL), load_format="dummy", max_model_len=4096)
    engine = llm.engine
    cfg = engine.runner.model.config
    kv_per_token = (2 * cfg.num_hidden_layers * cfg.num_key_value_heads * cfg.head_dim
                    * engine.runner.dtype.itemsize)
    weights = weight_bytes(engine.runner.model)
    bandwidth = measure_copy_bandwidth() * 1e12
    results = []
    for batch in args.batch:
        filters = {k: v for k, v in (("top_k", args.top_k), ("top_p", args.top_p)) if v is not None}
        request_ids = add_requests(engine, batch, args.ctx, filters)
        finish_prefill(engine)
        for _ in range(WARM_STEPS):
            engine.step()
        torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(args.steps):
            engine.step()
        torch.cuda.synchronize()
        wall_ms = 1e3 * (time.perf_counter() - start) / args.steps
        replay_ms = graph_replay_ms(engine, batch)
        draw_ms = graph_replay_ms(engine, batch, draw=True, filtered=bool(filters))
        gpu_ms, kernels, top = kernel_profile(engine, args.profile_steps)
        rel_err = logits_vs_torch_path(engine, batch)
        ctx = args.ctx + WARM_STEPS + (args.steps + args.profile_steps) / 2
        ideal_ms = 1e3 * (weights + batch * ctx * kv_per_token) / bandwidth
        results.append(BatchResult(batch, ctx, wall_ms, replay_ms, draw_ms, gpu_ms, kernels, ideal_ms, rel_err,
                                   top[: args.kernels]))
        print(f"batch {batch}: wall {wall_ms:.3f} ms, graph replay {replay_ms:.3f} ms (with the draw graph "
              f"{draw_ms:.3f}), GPU {gpu_ms:.3f} ms, "
              f"{kernels:.0f} kernels/step, ideal {ideal_ms:.3f} ms, logits vs torch path {rel_err:.2e}",
              file=sys.stderr, flush=True)
        for name, us, n in top[: args.kernels]:
            print(f"    {us:8.1f} us/step {n:6.1f}/step  {name}", file=sys.stderr)
        engine.abort_request(request_ids)
        while engine.has_unfinished():
            engine.step()
    env = {k: v for k, v in os.environ.items() if k.startswith("ALLMOS_")}
    return {"device": torch.cuda.get_device_name(), "bandwidth_tb_s": bandwidth / 1e12, "weight_bytes": weights,
            "env": env, "results": [asdict(r) for r in results]}


def run_child(args: argparse.Namespace, extra_env: dict[str, str]) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--child", "--batch", *map(str, args.batch), "--ctx",
           str(args.ctx), "--steps", str(args.steps), "--profile-steps", str(args.profile_steps),
           "--kernels", str(args.kernels)]
    cmd += [*(["--top-k", str(args.top_k)] if args.top_k is not None else []),
            *(["--top-p", str(args.top_p)] if args.top_p is not None else [])]
    proc = subprocess.run(cmd, env={**os.environ, **extra_env}, stdout=subprocess.PIPE, text=True)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if not lines:
        raise SystemExit(f"child {extra_env or '(environment as is)'} failed with exit code {proc.returncode}")
    return json.loads(lines[-1][len("RESULT "):])


def print_single(run: dict) -> None:
    print(f"{run['device']}, copy bandwidth {run['bandwidth_tb_s']:.2f} TB/s, weights "
          f"{run['weight_bytes'] / 1e9:.2f} GB, env {run['env'] or '{}'}")
    print("| batch | wall ms/step | tok/s | graph replay ms | + draw graph | kernel ms/step | kernels/step | "
          "weights+KV once | kernels / ideal | logits err |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in run["results"]:
        print(f"| {r['batch']} | {r['wall_ms']:.3f} | {r['batch'] / r['wall_ms'] * 1e3:.0f} | {r['replay_ms']:.3f} | "
              f"{r.get('draw_ms', float('nan')):.3f} | {r['gpu_ms']:.3f} | "
              f"{r['kernels']:.0f} | {r['ideal_ms']:.3f} | {r['gpu_ms'] / r['ideal_ms']:.2f}x | "
              f"{r['logits_rel_err']:.1e} |")


def print_comparison(base: dict, other: dict, label: str) -> None:
    print(f"{base['device']}, copy bandwidth {base['bandwidth_tb_s']:.2f} TB/s; 'other' = {label}")
    print("| batch | graph replay ms | other | other / this | kernel ms/step | other | kernels/step | other | "
          "wall tok/s | other | ideal ms |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for a, b in zip(base["results"], other["results"]):
        print(f"| {a['batch']} | {a['replay_ms']:.3f} | {b['replay_ms']:.3f} | "
              f"{b['replay_ms'] / a['replay_ms']:.2f}x | "
              f"{a['gpu_ms']:.3f} | {b['gpu_ms']:.3f} | "
              f"{a['kernels']:.0f} | {b['kernels']:.0f} | {a['batch'] / a['wall_ms'] * 1e3:.0f} | "
              f"{b['batch'] / b['wall_ms'] * 1e3:.0f} | {a['ideal_ms']:.3f} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 8, 64, 256])
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--steps", type=int, default=60, help="timed steps per batch (wall time)")
    ap.add_argument("--profile-steps", type=int, default=20, help="profiled steps per batch (GPU time, kernels)")
    ap.add_argument("--kernels", type=int, default=14, help="busiest kernels listed per batch (stderr)")
    ap.add_argument("--compare-env", default=None, metavar="VAR=VALUE",
                    help="also run with VAR=VALUE (e.g. ALLMOS_DECODE_KERNELS=1) in a second process")
    ap.add_argument("--top-k", type=int, default=None, help="sampling top_k of every request (default: off)")
    ap.add_argument("--top-p", type=float, default=None, help="sampling top_p of every request (default: off)")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(name)s: %(message)s")
    if args.child:
        print("RESULT " + json.dumps(measure(args)), flush=True)
        return
    if args.compare_env is None:
        print_single(measure(args))
        return
    var, _, value = args.compare_env.partition("=")
    this = run_child(args, {})
    other = run_child(args, {var: value})
    print_single(this)
    print_single(other)
    print_comparison(this, other, f"{var}={value}")


if __name__ == "__main__":
    main()
