"""Quality of the fp8 KV cache (``kv_cache_dtype="fp8"``) against the model-dtype cache, default model, CPU.

For each weight format (``--formats``: float32 and the automatic CPU format), the same engine options with the
model-dtype cache and with the fp8 cache: perplexity on ``tests/data/alice_ch1_2.txt`` (5,902 tokens, windows of
1024) and the mean and root-mean-square of the per-token logprob difference there (how far the fp8 engine moves
each prediction; perplexity only sees the mean of the signed differences), greedy agreement over
``benchmarks/bench_cpu.py``'s 8 chat prompts, and |logprob difference| per token of the model-dtype engine's
continuations scored by both. Rows:

- ``fp8`` as shipped (start-up calibration: K center and scales, ``allmos/engine/kv_calibration.py``);
- ``fp8, seed N``: the same with another calibration seed, i.e. other random token ids (how much the figures
  move with the exact rounding);
- ``fp8, no center``: the calibrated center zeroed before anything is stored (scales as calibrated, 1.0 here).

``--speed`` instead: decode tokens/s of the automatic format with each cache (greedy, 64 new tokens after
random prompts of 14 and of 1,500 tokens, batches 1 and 16, prompts already in the prefix cache; best of
``--repeats``).

    python benchmarks/bench_fp8_kv_quality.py [--formats float32 auto] [--seeds 1 2 3] [--tokens 32]
    python benchmarks/bench_fp8_kv_quality.py --speed [--threads 1]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from allmos import LLM, SamplingParams  # noqa: E402
from allmos.engine import kv_calibration  # noqa: E402
from allmos.layers.attention import Attention  # noqa: E402
from allmos.quality import greedy_agreement, token_logprobs  # noqa: E402
from benchmarks.bench_cpu import CHAT_PROMPTS, ENGINES, TEXT  # noqa: E402


def build(options: dict, kv_cache_dtype: str, seed: int = kv_calibration.CALIBRATION_SEED,
          center: bool = True) -> LLM:
    default_seed = kv_calibration.CALIBRATION_SEED
    kv_calibration.CALIBRATION_SEED = seed
    try:
        llm = LLM(None, max_model_len=2048, device="cpu", kv_cache_dtype=kv_cache_dtype, **options)
    finally:
        kv_calibration.CALIBRATION_SEED = default_seed
    if not center:
        for layer in llm.engine.runner.model.modules():
            if isinstance(layer, Attention):
                layer.k_center.zero_()
    return llm


def text_logprobs(llm: LLM, ids: list[int], window: int = 1024) -> torch.Tensor:
    """Per-token logprobs of the text in windows of ``window`` (``allmos.quality.perplexity``'s windows)."""
    return torch.cat([token_logprobs(llm, ids[i:i + window]) for i in range(0, len(ids) - 1, window)
                      if len(ids[i:i + window]) >= 2])


def measure(llm: LLM, ids: list[int], params: SamplingParams) -> dict:
    outs = llm.chat([[{"role": "user", "content": q}] for q in CHAT_PROMPTS], params, use_tqdm=False)
    logprobs = text_logprobs(llm, ids)
    return {"ppl": float(torch.exp(-logprobs.mean())), "logprobs": logprobs,
            "gen": [(o.prompt_token_ids, o.token_ids) for o in outs]}


def compare(llm: LLM, row: dict, ref_llm: LLM, ref: dict) -> str:
    agreement = greedy_agreement([g for _, g in row["gen"]], [g for _, g in ref["gen"]])
    diffs = []
    for prompt, out in ref["gen"]:  # the reference continuation, scored by both
        start = len(prompt) - 1
        diffs.append((token_logprobs(llm, prompt + out)[start:] - token_logprobs(ref_llm, prompt + out)[start:]).abs())
    d = torch.cat(diffs)
    text = row["logprobs"] - ref["logprobs"]
    return (f"{row['ppl']:.3f} | {100 * (row['ppl'] / ref['ppl'] - 1):+.2f}% | {float(text.abs().mean()):.4f} | "
            f"{float(text.pow(2).mean().sqrt()):.4f} | {agreement.identical}/{agreement.total} | "
            f"{100 * agreement.mean_shared_prefix:.0f}% | {float(d.mean()):.4f} | {float(d.max()):.3f}")


def decode_tok_s(llm: LLM, batch: int, prompt_len: int, repeats: int, new: int = 64) -> float:
    """Decode tokens/s: (time of ``new`` tokens - time of 1) per generated token after the first."""
    gen = torch.Generator().manual_seed(prompt_len)
    prompts = [torch.randint(100, 40000, (prompt_len,), generator=gen).tolist() for _ in range(batch)]

    def timed(n: int) -> float:
        params = SamplingParams(temperature=0, max_tokens=n, ignore_eos=True)
        start = time.perf_counter()
        llm.generate(prompts, params, use_tqdm=False)
        return time.perf_counter() - start

    timed(1)  # the prompts' KV into the prefix cache: the timed runs below prefill nothing
    best = min(timed(new) - timed(1) for _ in range(repeats))
    return batch * (new - 1) / best


def speed(a: argparse.Namespace) -> None:
    print("| KV cache | " + " | ".join(f"batch {b}, {p}-token prompts" for p in (14, 1500) for b in (1, 16))
          + " |  (decode tok/s)")
    print("|" + " --- |" * 5, flush=True)
    for kv in ("auto", "fp8"):
        llm = LLM(None, max_model_len=2048, device="cpu", kv_cache_dtype=kv)
        rates = [decode_tok_s(llm, b, p, a.repeats) for p in (14, 1500) for b in (1, 16)]
        print(f"| {kv} | " + " | ".join(f"{r:.1f}" for r in rates) + " |", flush=True)
        llm.shutdown()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--formats", nargs="+", default=["float32", "auto"], choices=sorted(ENGINES))
    ap.add_argument("--seeds", type=int, nargs="*", default=[1, 2, 3])
    ap.add_argument("--tokens", type=int, default=32, help="greedy tokens per chat prompt")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--speed", action="store_true", help="decode speed instead of quality")
    ap.add_argument("--repeats", type=int, default=2)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    if a.speed:
        speed(a)
        return
    params = SamplingParams(temperature=0, max_tokens=a.tokens, ignore_eos=True)
    print("| weights | KV cache | perplexity | vs model-dtype cache | text abs dlogprob | text rms dlogprob | "
          "identical greedy | shared prefix | chat abs dlogprob | max |")
    print("|" + " --- |" * 10, flush=True)
    for name in a.formats:
        ref_llm = build(ENGINES[name], "auto")
        ids = ref_llm.tokenizer(TEXT.read_text())["input_ids"]
        ref = measure(ref_llm, ids, params)
        label = f"{name} ({str(ref_llm.engine.runner.dtype).removeprefix('torch.')})"
        n = len(CHAT_PROMPTS)
        print(f"| {label} | model dtype | {ref['ppl']:.3f} | | 0 | 0 | {n}/{n} | 100% | 0 | 0 |", flush=True)
        variants = [("fp8", {}), *((f"fp8, seed {s}", {"seed": s}) for s in a.seeds),
                    ("fp8, no center", {"center": False})]
        for kv_label, kwargs in variants:
            llm = build(ENGINES[name], "fp8", **kwargs)
            print(f"| {label} | {kv_label} | {compare(llm, measure(llm, ids, params), ref_llm, ref)} |", flush=True)
            llm.shutdown()
        ref_llm.shutdown()


if __name__ == "__main__":
    main()
