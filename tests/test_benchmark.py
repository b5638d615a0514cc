"""allmos.benchmark: the standard workload's published totals, the ceiling against a hand computation,
and a real (tiny, CPU) throughput run."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from allmos.benchmark import (
    DEFAULT_BENCH_MODEL,
    Workload,
    bench_model_config,
    ceiling,
    ceiling_tokens_per_s,
    run_throughput,
    standard_workload,
)
from allmos.models.model_config import ModelConfig

REPO = Path(__file__).resolve().parent.parent

# A model small enough to do the arithmetic by hand (head_dim given explicitly, as Qwen3 does).
TINY_FIELDS = dict(num_hidden_layers=2, hidden_size=8, intermediate_size=16, num_attention_heads=2,
                   num_key_value_heads=1, head_dim=4, vocab_size=10, architectures=["Qwen3ForCausalLM"],
                   max_position_embeddings=64, rms_norm_eps=1e-6)
TINY_CONFIG = ModelConfig.from_hf(SimpleNamespace(**TINY_FIELDS))


def test_standard_workload_matches_the_published_totals():
    """The totals benchmarks/README.md states for the standard workload (256 requests)."""
    w = standard_workload()
    assert len(w.prompts) == len(w.max_tokens) == 256
    assert w.num_output_tokens == 133_966
    assert w.num_prompt_tokens == 142_827
    assert w.num_decode_steps == 1_023
    assert all(100 <= len(p) <= 1024 for p in w.prompts) and all(100 <= m <= 1024 for m in w.max_tokens)
    assert all(0 <= t <= 10_000 for p in w.prompts for t in p)


def test_small_workload_is_a_prefix_of_the_same_random_stream():
    """num_seqs changes how many requests are drawn, not how: the first prompt is the standard one."""
    small, full = standard_workload(num_seqs=4), standard_workload()
    assert small.prompts[0] == full.prompts[0]
    assert len(small.prompts) == 4 and standard_workload(num_seqs=4) == small  # seeded: reproducible


def test_ceiling_matches_a_hand_computation():
    """bandwidth 1e-12 TB/s = 1 byte/s and 1e-12 TFLOP/s = 1 FLOP/s, so seconds = bytes + FLOPs."""
    workload = Workload(prompts=[[1, 2, 3], [1, 2, 3, 4, 5]], max_tokens=[2, 4])
    # parameters per layer: q 8*2*4=64, k 8*1*4=32, v 32, o 2*4*8=64 -> 192; MLP 3*8*16=384 -> 576
    # two layers 1152, plus one 10x8 vocabulary matrix 80 -> 1232 parameters, 2 bytes each = 2464 bytes
    # decode: 4 - 1 = 3 steps read all weights: 3 * 2464 = 7392 bytes
    # KV per token: 2 layers * (K and V) * 1 kv head * 4 * 2 bytes = 32 bytes
    # tokens read: prompt 3 / output 2 reads 3+1 = 4; prompt 5 / output 4 reads 6 + 7 + 8 = 21; 25 * 32 = 800
    # prefill: 2 * 1152 * 8 prompt tokens = 18432; attention 2 * 2 layers * 2 heads * 4 * (3^2 + 5^2) = 1088;
    #          LM head 2 * 10 * 8 per sequence * 2 = 320 -> 19840 FLOPs
    expected_seconds = 7392 + 800 + 19840
    c = ceiling(TINY_CONFIG, workload, bandwidth_tb_s=1e-12, tflops=1e-12)
    assert c.weight_bytes == pytest.approx(2464)
    assert c.kv_bytes_read == pytest.approx(800)
    assert c.decode_s == pytest.approx(7392 + 800)
    assert c.prefill_s == pytest.approx(19840)
    assert c.tokens_per_s == pytest.approx(6 / expected_seconds)
    assert ceiling_tokens_per_s(TINY_CONFIG, workload, 1e-12, 1e-12) == pytest.approx(6 / expected_seconds)
    # one-byte KV entries halve the KV reads only; fp32 weights double the weight bytes only
    assert ceiling(TINY_CONFIG, workload, 1e-12, 1e-12, kv_bytes=1).decode_s == pytest.approx(7392 + 400)
    assert ceiling(TINY_CONFIG, workload, 1e-12, 1e-12, weight_bytes_per_param=4).decode_s == \
        pytest.approx(2 * 7392 + 800)


def test_ceiling_head_dim_defaults_to_hidden_over_heads():
    fields = {k: v for k, v in TINY_FIELDS.items() if k != "head_dim"}  # 8 / 2 = 4, the same shapes
    config = ModelConfig.from_hf(SimpleNamespace(**fields))
    workload = Workload([[1, 2, 3]], [5])
    assert ceiling_tokens_per_s(config, workload, 2.0) == ceiling_tokens_per_s(TINY_CONFIG, workload, 2.0)


def test_qwen3_ceiling_weights_are_the_models_parameter_count():
    """Qwen3-0.6B has about 0.6e9 parameters (0.44e9 without the embedding): 2 bytes each in bf16."""
    c = ceiling(bench_model_config(None), standard_workload(num_seqs=2), bandwidth_tb_s=4.0)
    assert 1.1e9 < c.weight_bytes < 1.3e9


def test_ceiling_cli_prints_the_function_result():
    proc = subprocess.run([sys.executable, "-m", "allmos.benchmark", "--ceiling", "--bw", "4.3", "--kv-bytes", "1"],
                          capture_output=True, text=True, cwd=REPO, env=_env(), timeout=120)
    assert proc.returncode == 0, proc.stderr
    expected = ceiling_tokens_per_s(bench_model_config(None), standard_workload(), 4.3, kv_bytes=1)
    assert f"ceiling {expected:,.0f} tok/s at 4.30 TB/s" in proc.stdout


def test_ceiling_needs_a_config_json(tmp_path):
    with pytest.raises(ValueError, match="config.json"):
        bench_model_config(str(tmp_path))


def test_bench_py_help_is_help_not_a_model_name():
    proc = subprocess.run([sys.executable, "bench.py", "--help"], capture_output=True, text=True, cwd=REPO,
                          env=_env(), timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("usage: bench.py") and "--ceiling" in proc.stdout and "Qwen3-0.6B" in proc.stdout


def test_run_throughput_on_a_tiny_model(qwen3_dir):
    workload = standard_workload(num_seqs=4, min_input=5, max_input=20, min_output=3, max_output=8)
    workload = Workload([[t % 500 for t in p] for p in workload.prompts], workload.max_tokens)  # vocab is 512
    result = run_throughput(str(qwen3_dir), workload, device="cpu", kvcache_block_size=16, max_model_len=64)
    # counted from what generate returned: every request ran to its max_tokens (EOS ignored)
    assert result.output_tokens == sum(workload.max_tokens)
    assert result.prompt_tokens == sum(len(p) for p in workload.prompts)
    assert result.seconds > 0 and result.tokens_per_s == result.output_tokens / result.seconds


def test_run_throughput_uses_random_weights_for_a_bare_config(tmp_path, qwen3_dir):
    """A folder with only config.json (like benchmarks/qwen3-0.6b) runs with load_format='dummy'."""
    config = json.loads((qwen3_dir / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps(config))
    workload = Workload([[5, 6, 7], [8, 9, 10, 11]], [3, 2])
    result = run_throughput(str(tmp_path), workload, device="cpu", kvcache_block_size=16, max_model_len=64)
    assert result.output_tokens == 5 and result.prompt_tokens == 7


def test_default_bench_model_is_qwen3_shapes():
    config = json.loads((DEFAULT_BENCH_MODEL / "config.json").read_text())
    assert config["architectures"] == ["Qwen3ForCausalLM"] and config["hidden_size"] == 1024


def _env() -> dict:
    import os

    return {**os.environ, "PYTHONPATH": str(REPO)}


def test_bench_fp8_option_sets_the_ceiling_kv_bytes(monkeypatch, capsys):
    """``--kv-cache-dtype fp8`` runs the engine with that cache and counts one byte per K/V element in the
    ceiling (unless --kv-bytes is given)."""
    import allmos.benchmark as bench

    seen = {}

    def fake_run(model, workload, **kwargs):
        seen.update(kwargs)
        return bench.BenchResult(2.0, 1000, 10)

    monkeypatch.setattr(bench, "run_throughput", fake_run)
    bench.main(["--kv-cache-dtype", "fp8", "--bw", "4.0"])
    assert seen == {"kv_cache_dtype": "fp8"}
    expected = ceiling_tokens_per_s(bench_model_config(None), standard_workload(), 4.0, kv_bytes=1)
    assert f"ceiling {expected:,.0f} tok/s" in capsys.readouterr().out
    bench.main(["--bw", "4.0"])
    assert seen == {"kv_cache_dtype": "auto"}
    expected = ceiling_tokens_per_s(bench_model_config(None), standard_workload(), 4.0, kv_bytes=2)
    assert f"ceiling {expected:,.0f} tok/s" in capsys.readouterr().out
