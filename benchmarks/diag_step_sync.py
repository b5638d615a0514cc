"""Diagnostic: what the host does during steady decode steps at one batch size (CUDA). Profiles a few
``engine.step()`` calls with CPU and CUDA activity and prints the host ops by self time, and the CUDA
runtime calls that can block the host (synchronize, memcpy), to find where a step waits for the device.
Usage: python benchmarks/diag_step_sync.py [--batch 256] [--steps 5]"""

from __future__ import annotations

import argparse
import random
import time

import torch
from torch.profiler import ProfilerActivity, profile

from allmos import LLM, SamplingParams
from allmos.benchmark import DEFAULT_BENCH_MODEL


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--steps", type=int, default=5)
    args = ap.parse_args()
    llm = LLM(str(DEFAULT_BENCH_MODEL), load_format="dummy", max_model_len=2048)
    engine = llm.llm_engine if hasattr(llm, "llm_engine") else llm.engine
    rng = random.Random(0)
    params = SamplingParams(temperature=0.6, ignore_eos=True, max_tokens=400)
    for i in range(args.batch):
        engine.add_request(f"r{i}", [rng.randrange(10000) for _ in range(512)], params)
    for _ in range(60):
        engine.step()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(20):
        engine.step()
    torch.cuda.synchronize()
    print(f"wall {(time.perf_counter() - start) / 20 * 1e3:.3f} ms/step at batch {args.batch}")
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(args.steps):
            engine.step()
        torch.cuda.synchronize()
    table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25, max_name_column_width=60)
    print(table)
    blocking = [e for e in prof.events() if any(k in e.name for k in ("Synchronize", "Memcpy", "cudaHostAlloc"))]
    for e in sorted(blocking, key=lambda e: -e.cpu_time_total)[:15]:
        print(f"{e.name[:60]:60s} {e.cpu_time_total / 1e3:8.3f} ms")


if __name__ == "__main__":
    main()
