"""CPU benchmark on the default model (SmolLM2-135M-Instruct): allmos in several weight formats beside
transformers (float32) and beside the machine's weight-read limit, all in one run.

For every engine, in its own process (so load time and resident memory are its own): load time, resident
memory after loading, decode tok/s at each batch size (greedy, random 14-token prompts; decode time =
time(prompt + N tokens) - time(prompt + 1 token), so prefill cancels out; best of --repeats), and the bytes
of weights one decode step reads. The weight-read limit of a format is (measured read bandwidth) / (bytes
per step) steps per second: no engine decodes batch 1 faster than that.

With --quality: perplexity of each format on tests/data/alice_ch1_2.txt (public domain) against float32,
greedy agreement and per-token logprob differences on fixed chat prompts (allmos.quality).

``llama.cpp`` as an engine runs the same model's GGUF file (the one the default model is converted from) through
the ``llama-cpp-python`` package when it is installed (``pip install llama-cpp-python``; not a dependency of
allmos), batch 1 only (its high-level API decodes one sequence), the weight bytes counted as the whole file.

``-compiled`` engines compile one decoder layer at start-up (``compilation_config=3``), ``-compiled-whole`` ones
the whole forward (``compilation_config=2``); their load time includes compiling, or reading torch's compile
cache when an earlier process compiled the same graphs.

Usage: python benchmarks/bench_cpu.py [--engines auto float32 bfloat16 int8 int4 int4-compiled auto-compiled
       auto-compiled-whole transformers llama.cpp] [--batches 1 16] [--new 128] [--threads 2] [--repeats 2]
       [--quality]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
TEXT = ROOT / "tests" / "data" / "alice_ch1_2.txt"
PROMPT_LEN = 14

# engine name -> LLM keyword arguments (vLLM's option names)
ENGINES = {
    "auto": {},
    "float32": {"dtype": "float32"},
    "bfloat16": {"dtype": "bfloat16"},
    "int8": {"quantization": "int8"},
    "int4": {"quantization": "int4"},
    "auto-compiled": {"compilation_config": 3},
    "auto-compiled-whole": {"compilation_config": 2},
    "int4-compiled": {"quantization": "int4", "compilation_config": 3},
    "int4-compiled-whole": {"quantization": "int4", "compilation_config": 2},
    "float32-compiled": {"dtype": "float32", "compilation_config": 3},
}
CHAT_PROMPTS = [
    "What is the capital of France?", "Give me three tips for staying focused while studying.",
    "Write a haiku about the sea.", "Explain in one sentence what a CPU does.", "Name three primary colors.",
    "What is 12 times 7?", "Translate 'good morning' into French.", "Who wrote Romeo and Juliet?",
]


def read_bandwidth_gbs(threads: int, mib: int = 1024, repeats: int = 5) -> float:
    """Best read bandwidth of a float32 sum over ``mib`` MiB (far beyond the caches), GB/s."""
    torch.set_num_threads(threads)
    x = torch.ones(mib * 2**20 // 4)
    x.sum()
    best = min(_timed(x.sum) for _ in range(repeats))
    return x.numel() * 4 / best / 1e9


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def prompts(batch: int, vocab: int = 49152) -> list[list[int]]:
    g = torch.Generator().manual_seed(batch)
    return torch.randint(100, vocab, (batch, PROMPT_LEN), generator=g).tolist()


def rss_mib() -> float:
    import psutil
    return psutil.Process().memory_info().rss / 2**20


def step_bytes(model: torch.nn.Module) -> int:
    """Bytes of weights one decode step reads: every matmul's weight (packed or float, with scales) and the
    norms; the embedding table is only looked up, so it does not count (unless the LM head is it)."""
    from allmos.layers.embedding import ParallelLMHead
    from allmos.layers.linear import LinearBase
    from allmos.layers.norm import RMSNorm

    total = 0
    for module in model.modules():
        if isinstance(module, (LinearBase, ParallelLMHead, RMSNorm)):
            tensors = list(module.parameters(recurse=False)) + list(module.buffers(recurse=False))
            total += sum(t.numel() * t.element_size() for t in tensors)
    return total


def decode_tok_s(generate, batch: int, new: int, repeats: int) -> float:
    """``generate(prompts, n)`` runs greedy generation of exactly n tokens."""
    p = prompts(batch)
    generate(p, 2)  # warm-up
    best = min(_timed(lambda: generate(p, new)) - _timed(lambda: generate(p, 1)) for _ in range(repeats))
    return batch * (new - 1) / best


# ---------------------------------------------------------------------------------------------- children
def child_allmos(name: str, a) -> dict:
    from allmos import LLM, SamplingParams

    torch.set_num_threads(a.threads)
    start = time.perf_counter()
    llm = LLM(None, max_model_len=1024, device="cpu", **ENGINES[name])
    load_s = time.perf_counter() - start
    rss = rss_mib()
    runner = llm.engine.runner

    def generate(p, n):
        llm.generate(p, SamplingParams(temperature=0, max_tokens=n, ignore_eos=True), use_tqdm=False)

    return {"engine": f"allmos {name}", "format": f"{runner.dtype}".removeprefix("torch.") + (
        f" + {llm.engine.runner.config.quantization}" if runner.config.quantization else ""),
        "load_s": load_s, "rss_mib": rss, "step_bytes": step_bytes(runner.model),
        "tok_s": {b: decode_tok_s(generate, b, a.new, a.repeats) for b in a.batches}}


def child_transformers(a) -> dict:
    import transformers

    from allmos.models.default_model import default_model_path

    torch.set_num_threads(a.threads)
    folder = default_model_path()
    start = time.perf_counter()
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    load_s = time.perf_counter() - start
    rss = rss_mib()

    def generate(p, n):
        with torch.no_grad():
            model.generate(torch.tensor(p), max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0,
                           eos_token_id=None)

    nbytes = sum(p.numel() * p.element_size() for p in model.parameters())  # tied: the table counts once
    return {"engine": f"transformers {transformers.__version__}", "format": "float32", "load_s": load_s,
            "rss_mib": rss, "step_bytes": nbytes,
            "tok_s": {b: decode_tok_s(generate, b, a.new, a.repeats) for b in a.batches}}


def child_llama_cpp(a) -> dict:
    import llama_cpp

    from allmos.models.default_model import default_gguf_path

    path = default_gguf_path()
    start = time.perf_counter()
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=1024, n_threads=a.threads, n_threads_batch=a.threads,
                          verbose=False)
    load_s = time.perf_counter() - start
    rss = rss_mib()

    def generate(p, n):
        if len(p) != 1:
            raise ValueError("the llama.cpp engine decodes batch 1 only")
        tokens = llm.generate(p[0], temp=0.0, reset=True)  # greedy; does not stop at end-of-text by itself
        for _ in range(n):
            next(tokens)

    return {"engine": f"llama.cpp (llama-cpp-python {llama_cpp.__version__})", "format": path.stem.rsplit(".", 1)[-1],
            "load_s": load_s, "rss_mib": rss, "step_bytes": path.stat().st_size,
            "tok_s": {b: decode_tok_s(generate, b, a.new, a.repeats) for b in a.batches if b == 1}}


def child_quality(a) -> dict:
    from allmos import LLM, SamplingParams
    from allmos.quality import greedy_agreement, perplexity, token_logprobs

    torch.set_num_threads(a.threads)
    results = {}
    reference = None
    text = TEXT.read_text()
    params = SamplingParams(temperature=0, max_tokens=a.quality_tokens, ignore_eos=True)
    for name in ["float32"] + [e for e in a.engines if e in ENGINES and e != "float32" and "compiled" not in e]:
        llm = LLM(None, max_model_len=2048, device="cpu", **ENGINES[name])
        ids = llm.tokenizer(text)["input_ids"]
        ppl = perplexity(llm, ids, window=1024)
        outs = llm.chat([[{"role": "user", "content": q}] for q in CHAT_PROMPTS], params, use_tqdm=False)
        gen = [(o.prompt_token_ids, o.outputs[0].token_ids) for o in outs]
        if reference is None:
            reference = (llm, ppl, gen)
        ref_llm, ref_ppl, ref_gen = reference
        agreement = greedy_agreement([g for _, g in gen], [g for _, g in ref_gen])
        diffs = []
        for prompt, out in ref_gen:  # the float32 continuation, scored by both
            start = len(prompt) - 1
            ours, theirs = token_logprobs(llm, prompt + out), token_logprobs(ref_llm, prompt + out)
            diffs.append((ours[start:] - theirs[start:]).abs())
        d = torch.cat(diffs)
        results[name] = {"ppl": ppl, "ppl_rel": ppl / ref_ppl - 1, "identical": agreement.identical,
                         "total": agreement.total, "shared_prefix": agreement.mean_shared_prefix,
                         "dlogprob_mean": float(d.mean()), "dlogprob_max": float(d.max()), "tokens": len(ids)}
        if llm is not ref_llm:
            llm.shutdown()
    return results


# ---------------------------------------------------------------------------------------------- parent
def run_child(kind: str, a) -> dict:
    args = [sys.executable, __file__, "--child", kind, "--threads", str(a.threads), "--new", str(a.new),
            "--repeats", str(a.repeats), "--quality-tokens", str(a.quality_tokens), "--batches",
            *map(str, a.batches), "--engines", *a.engines]
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    out = subprocess.run(args, capture_output=True, text=True, env=env, check=False)
    lines = [line for line in out.stdout.splitlines() if line.startswith("{")]
    if out.returncode or not lines:
        raise RuntimeError(f"{kind} failed:\n{out.stderr[-3000:]}")
    return json.loads(lines[-1])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--engines", nargs="+", default=["float32", "auto", "bfloat16", "int8", "transformers"])
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 16])
    ap.add_argument("--new", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--quality", action="store_true")
    ap.add_argument("--quality-tokens", type=int, default=32)
    ap.add_argument("--child", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        children = {"transformers": child_transformers, "quality": child_quality, "llama.cpp": child_llama_cpp}
        result = children[a.child](a) if a.child in children else child_allmos(a.child, a)
        print(json.dumps(result))
        return
    bandwidth = read_bandwidth_gbs(a.threads)
    print(f"default model (SmolLM2-135M-Instruct), {a.threads} threads, greedy, {PROMPT_LEN}-token prompts, "
          f"{a.new} new tokens; read bandwidth {bandwidth:.1f} GB/s", flush=True)
    rows = []
    for kind in a.engines:
        rows.append(run_child(kind, a))
        print(json.dumps(rows[-1]), flush=True)
    base = next((r for r in rows if r["engine"].startswith("transformers")), None)
    head = " | ".join(f"batch {b} tok/s" for b in a.batches)
    print(f"\n| engine | format | load s | RSS MiB | MB/step | {head} | batch 1 limit tok/s | % of limit |"
          + (" vs transformers |" if base else ""))
    print("|" + " --- |" * (7 + len(a.batches) + bool(base)))
    for r in rows:
        limit = bandwidth * 1e9 / r["step_bytes"]
        tok = " | ".join(f"{_tok(r, b):.1f}" if _tok(r, b) == _tok(r, b) else "-" for b in a.batches)
        line = (f"| {r['engine']} | {r['format']} | {r['load_s']:.1f} | {r['rss_mib']:.0f} | "
                f"{r['step_bytes'] / 1e6:.0f} | {tok} | {limit:.0f} | {100 * _tok(r, 1) / limit:.0f}% |")
        if base:
            line += " " + ", ".join(f"{_tok(r, b) / _tok(base, b):.2f}x" for b in a.batches) + " |"
        print(line)
    if a.quality:
        q = run_child("quality", a)
        print(f"\nquality against float32: perplexity on {TEXT.name} ({next(iter(q.values()))['tokens']} tokens, "
              f"windows of 1024), greedy agreement and |logprob difference| over {len(CHAT_PROMPTS)} chat prompts "
              f"x {a.quality_tokens} tokens (float32's continuation scored by both)")
        print("| format | perplexity | vs float32 | identical greedy | shared prefix | mean abs dlogprob | max |")
        print("|" + " --- |" * 7)
        for name, r in q.items():
            print(f"| {name} | {r['ppl']:.3f} | {100 * r['ppl_rel']:+.2f}% | {r['identical']}/{r['total']} | "
                  f"{100 * r['shared_prefix']:.0f}% | {r['dlogprob_mean']:.4f} | {r['dlogprob_max']:.3f} |")


def _tok(row: dict, batch: int) -> float:
    """tok/s of ``row`` at ``batch`` (NaN where the engine did not run that batch)."""
    values = row["tok_s"]
    return values.get(str(batch), values.get(batch, float("nan")))


if __name__ == "__main__":
    main()
