"""Shared-prefix benchmark: many requests on one long prompt prefix, with cascade attention on and off.

Usage: python benchmarks/bench_shared_prefix.py [MODEL] [--num-requests 256] [--prefix-len 3000]
       [--suffix-len 16 64] [--output-len 128] [--cascade on off] [--tiny]

Workload (seeded, token ids drawn as ``randint(0, 10000)``): one ``prefix-len``-token prefix; each of
``num-requests`` requests is that prefix plus its own suffix of ``randint(*suffix-len)`` tokens and
generates exactly ``output-len`` tokens (``temperature=0.6, ignore_eos=True``). Before the timed run an
untimed request puts the prefix into the prefix cache (as a system prompt sits in a serving engine's
cache), so every request starts from the same cached blocks; the timed figure is output tokens per
second of one ``generate`` over all requests, as in ``bench.py``.

Without MODEL it uses the benchmark model (Qwen3-0.6B shapes with random weights,
benchmarks/qwen3-0.6b/config.json). Each mode runs in a fresh subprocess (its own GPU memory and CUDA
graphs) with ``enable_cascade_attention`` set accordingly; the table compares them. ``--tiny`` runs a tiny
random model on the CPU through the Triton interpreter (small sizes; it checks that the script and the
cascade path run, not speed). On a checkout of allmos that predates the option, ``--cascade off`` runs that
engine as it is, so the same script compares commits.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

TINY_CONFIG = {
    "architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3", "vocab_size": 10240, "hidden_size": 64,
    "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
    "head_dim": 32, "hidden_act": "silu", "max_position_embeddings": 4096, "rms_norm_eps": 1e-6,
    "tie_word_embeddings": True, "bos_token_id": 1, "eos_token_id": 2, "torch_dtype": "float32",
    "rope_theta": 1000000.0,
}
# 16 requests on 18 shared blocks of 16 tokens: 15 x 288 = 4,320 saved token reads, above MIN_SAVED_TOKENS
TINY_SIZES = {"num_requests": 16, "prefix_len": 300, "suffix_len": [2, 6], "output_len": 3, "max_model_len": 512}
TINY_ENGINE = {"device": "cpu", "attention_backend": "triton", "dtype": "float32", "kvcache_block_size": 16,
               "num_kvcache_blocks": 128}


def shared_prefix_workload(num_requests: int, prefix_len: int, suffix_len: tuple[int, int],
                           seed: int = 0, round_: int = 0) -> tuple[list[int], list[list[int]]]:
    """(prefix, prompts): every prompt is the prefix plus its own random suffix; ``round_`` > 0 draws other
    suffixes for the same prefix."""
    rng = random.Random(seed)
    prefix = [rng.randint(0, 10000) for _ in range(prefix_len)]
    suffix_rng = rng if round_ == 0 else random.Random(f"{seed}-{round_}")
    prompts = [prefix + [suffix_rng.randint(0, 10000) for _ in range(suffix_rng.randint(*suffix_len))]
               for _ in range(num_requests)]
    return prefix, prompts


def run_one(args: argparse.Namespace, cascade: bool) -> dict:
    """Build the engine, warm up, cache the prefix, then time one ``generate`` over every request."""
    from allmos import LLM, SamplingParams
    from allmos.benchmark import DEFAULT_BENCH_MODEL

    prefix, prompts = shared_prefix_workload(args.num_requests, args.prefix_len, tuple(args.suffix_len), args.seed)
    engine = dict(max_model_len=args.max_model_len, enable_cascade_attention=cascade)
    if not cascade and not _has_cascade_option():
        del engine["enable_cascade_attention"]  # an engine from before cascade attention
    model = args.model
    if args.tiny:
        model = _tiny_model_folder()
        engine.update(TINY_ENGINE)
    if model is None or not any(Path(model).glob("*.safetensors")):
        engine["load_format"] = "dummy"
    llm = LLM(str(model or DEFAULT_BENCH_MODEL), **engine)
    llm.generate([[1, 2, 3, 4]], SamplingParams(max_tokens=4), use_tqdm=False)
    llm.generate([prefix + [1]], SamplingParams(max_tokens=1), use_tqdm=False)  # the prefix into the cache
    params = SamplingParams(temperature=0.6, ignore_eos=True, max_tokens=args.output_len)
    for round_ in range(1, args.warm_rounds + 1):  # untimed rounds on other suffixes of the same prefix
        llm.generate(shared_prefix_workload(args.num_requests, args.prefix_len, tuple(args.suffix_len), args.seed,
                                            round_)[1], params, use_tqdm=False)
    with counting_cascade_steps() as steps:
        start = time.perf_counter()
        outputs = llm.generate(prompts, params, use_tqdm=False)
        seconds = time.perf_counter() - start
    generated = sum(len(c.token_ids) for out in outputs for c in out.outputs)
    result = {"cascade": cascade, "seconds": seconds, "output_tokens": generated, "tokens_per_s": generated / seconds,
              "decode_steps": steps["decode"], "cascade_steps": steps["cascade"]}
    if args.profile:
        prompts = shared_prefix_workload(args.num_requests, args.prefix_len, tuple(args.suffix_len), args.seed,
                                         args.warm_rounds + 1)[1]
        result["profile"] = profile_round(llm, prompts, args.profile)
    return result


def profile_round(llm, prompts: list[list[int]], output_len: int, top: int = 16) -> str:
    """Where one more round goes: host time adding the requests, wall time of the prefill and the decode
    steps (a step counts as prefill while any request is still prefilling), and the GPU kernels by total
    time (torch.profiler; the CPU's own ops without CUDA)."""
    from allmos import SamplingParams
    from allmos.benchmark import op_table, profiled_generate

    engine = llm.engine
    params = SamplingParams(temperature=0.6, ignore_eos=True, max_tokens=output_len)
    wall = {"add": 0.0, "prefill": 0.0, "decode": 0.0}
    count = {"prefill": 0, "decode": 0}
    add_request, step = engine.add_request, engine.step

    def timed_add(*a, **k):
        start = time.perf_counter()
        try:
            return add_request(*a, **k)
        finally:
            wall["add"] += time.perf_counter() - start

    def timed_step(*a, **k):
        kind = "prefill" if engine.get_stats().num_prefilling else "decode"
        start = time.perf_counter()
        try:
            return step(*a, **k)
        finally:
            wall[kind] += time.perf_counter() - start
            count[kind] += 1

    engine.add_request, engine.step = timed_add, timed_step
    try:
        total, ops = profiled_generate(llm, prompts, params)
    finally:
        engine.add_request, engine.step = add_request, step
    kind = "GPU kernels" if engine.runner.device.type == "cuda" else "CPU ops"
    lines = [f"profiled round, {len(prompts)} requests x {output_len} output tokens: wall {total * 1e3:.0f} ms; "
             f"adding requests {wall['add'] * 1e3:.0f} ms; {count['prefill']} prefill steps {wall['prefill'] * 1e3:.0f}"
             f" ms; {count['decode']} decode steps {wall['decode'] * 1e3:.0f} ms; "
             f"{kind} {sum(t.ms for t in ops):.0f} ms in all"]
    return "\n".join(lines + op_table(ops, top))


@contextlib.contextmanager
def counting_cascade_steps() -> Iterator[dict[str, int]]:
    """Count the decode steps the runner prepares, and those with cascade groups, inside the block (a
    diagnostic: it wraps ``_cascade_groups``, which every decode step calls, in
    ``allmos.engine.step_inputs`` or, in older trees, ``allmos.engine.model_runner``)."""
    try:
        from allmos.engine import step_inputs as model_runner
    except ImportError:  # a tree from before step_inputs
        from allmos.engine import model_runner

    counts = {"decode": 0, "cascade": 0}
    plan = getattr(model_runner, "_cascade_groups", None)
    if plan is None:  # an engine from before cascade attention
        yield counts
        return

    def counted(*args, **kwargs):
        groups = plan(*args, **kwargs)
        counts["decode"] += 1
        counts["cascade"] += groups is not None
        return groups

    model_runner._cascade_groups = counted
    try:
        yield counts
    finally:
        model_runner._cascade_groups = plan


def _has_cascade_option() -> bool:
    from allmos.config import EngineConfig

    return "enable_cascade_attention" in {f.name for f in dataclasses.fields(EngineConfig)}


def _tiny_model_folder() -> str:
    folder = Path(tempfile.mkdtemp(prefix="allmos-tiny-"))
    (folder / "config.json").write_text(json.dumps(TINY_CONFIG))
    return str(folder)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Shared-prefix workload with cascade attention on and off.")
    p.add_argument("model", nargs="?", default=None, help="model folder (default: the benchmark model)")
    p.add_argument("--num-requests", type=int, default=256)
    p.add_argument("--prefix-len", type=int, default=3000)
    p.add_argument("--suffix-len", type=int, nargs=2, default=[16, 64], metavar=("MIN", "MAX"))
    p.add_argument("--output-len", type=int, default=128)
    p.add_argument("--max-model-len", type=int, default=4096)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--warm-rounds", type=int, default=0,
                   help="untimed rounds of the whole workload (other suffixes) before the timed one")
    p.add_argument("--cascade", nargs="+", choices=["on", "off"], default=["on", "off"])
    p.add_argument("--tiny", action="store_true", help="a tiny random model on the CPU (Triton interpreter)")
    p.add_argument("--profile", type=int, default=0, metavar="OUTPUT_LEN",
                   help="after the timed run, profile one more round (other suffixes) of OUTPUT_LEN tokens each")
    p.add_argument("--child-timeout", type=float, default=None, help="seconds allowed for each mode's process")
    p.add_argument("--single", choices=["on", "off"], default=None, help=argparse.SUPPRESS)  # child: one mode
    return p


def _child_command(args: argparse.Namespace, mode: str) -> list[str]:
    cmd = [sys.executable, __file__, *([args.model] if args.model else []), "--single", mode,
           "--num-requests", str(args.num_requests), "--prefix-len", str(args.prefix_len),
           "--suffix-len", *map(str, args.suffix_len), "--output-len", str(args.output_len),
           "--max-model-len", str(args.max_model_len), "--seed", str(args.seed),
           "--warm-rounds", str(args.warm_rounds), "--profile", str(args.profile)]
    return cmd + (["--tiny"] if args.tiny else [])


def _run_child(cmd: list[str], tiny: bool, timeout: float | None) -> dict | None:
    env = dict(os.environ, **({"TRITON_INTERPRET": "1"} if tiny else {}))
    root = str(Path(__file__).resolve().parent.parent)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
    try:
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return None
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if not lines:
        sys.stderr.write(proc.stderr[-3000:])
        return None
    return json.loads(lines[-1][len("RESULT "):])


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    if args.tiny:
        for name, value in TINY_SIZES.items():
            if getattr(args, name) == build_parser().get_default(name):
                setattr(args, name, value)
    if args.single is not None:
        print("RESULT " + json.dumps(run_one(args, args.single == "on")), flush=True)
        return
    print(f"{args.num_requests} requests: {args.prefix_len}-token shared prefix + {args.suffix_len[0]}-"
          f"{args.suffix_len[1]} own tokens, {args.output_len} output tokens each")
    rows = {}
    for mode in args.cascade:
        result = _run_child(_child_command(args, mode), args.tiny, args.child_timeout)
        if result is None:
            print(f"cascade {mode}: failed")
            continue
        rows[mode] = result
        print(f"cascade {mode}: {result['output_tokens']} tokens in {result['seconds']:.2f} s = "
              f"{result['tokens_per_s']:,.0f} tok/s; {result['cascade_steps']} of {result['decode_steps']} decode "
              "steps with cascade groups", flush=True)
        if "profile" in result:
            print(result["profile"], flush=True)
    if len(rows) == 2:
        print(f"cascade on / off: {rows['on']['tokens_per_s'] / rows['off']['tokens_per_s']:.2f}x")


if __name__ == "__main__":
    main()
