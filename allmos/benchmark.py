"""The standard throughput workload (benchmarks/README.md), its bandwidth ceiling, and a runner.

``bench.py``, ``allmos bench`` and ``python -m allmos.benchmark`` all call ``run_throughput``; with the
defaults the prompts, output lengths and calls follow the standard workload, so figures compare with
other engines measured on it. ``python -m allmos.benchmark --ceiling --bw 4.3`` prints the ceiling alone.
"""

from __future__ import annotations

import argparse
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from allmos.models.model_config import ModelConfig

DEFAULT_BENCH_MODEL = Path(__file__).resolve().parent.parent / "benchmarks" / "qwen3-0.6b"
MODEL_HELP = ("model folder, .gguf file or hub id (default: Qwen3-0.6B with random weights, built from "
              "benchmarks/qwen3-0.6b/config.json with load_format='dummy')")


@dataclass(frozen=True)
class Workload:
    """Token-id prompts and, for each, the exact number of tokens to generate (EOS ignored)."""

    prompts: list[list[int]]
    max_tokens: list[int]

    @property
    def num_prompt_tokens(self) -> int:
        return sum(len(p) for p in self.prompts)

    @property
    def num_output_tokens(self) -> int:
        return sum(self.max_tokens)

    @property
    def num_decode_steps(self) -> int:
        """Steps after the prefill that produced every first token: the longest output, less one."""
        return max(self.max_tokens) - 1


def standard_workload(num_seqs: int = 256, min_input: int = 100, max_input: int = 1024, min_output: int = 100,
                      max_output: int = 1024, seed: int = 0) -> Workload:
    """Same RNG calls in the same order as the reference workload (prompts first, then lengths)."""
    rng = random.Random(seed)
    prompts = [[rng.randint(0, 10000) for _ in range(rng.randint(min_input, max_input))] for _ in range(num_seqs)]
    max_tokens = [rng.randint(min_output, max_output) for _ in range(num_seqs)]
    return Workload(prompts, max_tokens)


@dataclass(frozen=True)
class Ceiling:
    """The least time the workload could take: decode moves only the bytes it must, prefill runs at the
    matrix rate, and nothing overlaps."""

    weight_bytes: float  # read once per decode step
    kv_bytes_read: float  # every decode step reads each running sequence's whole KV cache once
    decode_s: float
    prefill_s: float
    output_tokens: int

    @property
    def tokens_per_s(self) -> float:
        return self.output_tokens / (self.decode_s + self.prefill_s)


def ceiling(config: ModelConfig, workload: Workload, bandwidth_tb_s: float, tflops: float = 790.0,
            kv_bytes: float = 2.0, weight_bytes_per_param: float = 2.0) -> Ceiling:
    """The bandwidth ceiling of ``workload`` on a model of ``config``'s shapes.

    Decode: ``num_decode_steps`` steps, each reading the weights (layers plus one vocab x hidden matrix)
    once; a sequence with an n-token prompt reads n + j cached tokens at its j-th decode step, for j in
    1 .. m - 1 where m is its output length. Prefill: 2 FLOPs per parameter per prompt token, causal
    attention 2 * L^2 * head_dim per head and layer for an L-token prompt, and one LM-head row per
    sequence, at ``tflops``. Norms, rotary and sampling are left out.
    """
    layers, hidden, kv_heads, head_dim = (config.num_hidden_layers, config.hidden_size, config.num_key_value_heads,
                                          config.head_dim)
    weights = weight_bytes_per_param * (_layer_params(config) + config.vocab_size * hidden)
    kv_per_token = layers * 2 * kv_heads * head_dim * kv_bytes
    lens, outs = [len(p) for p in workload.prompts], workload.max_tokens
    kv_reads = sum(n * (m - 1) + m * (m - 1) // 2 for n, m in zip(lens, outs))  # sum_{j=1}^{m-1} (n + j)
    bandwidth = bandwidth_tb_s * 1e12  # bytes/s
    decode_s = (workload.num_decode_steps * weights + kv_reads * kv_per_token) / bandwidth
    prefill_s = prefill_flops(config, lens) / (tflops * 1e12)
    return Ceiling(weights, kv_reads * kv_per_token, decode_s, prefill_s, workload.num_output_tokens)


def _layer_params(config: ModelConfig) -> int:
    """Weights of the decoder layers' linear projections (q/k/v, o, gate/up, down), all layers."""
    hidden, heads, kv_heads, head_dim = (config.hidden_size, config.num_attention_heads, config.num_key_value_heads,
                                         config.head_dim)
    attn_params = hidden * (heads + 2 * kv_heads) * head_dim + heads * head_dim * hidden
    return config.num_hidden_layers * (attn_params + 3 * hidden * config.intermediate_size)


def prefill_flops(config: ModelConfig, prompt_lens: list[int]) -> float:
    """Matrix FLOPs of prefilling fresh prompts of these lengths: 2 per layer weight per token, causal
    attention 2 * L^2 * head_dim per query head and layer (QK^T and PV over the causal half), and one LM-head
    row per prompt. Norms, rotary and sampling are left out."""
    attn = sum(2 * config.num_hidden_layers * config.num_attention_heads * config.head_dim * n * n
               for n in prompt_lens)
    return 2 * _layer_params(config) * sum(prompt_lens) + attn + 2 * config.vocab_size * config.hidden_size * len(
        prompt_lens)


def ceiling_tokens_per_s(config: ModelConfig, workload: Workload, bandwidth_tb_s: float, tflops: float = 790.0,
                         kv_bytes: float = 2.0, weight_bytes_per_param: float = 2.0) -> float:
    """Output tok/s if every decode step moved only the bytes it must (weights once, each sequence's KV
    once) at ``bandwidth_tb_s`` and prefill ran at ``tflops`` (see ``ceiling``)."""
    return ceiling(config, workload, bandwidth_tb_s, tflops, kv_bytes, weight_bytes_per_param).tokens_per_s


def measure_copy_bandwidth(device: str = "cuda", nbytes: int = 1 << 30) -> float:
    """Device-to-device copy bandwidth in TB/s, counting bytes read plus written."""
    import torch

    src = torch.empty(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    torch.cuda.synchronize()
    start, reps = time.perf_counter(), 20
    for _ in range(reps):
        dst.copy_(src)
    torch.cuda.synchronize()
    return 2 * nbytes * reps / (time.perf_counter() - start) / 1e12


@dataclass
class OpTime:
    """One operator name's total in a profile: device time of a GPU kernel, or a CPU op's own time."""

    name: str
    ms: float
    count: int


def profiled_generate(llm, prompts, params) -> tuple[float, list[OpTime]]:
    """``llm.generate(prompts, params)`` under torch.profiler: (wall seconds, operators busiest first). On
    CUDA the GPU kernels by device time (the wall waits for the device), on the CPU the ops' own time."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    cuda = llm.engine.runner.device.type == "cuda"
    with profile(activities=[ProfilerActivity.CUDA if cuda else ProfilerActivity.CPU]) as prof:
        start = time.perf_counter()
        llm.generate(prompts, params, use_tqdm=False)
        if cuda:
            torch.cuda.synchronize()
        wall = time.perf_counter() - start
    times = [OpTime(e.key, (e.device_time_total if cuda else e.self_cpu_time_total) / 1e3, e.count)
             for e in prof.key_averages()]
    return wall, sorted((t for t in times if t.ms > 0), key=lambda t: -t.ms)


def op_table(ops: list[OpTime], top: int) -> list[str]:
    """The ``top`` busiest operators of ``profiled_generate``, a line each with its share of the total."""
    total = sum(t.ms for t in ops) or 1.0
    return [f"  {t.ms:8.2f} ms {100 * t.ms / total:5.1f}% {t.count:6d}x  {t.name[:90]}" for t in ops[:top]]


@dataclass
class BenchResult:
    """One timed ``generate``: its wall time and the tokens it actually produced and read."""

    seconds: float
    output_tokens: int
    prompt_tokens: int

    @property
    def tokens_per_s(self) -> float:
        return self.output_tokens / self.seconds


def run_throughput(model: str | None = None, workload: Workload | None = None, **engine_kwargs) -> BenchResult:
    """Build the engine, warm up once, then time one ``generate`` over the whole workload."""
    from allmos import LLM, SamplingParams

    workload = workload or standard_workload()
    path = str(model or DEFAULT_BENCH_MODEL)
    kwargs = dict(enforce_eager=False, max_model_len=4096)
    if model is None or (Path(path).is_dir() and not any(Path(path).glob("*.safetensors"))):
        kwargs["load_format"] = "dummy"
    kwargs.update(engine_kwargs)
    llm = LLM(path, **kwargs)
    warmup = "Benchmark: " if llm.tokenizer is not None else [[1, 2, 3, 4]]
    llm.generate(warmup, SamplingParams(), use_tqdm=False)
    params = [SamplingParams(temperature=0.6, ignore_eos=True, max_tokens=m) for m in workload.max_tokens]
    start = time.perf_counter()
    outputs = llm.generate(workload.prompts, params, use_tqdm=False)
    seconds = time.perf_counter() - start
    generated = sum(len(c.token_ids) for out in outputs for c in out.outputs)
    return BenchResult(seconds, generated, sum(len(out.prompt_token_ids) for out in outputs))


def bench_model_config(model: str | None) -> ModelConfig:
    """The ModelConfig of a model folder (the benchmark's Qwen3-0.6B shapes without ``model``)."""
    from allmos.models.model_config import load_model_config

    path = Path(model or DEFAULT_BENCH_MODEL)
    if not (path / "config.json").is_file():
        raise ValueError(f"the ceiling needs a model folder with config.json; {path / 'config.json'} does not exist")
    return load_model_config(path)


def build_parser(prog: str = "python -m allmos.benchmark") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=prog, description="Time the standard throughput workload (benchmarks/README.md), or with --ceiling "
                               "print its bandwidth ceiling without running anything.")
    p.add_argument("model", nargs="?", default=None, help=MODEL_HELP)
    p.add_argument("--ceiling", action="store_true",
                   help="print the ceiling for MODEL's shapes and exit (needs --bw without a GPU)")
    p.add_argument("--bw", type=float, default=None,
                   help="memory bandwidth in TB/s for the ceiling (default: the GPU's measured copy bandwidth)")
    p.add_argument("--tflops", type=float, default=790.0, help="matrix rate for the prefill, TFLOP/s (default: 790)")
    p.add_argument("--kv-bytes", type=float, default=None,
                   help="bytes per cached K or V element (default: 2, or 1 with --kv-cache-dtype fp8)")
    p.add_argument("--weight-bytes", type=float, default=2.0, help="bytes per weight (default: 2)")
    p.add_argument("--kv-cache-dtype", default="auto", choices=["auto", "fp8", "fp8_e4m3"],
                   help="KV cache format for the run (default: auto, the model dtype); fp8 also sets the "
                        "ceiling's --kv-bytes to 1 unless given")
    return p


def _bandwidth(given: float | None) -> float | None:
    """``given``, else the CUDA device's copy bandwidth, else None (no GPU)."""
    if given is not None:
        if given <= 0:
            raise ValueError(f"--bw must be > 0 TB/s, got {given}")
        return given
    import torch

    return measure_copy_bandwidth() if torch.cuda.is_available() else None


def describe_ceiling(c: Ceiling, bandwidth_tb_s: float, workload: Workload) -> str:
    return (f"ceiling {c.tokens_per_s:,.0f} tok/s at {bandwidth_tb_s:.2f} TB/s: {workload.num_decode_steps} decode "
            f"steps x {c.weight_bytes / 1e9:.3f} GB of weights + {c.kv_bytes_read / 1e12:.2f} TB of KV reads = "
            f"{c.decode_s:.2f} s, prefill {c.prefill_s:.2f} s; {c.output_tokens:,} output tokens")


def main(argv: list[str] | None = None, prog: str = "python -m allmos.benchmark") -> None:
    parser = build_parser(prog)
    a = parser.parse_args(argv)
    if a.kv_bytes is None:
        a.kv_bytes = 1.0 if a.kv_cache_dtype != "auto" else 2.0
    workload = standard_workload()
    try:
        if a.ceiling:
            config = bench_model_config(a.model)
            bw = _bandwidth(a.bw)
            if bw is None:
                raise ValueError("no GPU to measure: give the bandwidth with --bw TB/s")
            c = ceiling(config, workload, bw, a.tflops, a.kv_bytes, a.weight_bytes)
            print(describe_ceiling(c, bw, workload))
            return
        result = run_throughput(a.model, workload, kv_cache_dtype=a.kv_cache_dtype)
        print(f"Total: {result.output_tokens}tok, Time: {result.seconds:.2f}s, "
              f"Throughput: {result.tokens_per_s:.2f}tok/s")
        bw = _bandwidth(a.bw)
        if bw is not None:
            c = ceiling(bench_model_config(a.model), workload, bw, a.tflops, a.kv_bytes, a.weight_bytes)
            print(f"{describe_ceiling(c, bw, workload)}; this run at {result.tokens_per_s / c.tokens_per_s:.0%} of it")
    except ValueError as exc:
        parser.exit(2, f"{prog}: error: {exc}\n")


if __name__ == "__main__":
    main()
