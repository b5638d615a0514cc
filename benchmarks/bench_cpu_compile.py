"""Decode tok/s of the CPU forward eager and compiled (compilation_config 2 and 3), interleaved in one process.

One engine on the default model; the compiled forwards of both levels are built on its model and swapped in
turn (``runner.compiled``), so every variant decodes the same prompts with the same weights, in alternating
rounds: machine noise (other load, frequency changes) falls on all of them alike. Reports, per batch size,
the median and best tok/s over the rounds and each variant's median relative to eager, plus each level's
compile time in this process (start-up time of a fresh engine: ``bench_cpu.py``'s load column).

Usage: python benchmarks/bench_cpu_compile.py [--batches 1 16] [--new 64] [--rounds 7] [--threads 2]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from bench_cpu import decode_tok_s  # this folder's CPU benchmark: the same prompts and decode timing


def build_variants(llm) -> tuple[dict, dict]:
    """({name: compiled forward or None}, {name: compile seconds})."""
    from allmos.engine.cpu_compile import compile_cpu_forward

    runner = llm.engine.runner
    variants, seconds = {"eager": None}, {}
    for name, level in (("whole (2)", 2), ("layer (3)", 3)):
        start = time.perf_counter()
        variants[name] = compile_cpu_forward(runner.model, runner.device, runner._scratch_decode, level)
        seconds[name] = time.perf_counter() - start
    return variants, seconds


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 16])
    ap.add_argument("--new", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    from allmos import LLM, SamplingParams

    torch.set_num_threads(a.threads)
    llm = LLM(None, max_model_len=1024, device="cpu")
    runner = llm.engine.runner
    variants, seconds = build_variants(llm)
    print("compile s in this process: " + ", ".join(f"{k} {v:.1f}" for k, v in seconds.items()), flush=True)

    def generate(prompts: list[list[int]], n: int) -> None:
        llm.generate(prompts, SamplingParams(temperature=0, max_tokens=n, ignore_eos=True), use_tqdm=False)

    for batch in a.batches:
        rates = {name: [] for name in variants}
        for r in range(a.rounds):
            names = list(variants) if r % 2 == 0 else list(variants)[::-1]
            for name in names:
                runner.compiled = variants[name]
                rates[name].append(decode_tok_s(generate, batch, a.new, repeats=1))  # after one warm-up call
        base = statistics.median(rates["eager"])
        for name, values in rates.items():
            med = statistics.median(values)
            print(f"batch {batch:2d} {name:10s} median {med:7.1f} best {max(values):7.1f} tok/s  "
                  f"{med / base:.3f}x eager", flush=True)
    warned = [name for name, v in variants.items() if v is not None and v._warned]
    print("fell back to eager:", warned or "never")


if __name__ == "__main__":
    main()
