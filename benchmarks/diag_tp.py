"""Diagnostic for tensor parallelism on GPUs: a tiny tp=2 generate, eager or with CUDA graphs; with
ALLMOS_TP_STACKS_AFTER_S set, every rank dumps its thread stacks when it is still running after that long.
Usage: ALLMOS_TP_STACKS_AFTER_S=60 python benchmarks/diag_tp.py [--eager]"""

import faulthandler
import os
import sys
import time

from allmos import LLM, SamplingParams
from allmos.benchmark import DEFAULT_BENCH_MODEL

if __name__ == "__main__":
    if os.environ.get("ALLMOS_TP_STACKS_AFTER_S"):
        faulthandler.dump_traceback_later(float(os.environ["ALLMOS_TP_STACKS_AFTER_S"]), repeat=False)
    eager = "--eager" in sys.argv
    start = time.perf_counter()
    llm = LLM(str(DEFAULT_BENCH_MODEL), load_format="dummy", tensor_parallel_size=2, max_model_len=1024,
              max_num_seqs=16, enforce_eager=eager)
    print(f"engine up after {time.perf_counter() - start:.1f} s", flush=True)
    out = llm.generate([[1, 2, 3]] * 4 + [list(range(200))], SamplingParams(temperature=0, max_tokens=16),
                       use_tqdm=False)
    print(f"eager={eager}: generated {[len(o.token_ids) for o in out]} after {time.perf_counter() - start:.1f} s",
          flush=True)
    llm.shutdown()
