"""Quality of the CPU's low-precision formats against float32 (allmos.quality): the scoring itself against
transformers, then the default model's automatic format and int8 on a held-out public-domain text
(tests/data/alice_ch1_2.txt) and on greedy chat continuations."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from allmos import LLM, SamplingParams
from allmos.config import cpu_has_native_bf16
from allmos.quality import greedy_agreement, perplexity, token_logprobs

TEXT = Path(__file__).parent / "data" / "alice_ch1_2.txt"
QUESTIONS = ["What is the capital of France?", "Name three primary colors.", "Write a haiku about the sea.",
             "Explain in one sentence what a CPU does."]


def test_token_logprobs_match_transformers(qwen3_dir):
    import transformers

    ids = [int(x) for x in torch.randint(3, 500, (40,), generator=torch.Generator().manual_seed(0))]
    llm = LLM(str(qwen3_dir), kvcache_block_size=16, dtype="float32", device="cpu")
    ours = token_logprobs(llm, ids)
    model = transformers.AutoModelForCausalLM.from_pretrained(qwen3_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([ids])).logits[0].double(), -1)
    ref = logp[torch.arange(len(ids) - 1), torch.tensor(ids[1:])]
    torch.testing.assert_close(ours, ref, atol=1e-4, rtol=0)
    windows = torch.cat([token_logprobs(llm, ids[:16]), token_logprobs(llm, ids[16:32]), token_logprobs(llm, ids[32:])])
    assert perplexity(llm, ids, window=16) == pytest.approx(float(torch.exp(-windows.mean())), rel=1e-12)


@pytest.fixture(scope="module")
def reference(default_model_dir):
    """The float32 oracle: (engine, held-out token ids, perplexity, greedy continuations)."""
    llm = LLM(max_model_len=1024, dtype="float32", device="cpu")
    ids = llm.tokenizer(TEXT.read_text())["input_ids"][:768]
    return llm, ids, perplexity(llm, ids, window=768), _greedy(llm)


def _greedy(llm: LLM) -> list[list[int]]:
    outs = llm.chat([[{"role": "user", "content": q}] for q in QUESTIONS],
                    SamplingParams(temperature=0, max_tokens=16, ignore_eos=True), use_tqdm=False)
    return [o.token_ids for o in outs]


@pytest.mark.skipif(not cpu_has_native_bf16(), reason="the automatic format stays float32 without native bf16")
@pytest.mark.parametrize("options, max_ppl_rise", [({}, 0.01), ({"quantization": "int8"}, 0.03)],
                         ids=["auto", "int8"])
def test_default_model_low_precision_against_float32(reference, options, max_ppl_rise):
    _, ids, ref_ppl, ref_greedy = reference
    llm = LLM(max_model_len=1024, device="cpu", **options)
    runner = llm.engine.runner
    assert runner.dtype == torch.bfloat16
    assert runner.config.quantization == options.get("quantization", "int4")  # auto keeps the GGUF's Q4_1
    ppl = perplexity(llm, ids, window=768)
    assert ppl / ref_ppl - 1 < max_ppl_rise, (ppl, ref_ppl)
    agreement = greedy_agreement(_greedy(llm), ref_greedy)
    assert agreement.mean_shared_prefix >= 0.25, agreement
    if not options:  # the automatic default: most continuations identical
        assert agreement.identical >= len(QUESTIONS) // 2, agreement
