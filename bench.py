"""The standard throughput benchmark (shared bench/WORKLOAD.md): `python bench.py [MODEL]`.

Without MODEL it builds random Qwen3-0.6B weights from benchmarks/qwen3-0.6b/config.json.
Prints `Throughput: X tok/s` and, on a GPU, the fraction of the bandwidth ceiling.
"""

import sys

from allmos.benchmark import (
    bench_model_config,
    ceiling_tokens_per_s,
    measure_copy_bandwidth,
    run_throughput,
    standard_workload,
)


def main() -> None:
    model = sys.argv[1] if len(sys.argv) > 1 else None
    workload = standard_workload()
    result = run_throughput(model, workload)
    print(f"Total: {result.output_tokens}tok, Time: {result.seconds:.2f}s, Throughput: {result.tokens_per_s:.2f}tok/s")
    try:
        import torch

        if torch.cuda.is_available():
            bw = measure_copy_bandwidth()
            ceiling = ceiling_tokens_per_s(bench_model_config(model), workload, bw)
            print(f"{torch.cuda.get_device_name()}: copy bandwidth {bw:.2f} TB/s, ceiling {ceiling:.0f} tok/s, "
                  f"allmos at {result.tokens_per_s / ceiling:.0%} of it")
    except FileNotFoundError:
        pass


if __name__ == "__main__":
    main()
