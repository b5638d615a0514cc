"""Standard throughput workload at several tensor-parallel sizes on one machine (default: tp=1 and tp=2).

Usage: python benchmarks/bench_tp.py [MODEL] [--tp 1 2] [--num-seqs 256] [--max-input 1024] [--max-output 1024]

Each size runs in a fresh subprocess (so one run's GPU memory, CUDA graphs and workers cannot affect the
next) through ``allmos.benchmark.run_throughput``, exactly as ``bench.py`` does; without MODEL it uses
random Qwen3-0.6B weights from benchmarks/qwen3-0.6b/config.json. Without a GPU it runs on the CPU with a
small workload unless the sizes are given (CPU tensor parallelism is for testing, not speed).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys


def run_one(args: argparse.Namespace, tp: int) -> dict:
    from allmos.benchmark import run_throughput, standard_workload

    workload = standard_workload(num_seqs=args.num_seqs, max_input=args.max_input, max_output=args.max_output,
                                 min_input=min(100, args.max_input), min_output=min(100, args.max_output))
    extra = {} if args.device is None else {"device": args.device}
    result = run_throughput(args.model, workload, tensor_parallel_size=tp, **extra)
    return {"tp": tp, "seconds": result.seconds, "output_tokens": result.output_tokens,
            "tokens_per_s": result.tokens_per_s}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("model", nargs="?", default=None)
    ap.add_argument("--tp", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--num-seqs", type=int, default=None)
    ap.add_argument("--max-input", type=int, default=None)
    ap.add_argument("--max-output", type=int, default=None)
    ap.add_argument("--device", default=None)
    ap.add_argument("--child-timeout", type=float, default=None, help="seconds allowed for each size's process")
    ap.add_argument("--single", type=int, default=None, help=argparse.SUPPRESS)  # child: run one size
    args = ap.parse_args()
    _fill_defaults(args)
    if args.single is not None:
        print("RESULT " + json.dumps(run_one(args, args.single)), flush=True)
        return
    rows = []
    for tp in args.tp:
        cmd = [sys.executable, __file__, *([args.model] if args.model else []), "--single", str(tp),
               "--num-seqs", str(args.num_seqs), "--max-input", str(args.max_input),
               "--max-output", str(args.max_output), *(["--device", args.device] if args.device else [])]
        stdout, code = _run_child(cmd, args.child_timeout)
        lines = [line for line in stdout.splitlines() if line.startswith("RESULT ")]
        if not lines:
            print(f"tp={tp}: failed (exit code {code})")
            continue
        if code != 0:  # the measurement finished; only the teardown after it failed or hung
            print(f"tp={tp}: measured, but the process then ended with {code}")
        rows.append(json.loads(lines[-1][len("RESULT "):]))
    _print_table(rows, args)


def _run_child(cmd: list[str], timeout: float | None) -> tuple[str, int | str]:
    """Run one size's process; returns its stdout (also what it printed before a timeout) and exit code."""
    with subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True) as proc:
        try:
            stdout, _ = proc.communicate(timeout=timeout)
            return stdout, proc.returncode
        except subprocess.TimeoutExpired:
            proc.kill()
            stdout, _ = proc.communicate()
            return stdout, "timeout"


def _fill_defaults(args: argparse.Namespace) -> None:
    import torch

    gpu = torch.cuda.is_available() and args.device in (None, "cuda")
    small = not gpu  # a CPU run of the full workload would take hours
    args.num_seqs = args.num_seqs or (16 if small else 256)
    args.max_input = args.max_input or (128 if small else 1024)
    args.max_output = args.max_output or (32 if small else 1024)


def _print_table(rows: list[dict], args: argparse.Namespace) -> None:
    print(f"model {args.model or 'benchmarks/qwen3-0.6b (random weights)'}, {args.num_seqs} sequences, "
          f"input <= {args.max_input}, output <= {args.max_output}")
    print("| tensor_parallel_size | time (s) | output tokens | throughput (tok/s) | vs tp=1 |")
    print("| --- | --- | --- | --- | --- |")
    base = next((r["tokens_per_s"] for r in rows if r["tp"] == 1), None)
    for r in rows:
        ratio = f"{r['tokens_per_s'] / base:.2f}x" if base else "-"
        print(f"| {r['tp']} | {r['seconds']:.2f} | {r['output_tokens']} | {r['tokens_per_s']:.1f} | {ratio} |")


if __name__ == "__main__":
    main()
