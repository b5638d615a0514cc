"""The standard throughput workload (shared bench/WORKLOAD.md), its bandwidth ceiling, and a runner.

``bench.py`` and ``allmos bench`` both call ``run_throughput``; with the defaults the prompts, output
lengths and calls are those of nano-vLLM's ``bench.py`` so the numbers compare.
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from allmos.models.model_config import ModelConfig

DEFAULT_BENCH_MODEL = Path(__file__).resolve().parent.parent / "benchmarks" / "qwen3-0.6b"


@dataclass(frozen=True)
class Workload:
    prompts: list[list[int]]
    max_tokens: list[int]


def standard_workload(num_seqs: int = 256, min_input: int = 100, max_input: int = 1024, min_output: int = 100,
                      max_output: int = 1024, seed: int = 0) -> Workload:
    """Same RNG calls in the same order as the reference workload (prompts first, then lengths)."""
    rng = random.Random(seed)
    prompts = [[rng.randint(0, 10000) for _ in range(rng.randint(min_input, max_input))] for _ in range(num_seqs)]
    max_tokens = [rng.randint(min_output, max_output) for _ in range(num_seqs)]
    return Workload(prompts, max_tokens)


def ceiling_tokens_per_s(config: ModelConfig, workload: Workload, bandwidth_tb_s: float, tflops: float = 790.0,
                         kv_dtype=None, weight_bytes_per_param: float = 2.0) -> float:
    """Output tok/s if every decode step moved only the bytes it must (weights once, each sequence's KV
    once, in ``kv_dtype``, default bfloat16) at ``bandwidth_tb_s`` and prefill ran at ``tflops``."""
    import torch

    from allmos.engine.kv_cache import KVCacheSpec

    layers, hidden, inter = config.num_hidden_layers, config.hidden_size, config.intermediate_size
    heads, kv_heads, head_dim = config.num_attention_heads, config.num_key_value_heads, config.head_dim
    vocab = config.vocab_size
    attn_params = hidden * (heads + 2 * kv_heads) * head_dim + heads * head_dim * hidden
    layer_params = layers * (attn_params + 3 * hidden * inter)
    weights = weight_bytes_per_param * (layer_params + vocab * hidden)
    kv_per_token = KVCacheSpec.for_model(config, 1, kv_dtype or torch.bfloat16).bytes_per_token
    lens, outs = [len(p) for p in workload.prompts], workload.max_tokens
    kv_reads = sum(n * (m - 1) + m * (m - 1) // 2 for n, m in zip(lens, outs))  # sum_{j=1}^{m-1} (n + j)
    decode_s = ((max(outs) - 1) * weights + kv_reads * kv_per_token) / (bandwidth_tb_s * 1e12)
    attn_flops = sum(2 * layers * heads * head_dim * L * L for L in lens)
    prefill_s = (2 * layer_params * sum(lens) + attn_flops + 2 * vocab * hidden * len(lens)) / (tflops * 1e12)
    return sum(outs) / (decode_s + prefill_s)


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
class BenchResult:
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
    llm.generate(workload.prompts, params, use_tqdm=False)
    seconds = time.perf_counter() - start
    return BenchResult(seconds, sum(workload.max_tokens), sum(len(p) for p in workload.prompts))


def bench_model_config(model: str | None) -> ModelConfig:
    """The ModelConfig of ``model`` (a local folder; default: the benchmark model)."""
    from allmos.models.model_config import load_model_config

    folder = Path(model or DEFAULT_BENCH_MODEL)
    if not (folder / "config.json").exists():
        raise FileNotFoundError(f"{folder / 'config.json'} does not exist")
    return load_model_config(folder)
