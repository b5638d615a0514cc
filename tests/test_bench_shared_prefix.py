"""benchmarks/bench_shared_prefix.py runs: its workload, a tiny CPU run that goes through the cascade path
(Triton interpreter), and the command line with its per-mode child process."""

from __future__ import annotations

import importlib.util
import os
import re
from pathlib import Path

import pytest

from allmos.attention import cascade

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "bench_shared_prefix.py"
TINY_ARGS = ["--tiny", "--num-requests", "4", "--prefix-len", "40", "--suffix-len", "1", "3", "--output-len", "3",
             "--max-model-len", "256"]
needs_interpreter = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1",
                                       reason="the tiny CPU run needs TRITON_INTERPRET=1 (set by conftest.py)")


def load_bench():
    spec = importlib.util.spec_from_file_location("bench_shared_prefix", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_workload_shares_one_prefix():
    bench = load_bench()
    prefix, prompts = bench.shared_prefix_workload(5, 100, (2, 4), seed=3)
    assert len(prefix) == 100 and len(prompts) == 5
    assert all(p[:100] == prefix and 2 <= len(p) - 100 <= 4 for p in prompts)
    assert bench.shared_prefix_workload(5, 100, (2, 4), seed=3) == (prefix, prompts)


@needs_interpreter
def test_tiny_run_uses_cascade(monkeypatch):
    monkeypatch.setattr(cascade, "DEFAULT_CASCADE_POLICY", cascade.CascadePolicy(min_saved_tokens=0))
    bench = load_bench()
    result = bench.run_one(bench.build_parser().parse_args(TINY_ARGS), cascade=True)
    assert result["output_tokens"] == 4 * 3
    assert result["cascade_steps"] == result["decode_steps"] == 2


@needs_interpreter
def test_command_line(capsys):
    load_bench().main([*TINY_ARGS, "--cascade", "off", "--child-timeout", "300"])
    out = capsys.readouterr().out
    assert "4 requests: 40-token shared prefix" in out
    assert "cascade off: 12 tokens in" in out and "0 of 2 decode steps with cascade groups" in out


@needs_interpreter
def test_profile_round_splits_the_wall_time():
    """``--profile``: one more round, timed by phase (each engine step counted once, as prefill or decode;
    the last decode step may only collect the previous one's tokens)."""
    bench = load_bench()
    result = bench.run_one(bench.build_parser().parse_args([*TINY_ARGS, "--profile", "2"]), cascade=False)
    first = result["profile"].splitlines()[0]
    assert first.startswith("profiled round, 4 requests x 2 output tokens:")
    assert "1 prefill steps" in first and "CPU ops" in first
    assert re.search(r"; [12] decode steps \d+ ms;", first), first
