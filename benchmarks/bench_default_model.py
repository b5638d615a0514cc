"""The embedded default model on this machine: first load (GGUF dequantized and cached), second load
(from the cache), and decode tok/s at batch 1 and 16. Usage: python benchmarks/bench_default_model.py"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time

CHILD = """
import time, sys
t = time.perf_counter()
from allmos import LLM, SamplingParams
t_import = time.perf_counter() - t
t = time.perf_counter()
llm = LLM(max_model_len=1024)
print(f"load {time.perf_counter() - t:.2f} {t_import:.2f}", flush=True)
if sys.argv[1] == "decode":
    conv = [{"role": "user", "content": "Tell me a long story about a lighthouse keeper."}]
    for batch in (1, 16):
        chats = [conv] * batch
        llm.chat(chats, SamplingParams(max_tokens=4), use_tqdm=False)
        def timed(n):
            t = time.perf_counter()
            llm.chat(chats, SamplingParams(temperature=0, max_tokens=n, ignore_eos=True), use_tqdm=False)
            return time.perf_counter() - t
        decode = (timed(65) - timed(1)) / 64
        print(f"batch {batch}: {batch / decode:.1f} tok/s decode", flush=True)
"""


def main() -> None:
    with tempfile.TemporaryDirectory() as cache:
        env = dict(os.environ, ALLMOS_CACHE=cache)
        for label, mode in (("first load (converts the GGUF)", "load"), ("second load", "decode")):
            start = time.perf_counter()
            out = subprocess.run([sys.executable, "-c", CHILD, mode], env=env, capture_output=True, text=True)
            wall = time.perf_counter() - start
            lines = [line for line in out.stdout.splitlines() if line.strip()]
            _, load, imported = lines[0].split()
            print(f"{label}: LLM() {load} s after `import allmos` {imported} s (process wall {wall:.1f} s)")
            for line in lines[1:]:
                print("  " + line)


if __name__ == "__main__":
    main()
