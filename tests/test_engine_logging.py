"""What the engine tells the user: the KV-cache line at start-up and rate-limited preemption warnings."""

from __future__ import annotations

import logging
import random

import pytest

from allmos import LLM, SamplingParams
from allmos.engine.llm_engine import kv_cache_summary
from allmos.engine.scheduler import PreemptionLog


def _warnings(caplog) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == "allmos" and r.levelno == logging.WARNING]


def _preempting_run(folder):
    """Eight sequences need two 16-token blocks each while decoding, ten blocks hold five: preemption."""
    rng = random.Random(3)
    prompts = [[rng.randrange(3, 512) for _ in range(n)] for n in (15, 14, 13, 15, 12, 15, 11, 15)]
    llm = LLM(str(folder), kvcache_block_size=16, num_kvcache_blocks=10, device="cpu")
    llm.generate(prompts, SamplingParams(temperature=0, max_tokens=6, ignore_eos=True), use_tqdm=False)
    return llm


def test_forced_preemption_logs_one_rate_limited_warning(qwen3_dir, caplog):
    caplog.set_level(logging.INFO, logger="allmos")
    llm = _preempting_run(qwen3_dir)
    preemptions = llm.engine.scheduler.num_preemptions
    assert preemptions > 1  # several preemptions within one run...
    lines = [r.getMessage() for r in _warnings(caplog)]
    assert len(lines) == 1, lines  # ...but one line: the next may come 10 s after this one at the earliest
    assert "preempted 1 sequence" in lines[0] and "num_kvcache_blocks" in lines[0]


def test_no_warning_without_preemption(qwen3_dir, caplog):
    caplog.set_level(logging.INFO, logger="allmos")
    llm = LLM(str(qwen3_dir), kvcache_block_size=16, num_kvcache_blocks=64, device="cpu")
    llm.generate([[5, 6, 7]] * 4, SamplingParams(max_tokens=8), use_tqdm=False)
    assert llm.engine.scheduler.num_preemptions == 0
    assert _warnings(caplog) == []


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_preemption_log_rate_limit(caplog):
    caplog.set_level(logging.INFO, logger="allmos")
    clock = FakeClock()
    log = PreemptionLog(interval_s=10.0, clock=clock)
    total = 0
    for t in (0.0, 1.0, 2.0, 9.9):  # the first is reported at once, the next three wait
        clock.now = 100.0 + t
        total += 1
        log.record(total)
    assert len(_warnings(caplog)) == 1
    clock.now = 111.0  # 11 s after the first line: this one reports the three held back plus itself
    total += 1
    log.record(total)
    lines = [r.getMessage() for r in _warnings(caplog)]
    assert len(lines) == 2
    assert "preempted 4 sequence(s) in the last 11 s (5 since start)" in lines[1]
    clock.now = 115.0
    log.record(total + 1)
    assert len(_warnings(caplog)) == 2  # 4 s after the last line: held back


@pytest.mark.parametrize("blocks,block_size,max_len,expect", [
    (10, 16, 128, "10 blocks x 16 tokens = 160 tokens; max concurrency 1.25x at max_model_len=128"),
    (3, 256, 4096, "3 blocks x 256 tokens = 768 tokens; max concurrency 0.19x at max_model_len=4096 "
                   "(a request that may need more than 768 tokens is rejected)"),
])
def test_kv_cache_summary_counts_tokens(blocks, block_size, max_len, expect):
    line = kv_cache_summary(blocks, block_size, max_len)
    assert line == "KV cache: " + expect
    assert "room for 0" not in line


def test_start_up_line_says_tokens(qwen3_dir, caplog):
    caplog.set_level(logging.INFO, logger="allmos")
    LLM(str(qwen3_dir), kvcache_block_size=16, num_kvcache_blocks=2, max_model_len=128, device="cpu")
    line = next(r.getMessage() for r in caplog.records if r.getMessage().startswith("KV cache:"))
    assert line.startswith("KV cache: 2 blocks x 16 tokens = 32 tokens; max concurrency 0.25x at max_model_len=128")


def test_engine_never_reads_the_deprecated_torch_dtype(qwen3_dir, monkeypatch):
    """transformers warns once per process when ``config.torch_dtype`` is read; the engine reads ``dtype``."""
    import transformers

    def refuse(self):
        raise AssertionError("config.torch_dtype was read")

    monkeypatch.setattr(transformers.PretrainedConfig, "torch_dtype", property(refuse))
    llm = LLM(str(qwen3_dir), kvcache_block_size=16, num_kvcache_blocks=4, max_model_len=64, device="cpu")
    assert llm.engine.source.checkpoint_dtype is not None
