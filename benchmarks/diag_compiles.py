"""Which Triton kernel variants compile when, on the standard workload with an empty Triton cache:
during ``LLM(...)``, during the workload's warm-up ``generate``, and inside the timed ``generate`` (the ones
that make a cold run slower than a warm one). Usage: python benchmarks/diag_compiles.py"""

from __future__ import annotations

import os
import tempfile
import time

os.environ["TRITON_CACHE_DIR"] = tempfile.mkdtemp(prefix="allmos-triton-")  # before triton is imported

from triton import knobs  # noqa: E402

from allmos import LLM, SamplingParams  # noqa: E402
from allmos.benchmark import DEFAULT_BENCH_MODEL, standard_workload  # noqa: E402


class CompileLog:
    """Triton's JIT hooks: each compile's kernel, specialization, duration and the phase it fell in."""

    def __init__(self) -> None:
        self.phase = "startup"
        self.events: list[tuple[str, str, str, float]] = []  # (phase, kernel, specialization, seconds)
        self._started: dict[object, float] = {}
        knobs.runtime.jit_cache_hook = self._before
        knobs.runtime.jit_post_compile_hook = self._after

    def _before(self, **kwargs) -> bool:
        self._started[kwargs.get("key")] = time.perf_counter()
        return False  # go on and compile

    def _after(self, **kwargs) -> None:
        start = self._started.pop(kwargs.get("key"), time.perf_counter())
        fn = kwargs.get("fn")
        self.events.append((self.phase, getattr(fn, "name", str(fn)), str(kwargs.get("repr", ""))[:160],
                            time.perf_counter() - start))


def main() -> None:
    log = CompileLog()
    t0 = time.perf_counter()
    llm = LLM(str(DEFAULT_BENCH_MODEL), load_format="dummy", enforce_eager=False, max_model_len=4096)
    t1 = time.perf_counter()
    log.phase = "warm-up"
    llm.generate([[1, 2, 3, 4]], SamplingParams(), use_tqdm=False)
    t2 = time.perf_counter()
    log.phase = "timed"
    w = standard_workload()
    llm.generate(w.prompts, [SamplingParams(temperature=0.6, ignore_eos=True, max_tokens=m) for m in w.max_tokens],
                 use_tqdm=False)
    t3 = time.perf_counter()
    print(f"LLM() {t1 - t0:.1f} s, warm-up {t2 - t1:.1f} s, timed {t3 - t2:.2f} s "
          f"({sum(w.max_tokens) / (t3 - t2):.0f} tok/s, cold Triton cache)")
    for phase in ("startup", "warm-up", "timed"):
        rows = [e for e in log.events if e[0] == phase]
        print(f"{phase}: {len(rows)} compiles, {sum(e[3] for e in rows):.1f} s")
    for _, name, spec, secs in (e for e in log.events if e[0] == "timed"):
        print(f"  timed: {name} {secs:.2f} s {spec}")


if __name__ == "__main__":
    main()
