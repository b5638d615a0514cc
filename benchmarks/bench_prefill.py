"""Prefill-heavy throughput: prompt tokens/s of long fresh prompts against the matrix rate of the same device.

For each prompt length, enough distinct random prompts to fill ``--tokens`` prompt tokens are generated with
``max_tokens=1`` (so the run is all prefill, one sampled token each), prefix caching off. The work is counted
as matrix FLOPs (``allmos.benchmark.prefill_flops``: the layers' projections, causal attention, one LM-head
row per prompt) and compared with the bf16 matrix rate measured in the same run (a large square GEMM on the
GPU; on the CPU a 1024-square GEMM in the model's dtype). Random Qwen3-0.6B weights by default.

Usage: ``PYTHONPATH=. python benchmarks/bench_prefill.py [MODEL] [--lens 2000 3000 4000 8000]
[--tokens 65536] [--max-num-batched-tokens N ...] [--profile]`` (each chunk size in its own engine, same run;
``--profile``: the GPU kernels of one more run of the longest prompts, by total time).
"""

from __future__ import annotations

import argparse
import gc
import random
import time

import torch

from allmos.benchmark import DEFAULT_BENCH_MODEL, bench_model_config, prefill_flops


def matrix_rate_tflops(device: str, dtype: torch.dtype) -> float:
    """Measured dense GEMM rate (2 * n^3 FLOPs per product), median of several, TFLOP/s."""
    n = 8192 if device == "cuda" else 1024
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    times = []
    for _ in range(12):
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        a @ b
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    times.sort()
    return 2 * n**3 / times[len(times) // 2] / 1e12


def prompts_of(length: int, count: int, seed: int, vocab: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(min(10, vocab - 1), min(10000, vocab)) for _ in range(length)] for _ in range(count)]


def time_prefill(llm, lens: list[int], tokens: int) -> list[tuple[int, int, float]]:
    """(prompt length, prompts, seconds) for each length: one ``generate`` of fresh prompts, 1 token each."""
    from allmos import SamplingParams

    params = SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True)
    vocab = llm.engine.runner.model.config.vocab_size
    rows = []
    for i, length in enumerate(lens):
        count = max(1, tokens // length)
        llm.generate(prompts_of(length, 1, 1000 + i, vocab), params, use_tqdm=False)  # warm this shape's kernels
        batch = prompts_of(length, count, i, vocab)
        if llm.engine.runner.device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        llm.generate(batch, params, use_tqdm=False)
        rows.append((length, count, time.perf_counter() - start))
    return rows


def profile_kernels(llm, length: int, tokens: int, top: int = 18) -> None:
    """The GPU kernels of prefilling ``tokens // length`` fresh prompts, by total time (torch.profiler)."""
    from allmos import SamplingParams
    from allmos.benchmark import op_table, profiled_generate

    params = SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True)
    batch = prompts_of(length, max(1, tokens // length), 99, llm.engine.runner.model.config.vocab_size)
    wall, ops = profiled_generate(llm, batch, params)
    kind = "GPU kernels" if llm.engine.runner.device.type == "cuda" else "CPU ops"
    print(f"\n{kind}, {len(batch)} prompts of {length}: {sum(t.ms for t in ops):.1f} ms in all, "
          f"wall {wall * 1e3:.1f} ms (profiled)")
    print("\n".join(op_table(ops, top)))


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model", nargs="?", default=None, help="model folder (default: the benchmark model, random)")
    ap.add_argument("--lens", type=int, nargs="+", default=[2000, 3000, 4000, 8000])
    ap.add_argument("--tokens", type=int, default=65536, help="prompt tokens per length")
    ap.add_argument("--max-num-batched-tokens", type=int, nargs="+", default=[None])
    ap.add_argument("--device", default=None)
    ap.add_argument("--profile", type=int, nargs="*", default=None, metavar="LEN",
                    help="kernel tables of these prompt lengths (none given: the longest), last engine")
    a = ap.parse_args(argv)
    from allmos import LLM

    path = str(a.model or DEFAULT_BENCH_MODEL)
    config = bench_model_config(a.model)
    rate = None
    print(f"model {path}; prompts of {a.lens} tokens, about {a.tokens} prompt tokens each, max_tokens=1")
    print("| max_num_batched_tokens | prompt len | prompts | time s | prompt tok/s | TFLOP/s | % of matrix rate |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for chunk in a.max_num_batched_tokens:
        kwargs = dict(max_model_len=max(a.lens) + 16, enable_prefix_caching=False)
        if a.model is None:
            kwargs["load_format"] = "dummy"
        if chunk is not None:
            kwargs["max_num_batched_tokens"] = chunk
        if a.device is not None:
            kwargs["device"] = a.device
        llm = LLM(path, **kwargs)
        device, dtype = llm.engine.runner.device.type, llm.engine.runner.dtype
        if rate is None:
            rate = matrix_rate_tflops(device, dtype)
        for length, count, seconds in time_prefill(llm, a.lens, a.tokens):
            tflops = prefill_flops(config, [length] * count) / seconds / 1e12
            print(f"| {chunk or 'default'} | {length} | {count} | {seconds:.3f} | {length * count / seconds:,.0f} | "
                  f"{tflops:.3g} | {100 * tflops / rate:.1f}% |", flush=True)
        if a.profile is not None and chunk == a.max_num_batched_tokens[-1]:
            for length in a.profile or [max(a.lens)]:
                profile_kernels(llm, length, a.tokens)
        llm.shutdown()
        del llm  # the next engine sizes its KV cache from the memory this one frees
        gc.collect()
        if device == "cuda":
            torch.cuda.empty_cache()
    print(f"matrix rate measured in this run: {rate:.1f} TFLOP/s ({dtype}, {device})")


if __name__ == "__main__":
    main()
