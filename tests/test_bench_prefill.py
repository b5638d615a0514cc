"""benchmarks/bench_prefill.py: its FLOP count (``allmos.benchmark.prefill_flops``) by hand, and a tiny CPU run."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import SimpleNamespace

from allmos.benchmark import prefill_flops
from allmos.models.model_config import ModelConfig

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "bench_prefill.py"


def test_prefill_flops_by_hand():
    cfg = ModelConfig.from_hf(SimpleNamespace(
        num_hidden_layers=2, hidden_size=8, intermediate_size=16, num_attention_heads=2, num_key_value_heads=1,
        head_dim=4, vocab_size=10, architectures=["Qwen3ForCausalLM"], max_position_embeddings=64,
        rms_norm_eps=1e-6))
    # per layer: q/k/v 8 x (2 + 2) x 4 = 128, o 2 x 4 x 8 = 64, gate/up/down 3 x 8 x 16 = 384 -> 576; 2 layers 1152
    linear = 2 * 1152 * (3 + 5)
    attention = 2 * 2 * 2 * 4 * (3 * 3 + 5 * 5)  # 2 * layers * heads * head_dim * L^2
    lm_head = 2 * 10 * 8 * 2  # one row per prompt
    assert prefill_flops(cfg, [3, 5]) == linear + attention + lm_head == 19840


def test_tiny_cpu_run_prints_one_row_per_length(qwen3_dir, capsys):
    spec = importlib.util.spec_from_file_location("bench_prefill", SCRIPT)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    bench.main([str(qwen3_dir), "--lens", "20", "40", "--tokens", "80", "--device", "cpu",
                "--max-num-batched-tokens", "64", "--profile", "20"])
    out = capsys.readouterr().out
    rows = [line.split("|")[1:-1] for line in out.splitlines() if line.startswith("| 64 |")]
    assert [(int(r[1]), int(r[2])) for r in rows] == [(20, 4), (40, 2)]
    assert all(float(r[4].replace(",", "")) > 0 and float(r[5]) > 0 and r[6].strip().endswith("%") for r in rows)
    assert "matrix rate measured in this run" in out
    table = out[out.index("CPU ops, 4 prompts of 20:"):].splitlines()
    assert "wall" in table[0] and len(table) > 3  # the profile's ops, a line each (busiest first)
    shares = [float(line.split("ms")[1].split("%")[0]) for line in table[1:] if line.startswith("  ") and "%" in line]
    assert shares and shares == sorted(shares, reverse=True)
