"""The fp8 KV cache on the default model against the model-dtype cache (allmos.quality): perplexity on the
held-out public-domain text (tests/data/alice_ch1_2.txt, all 5,902 tokens in windows of 1,024) within 1%, and
greedy chat continuations mostly shared. The automatic CPU format, as ``test_cpu_quality.py`` checks it."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from allmos import LLM, SamplingParams
from allmos.config import cpu_has_native_bf16
from allmos.quality import greedy_agreement, perplexity

TEXT = Path(__file__).parent / "data" / "alice_ch1_2.txt"
QUESTIONS = ["What is the capital of France?", "Name three primary colors.", "Write a haiku about the sea.",
             "Explain in one sentence what a CPU does."]

pytestmark = [pytest.mark.slow, pytest.mark.skipif(not cpu_has_native_bf16(),
                                                   reason="the automatic format stays float32 without native bf16")]


def _measure(llm: LLM) -> tuple[float, list[list[int]]]:
    ids = llm.tokenizer(TEXT.read_text())["input_ids"]
    outs = llm.chat([[{"role": "user", "content": q}] for q in QUESTIONS],
                    SamplingParams(temperature=0, max_tokens=16, ignore_eos=True), use_tqdm=False)
    return perplexity(llm, ids, window=1024), [o.token_ids for o in outs]


def test_default_model_fp8_kv_cache_within_one_percent(default_model_dir):
    ref_ppl, ref_greedy = _measure(LLM(max_model_len=2048, device="cpu"))
    llm = LLM(max_model_len=2048, device="cpu", kv_cache_dtype="fp8")
    assert llm.engine.runner.kv_caches[0][0].dtype == torch.float8_e4m3fn
    ppl, greedy = _measure(llm)
    assert ppl / ref_ppl - 1 < 0.01, (ppl, ref_ppl)
    agreement = greedy_agreement(greedy, ref_greedy)
    assert agreement.mean_shared_prefix >= 0.25, agreement
