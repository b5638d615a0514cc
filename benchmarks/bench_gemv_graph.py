"""Projection kernels timed the way a decode step runs them: inside a CUDA graph, one launch per layer.

For each decode projection shape of the benchmark model (Qwen3-0.6B: q/k/v, o, gate/up, down) and batch size,
a graph runs the projection once for each of ``--layers`` distinct weight copies (so every launch reads its
weight from memory, as in a real step: 28 layers of weights do not fit in L2), and the replay time over the
layers is the in-graph cost of one launch. cuBLAS (``F.linear``) against Triton GEMV tiles
(``allmos.kernels.gemv``), each with the bytes-only time of its weight read at the measured copy bandwidth.
The row kernel runs with programmatic dependent launch where the device has it (``allmos.kernels.pdl``); run
again with ``ALLMOS_PDL=0`` for the same kernels without it.

Usage: ``PYTHONPATH=. python benchmarks/bench_gemv_graph.py [--batch 1 8] [--layers 28]``
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
import triton
from triton.testing import do_bench

from allmos.kernels.gemv import GemvConfig, gemv

SHAPES = {"qkv": (4096, 1024), "o": (1024, 2048), "gate_up": (6144, 1024), "down": (1024, 3072)}  # (N, K)


def configs(m: int, k: int) -> list[GemvConfig]:
    """Row-reduction tiles (one row) or tl.dot tiles (more rows): narrow to wide, short to whole-K."""
    if m == 1:
        out = []
        for block_n, block_k, warps in ((4, 1024, 4), (8, 512, 4), (8, 1024, 4), (16, 256, 4), (16, 512, 4),
                                        (16, 1024, 8), (32, 256, 4), (32, 512, 8), (4, 2048, 8), (8, 2048, 8)):
            if block_k <= max(k, 256):
                out += [GemvConfig(1, block_n, block_k, warps, 1), GemvConfig(1, block_n, block_k, warps, 3)]
        return out
    whole_k = min(triton.next_power_of_2(k), 4096)  # the row kernel over a few rows: weights loaded once
    rows = [GemvConfig(1, n, whole_k, w, 1) for n, w in ((2, 4), (4, 4), (4, 8), (8, 8), (16, 8))
            if n * whole_k <= 32768] if m <= 16 else []
    return rows + [GemvConfig(16, n, bk, w, s) for n, bk, w, s in ((16, 256, 4, 4), (32, 256, 4, 4), (32, 128, 4, 4),
                                                                   (64, 128, 4, 3), (16, 512, 4, 3), (32, 512, 8, 3))]


def graph_time_us(fn, layers: int) -> float:
    """Median replay time of ``fn(i)`` for i in range(layers) captured in one graph, per launch."""
    for i in range(layers):
        fn(i)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for i in range(layers):
            fn(i)
    return do_bench(graph.replay, warmup=10, rep=100, return_mode="median") * 1e3 / layers


def copy_bandwidth() -> float:
    """Device-to-device copy bandwidth in bytes/s (read + written)."""
    src = torch.empty(1 << 29, dtype=torch.bfloat16, device="cuda")
    dst = torch.empty_like(src)
    return 2 * src.numel() * 2 / (do_bench(lambda: dst.copy_(src), return_mode="median") * 1e-3)


def time_site(name: str, weights: list[torch.Tensor], m: int, copy_bw: float) -> None:
    """Print cuBLAS and the fastest Triton tiles for one projection shape at ``m`` rows."""
    n, k = weights[0].shape
    layers = len(weights)
    ideal = n * k * 2 / copy_bw * 1e6
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    outs = [torch.empty(m, n, device="cuda", dtype=torch.bfloat16) for _ in range(layers)]
    ref = F.linear(x, weights[0])
    cublas = graph_time_us(lambda i: torch.matmul(x, weights[i].t(), out=outs[i]), layers)
    print(f"{name} N={n} K={k} M={m}: bytes-only {ideal:.2f} us; cuBLAS {cublas:.2f} us")
    rows = []
    for cfg in configs(m, k):
        try:
            err = (gemv(x, weights[0], None, cfg).float() - ref.float()).abs().max().item()
            t = graph_time_us(lambda i, c=cfg: gemv(x, weights[i], None, c, out=outs[i]), layers)
        except Exception as exc:  # out of resources
            print(f"  {cfg}: failed {exc!r:.60}")
            continue
        rows.append((t, cfg, err))
    for t, cfg, err in sorted(rows, key=lambda r: r[0])[:6]:
        print(f"  {t:7.2f} us  {t / cublas:5.2f}x cuBLAS  {100 * ideal / t:5.1f}% of bytes-only  "
              f"m{cfg.block_m} n{cfg.block_n} k{cfg.block_k} w{cfg.num_warps} s{cfg.num_stages}  max err {err:.1e}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--layers", type=int, default=28)
    a = ap.parse_args()
    copy_bw = copy_bandwidth()
    print(f"# {torch.cuda.get_device_name()}, copy bandwidth {copy_bw / 1e12:.2f} TB/s; us per launch in a graph "
          f"of {a.layers} launches on distinct weights")
    for name, (n, k) in SHAPES.items():
        weights = [torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02 for _ in range(a.layers)]
        for m in a.batch:
            time_site(name, weights, m, copy_bw)
        del weights


if __name__ == "__main__":
    main()
