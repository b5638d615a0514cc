"""Microbenchmark of allmos.engine.sampler: milliseconds per sampling step.

For each scenario it prints the host time of SamplingTensors.build, the device time
of Sampler.forward, the effective bandwidth (bytes of one read of the logits divided
by the step time) and the step time in units of one read of the logits (measured as
logits.amax(dim=-1)). Run: `PYTHONPATH=. python benchmarks/bench_sampler.py [--device cpu]`.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import torch

from allmos.engine.sampler import Sampler, SamplingRow, SamplingTensors


def _scenarios(batch: int, vocab: int) -> dict[str, list[SamplingRow]]:
    """Named batches of rows: each exercises one path of the sampler."""
    prompt = list(range(0, min(vocab, 512)))
    output = [(7 * i) % vocab for i in range(256)]

    def rows(**params) -> list[SamplingRow]:
        return [SamplingRow(**params, seed=1000 + i, position=600 + i) for i in range(batch)]

    return {
        "greedy": rows(temperature=0.0),
        "temperature": rows(temperature=0.8),
        "temp+top_k50": rows(temperature=0.8, top_k=50),
        "temp+top_k50+top_p0.9": rows(temperature=0.8, top_k=50, top_p=0.9),
        "temp+min_p0.05": rows(temperature=0.8, min_p=0.05),
        "temp+penalties": rows(temperature=0.8, presence_penalty=0.5, frequency_penalty=0.3,
                               repetition_penalty=1.1, prompt_token_ids=prompt, output_token_ids=output),
        "temp+logprobs5": rows(temperature=0.8, num_logprobs=5),
    }


def _time_ms(fn: Callable[[], object], device: torch.device, iters: int = 20, warmup: int = 3) -> float:
    """Mean milliseconds per call of `fn` on `device` (CUDA events on GPU, wall clock on CPU)."""
    for _ in range(warmup):
        fn()
    if device.type != "cuda":
        start = time.perf_counter()
        for _ in range(iters):
            fn()
        return (time.perf_counter() - start) * 1e3 / iters
    torch.cuda.synchronize(device)
    begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    begin.record()
    for _ in range(iters):
        fn()
    end.record()
    torch.cuda.synchronize(device)
    return begin.elapsed_time(end) / iters


def benchmark_sampler(batch: int = 256, vocab: int = 151936, device: str = "cuda",
                      dtype: torch.dtype = torch.float32, use_triton: bool | None = None) -> dict[str, float]:
    """Print and return ms per sampling step for each scenario (see module docstring)."""
    dev = torch.device(device)
    torch.manual_seed(0)
    logits = torch.randn(batch, vocab, device=dev, dtype=dtype) * 3  # [B, V]
    logit_bytes = logits.numel() * logits.element_size()
    one_read_ms = _time_ms(lambda: logits.amax(dim=-1), dev)
    sampler = Sampler(use_triton=use_triton)
    print(f"batch {batch}, vocab {vocab}, {dtype}, {dev}; one read of the logits "
          f"({logit_bytes / 1e6:.0f} MB): {one_read_ms:.3f} ms = {logit_bytes / one_read_ms / 1e6:.0f} GB/s")
    print(f"{'scenario':<24}{'build ms':>10}{'step ms':>10}{'GB/s':>10}{'reads':>8}")
    results = {}
    for name, rows in _scenarios(batch, vocab).items():
        build_ms = _time_ms(lambda rows=rows: SamplingTensors.build(rows, vocab, dev), dev, iters=5, warmup=1)
        tensors = SamplingTensors.build(rows, vocab, dev)
        step_ms = _time_ms(lambda tensors=tensors: sampler(logits, tensors), dev)
        results[name] = step_ms
        print(f"{name:<24}{build_ms:>10.3f}{step_ms:>10.3f}{logit_bytes / step_ms / 1e6:>10.0f}"
              f"{step_ms / one_read_ms:>8.1f}")
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--vocab", type=int, default=151936)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    parser.add_argument("--torch-only", action="store_true", help="use the torch reference draw, not Triton")
    args = parser.parse_args()
    benchmark_sampler(args.batch, args.vocab, args.device, getattr(torch, args.dtype),
                      use_triton=False if args.torch_only else None)


if __name__ == "__main__":
    main()
