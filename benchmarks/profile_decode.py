"""Steady-state decode step on the GPU: wall time per engine step at a fixed batch, and (with --kernels)
the CUDA kernels of eager decode steps. Usage: python benchmarks/profile_decode.py [--batch 256] [--ctx 512]
"""

from __future__ import annotations

import argparse
import random
import time

import torch

from allmos import LLM, SamplingParams
from allmos.benchmark import DEFAULT_BENCH_MODEL


def decode_ms(llm: LLM, batch: int, ctx: int, steps: int) -> float:
    engine = llm.engine
    rng = random.Random(0)
    for _ in range(batch):
        engine.add_request(None, [rng.randrange(10000) for _ in range(ctx)],
                           SamplingParams(temperature=0.6, ignore_eos=True, max_tokens=steps + 40))
    while engine.get_stats().num_prefilling:
        engine.step()
    for _ in range(5):
        engine.step()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        engine.step()
    torch.cuda.synchronize()
    ms = 1000 * (time.perf_counter() - start) / steps
    while engine.has_unfinished():
        engine.step()
    return ms


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, nargs="+", default=[256, 64, 1])
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--eager", action="store_true")
    ap.add_argument("--kernels", action="store_true")
    a = ap.parse_args()
    llm = LLM(str(DEFAULT_BENCH_MODEL), load_format="dummy", max_model_len=4096, enforce_eager=a.eager)
    name = torch.cuda.get_device_name()
    kv_bytes = 28 * 2 * 8 * 128 * 2
    for b in a.batch:
        ms = decode_ms(llm, b, a.ctx, a.steps)
        ideal = (1.19e9 + b * (a.ctx + 20) * kv_bytes) / 3.0e12 * 1000
        print(f"{name} eager={a.eager} batch={b} ctx~{a.ctx}: {ms:.3f} ms/step ({b / ms * 1000:.0f} tok/s); "
              f"bytes at 3 TB/s would take {ideal:.3f} ms", flush=True)
    if a.kernels:
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            decode_ms(llm, a.batch[0], a.ctx, 5)
        print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=25, max_name_column_width=70))


if __name__ == "__main__":
    main()
