"""Standard workload throughput for several decode split policies (``SPLIT_TARGET_WAVES``), each in a fresh
process, on one card. Usage: python benchmarks/sweep_decode_splits.py [--waves 1 2 4] [--repeat 1]"""

from __future__ import annotations

import argparse
import subprocess
import sys


def child(waves: float) -> None:
    import allmos.kernels.decode_attention as decode_attention
    from allmos.benchmark import run_throughput

    decode_attention.SPLIT_TARGET_WAVES = waves
    result = run_throughput()
    print(f"RESULT waves={waves} {result.seconds:.3f} s {result.tokens_per_s:.0f} tok/s", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--waves", type=float, nargs="+", default=[1.0, 2.0, 4.0])
    ap.add_argument("--repeat", type=int, default=1)
    ap.add_argument("--child", type=float, default=None, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child is not None:
        child(a.child)
        return
    for _ in range(a.repeat):
        for waves in a.waves:
            proc = subprocess.run([sys.executable, __file__, "--child", str(waves)], stdout=subprocess.PIPE,
                                  text=True, timeout=300)
            print(*[line for line in proc.stdout.splitlines() if line.startswith("RESULT")] or
                  [f"waves={waves}: failed ({proc.returncode})"], flush=True)


if __name__ == "__main__":
    main()
