"""Host time per decode step on the CPU: everything a step costs except the model's own compute.

A tiny random Qwen3 (so the forward is cheap and the host's bookkeeping shows), N running sequences in
steady decode. For each step it times ``engine.step()`` as a whole and the model forward + LM head +
sampler inside it; the difference is the engine's host time (scheduling, batch building, tensor
preparation, read-back, stop checks, outputs). Usage:

    python benchmarks/bench_host_step.py [--num-seqs 256] [--steps 50] [--repeat 3] [--server] [--clock thread]

``--server`` times the server's engine-core loop instead of ``LLMEngine.step``: one step of
``allmos.server.core_process.EngineCore`` plus encoding its ``StepOutputs`` frame (what the core process
does per step before writing to its pipe). ``--clock thread`` times with this thread's CPU time
(``time.thread_time``) instead of the wall clock: on a shared machine, time the process spends waiting for
a core then does not count (the model runs on this thread: ``torch.set_num_threads(1)``).

Prints the median host ms per step over the timed steps (after a few warm-up steps), per repeat.
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

TINY_QWEN3 = {
    "architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3", "vocab_size": 512, "hidden_size": 64,
    "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
    "head_dim": 16, "max_position_embeddings": 4096, "rms_norm_eps": 1e-6, "rope_theta": 10000.0,
    "tie_word_embeddings": True, "torch_dtype": "float32", "hidden_act": "silu",
}


class Timer:
    """Wraps callables; accumulates their time on ``clock`` until ``take()``."""

    def __init__(self, clock=time.perf_counter) -> None:
        self.clock = clock
        self.total = 0.0

    def wrap(self, fn):
        clock = self.clock

        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            start = clock()
            try:
                return fn(*args, **kwargs)
            finally:
                self.total += clock() - start
        return wrapper

    def take(self) -> float:
        value, self.total = self.total, 0.0
        return value


def run(num_seqs: int, steps: int, warmup: int = 5, server: bool = False, clock=time.perf_counter) -> float:
    from allmos import LLM, SamplingParams

    folder = Path(tempfile.mkdtemp(prefix="allmos-host-step-"))
    (folder / "config.json").write_text(json.dumps(TINY_QWEN3))
    llm = LLM(str(folder), load_format="dummy", max_num_seqs=num_seqs, max_model_len=1024,
              kvcache_block_size=16, enforce_eager=True)
    engine = llm.llm_engine if hasattr(llm, "llm_engine") else llm.engine
    runner = _local_runner(engine)
    compute = Timer(clock)
    runner.model.forward = compute.wrap(runner.model.forward)
    runner.model.compute_logits = compute.wrap(runner.model.compute_logits)
    runner.sampler.forward = compute.wrap(runner.sampler.forward)
    params = SamplingParams(temperature=0.8, seed=1, max_tokens=warmup + steps + 8, ignore_eos=True)
    prompts = [[(7 * i + j) % 500 + 3 for j in range(32)] for i in range(num_seqs)]
    step = _server_loop(engine, prompts, params) if server else _engine_loop(engine, prompts, params)
    while _num_prefilling(engine):  # prefill until every sequence decodes
        step()
    host = []
    for i in range(warmup + steps):
        compute.take()
        start = clock()
        step()
        wall = clock() - start
        if i >= warmup:
            host.append(wall - compute.take())
    llm.shutdown()
    return statistics.median(host) * 1e3


def _engine_loop(engine, prompts: list[list[int]], params):
    for i, prompt in enumerate(prompts):
        engine.add_request(f"r{i}", prompt, params)
    return engine.step


def _server_loop(engine, prompts: list[list[int]], params):
    """The core process's per-step work: the adapter's step and the frame it sends."""
    from allmos.server.core_process import EngineCore
    from allmos.server.protocol import AddRequest, Codec, CoreMessage, SamplingSettings, StepOutputs

    core, codec = EngineCore(engine), Codec(CoreMessage)
    settings = SamplingSettings(temperature=params.temperature, seed=params.seed, max_tokens=params.max_tokens,
                                ignore_eos=params.ignore_eos)
    for i, prompt in enumerate(prompts):
        core.add(AddRequest(f"r{i}", prompt, settings, time.time()))

    def step() -> None:
        outputs, scheduled = core.step()
        codec.frame(StepOutputs(outputs, [], scheduled, core.stats(), time.time()))
    return step


def _local_runner(engine):
    runner = engine.runner
    return getattr(runner, "local", None) or runner


def _num_prefilling(engine) -> int:
    if hasattr(engine, "get_stats"):
        return engine.get_stats().num_prefilling
    # engines before the core split (to measure an older commit with this script)
    return sum(r.num_computed_tokens < r.num_prompt_tokens for r in engine.scheduler.requests.values())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--num-seqs", type=int, default=256)
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--server", action="store_true", help="time the server's engine-core loop")
    ap.add_argument("--clock", choices=("wall", "thread"), default="wall")
    args = ap.parse_args()
    torch.set_num_threads(1)
    clock = time.thread_time if args.clock == "thread" else time.perf_counter
    results = [run(args.num_seqs, args.steps, server=args.server, clock=clock) for _ in range(args.repeat)]
    loop = "server core loop" if args.server else "LLMEngine.step"
    print(f"host ms ({args.clock} clock) per decode step ({loop}) at {args.num_seqs} sequences "
          f"(median of {args.steps} steps), per repeat: " + ", ".join(f"{r:.3f}" for r in results))


if __name__ == "__main__":
    main()
