"""The standard throughput benchmark (benchmarks/README.md): `python bench.py [MODEL] [--bw TB/s]`.

Without MODEL it builds random Qwen3-0.6B weights from benchmarks/qwen3-0.6b/config.json. Prints
`Throughput: X tok/s` and, on a GPU (or with --bw), the fraction of the bandwidth ceiling;
`python bench.py --ceiling --bw 4.3` prints the ceiling alone. `python bench.py --help` lists the options.
"""

from allmos.benchmark import main

if __name__ == "__main__":
    main(prog="bench.py")
