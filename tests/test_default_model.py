"""The embedded default model (SmolLM2-135M-Instruct GGUF): LLM() with no model, against transformers
loading the same GGUF file."""

from __future__ import annotations

import pytest
import torch

from allmos import LLM, SamplingParams

QUESTIONS = ["What is the capital of France?", "Name three primary colors.", "Say hello in Spanish."]


@pytest.fixture(scope="module")
def llm(default_model_dir):
    # no model: the embedded default; float32 (the oracle), not the CPU's automatic quantized format
    return LLM(max_model_len=1024, dtype="float32")


@pytest.fixture(scope="module")
def hf_gguf_model():
    pytest.importorskip("accelerate")
    import transformers

    from allmos.models.default_model import default_gguf_path

    path = default_gguf_path()
    return transformers.AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name,
                                                             dtype=torch.float32).eval()


def test_capital_of_france(llm):
    out = llm.chat([{"role": "user", "content": "What is the capital of France?"}],
                   SamplingParams(temperature=0, max_tokens=24), use_tqdm=False)[0]
    assert "Paris" in out.text
    assert out.outputs[0].finish_reason in ("stop", "length")


def test_greedy_matches_transformers_on_the_same_gguf(llm, hf_gguf_model):
    conversations = [[{"role": "user", "content": q}] for q in QUESTIONS]
    outs = llm.chat(conversations, SamplingParams(temperature=0, max_tokens=16, ignore_eos=True), use_tqdm=False)
    for out in outs:
        prompt_ids = out.prompt_token_ids
        with torch.no_grad():
            ref = hf_gguf_model.generate(torch.tensor([prompt_ids]), max_new_tokens=16, min_new_tokens=16,
                                         do_sample=False, eos_token_id=None, pad_token_id=0)
        assert out.token_ids == ref[0, len(prompt_ids):].tolist()


def test_eos_from_generation_config_stops(llm):
    out = llm.chat([{"role": "user", "content": "Say hi."}], SamplingParams(temperature=0, max_tokens=200),
                   use_tqdm=False)[0]
    assert out.outputs[0].finish_reason == "stop"
    assert out.token_ids[-1] in llm.engine.info.eos_token_ids
