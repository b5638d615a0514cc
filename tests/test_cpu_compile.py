"""The compiled CPU forward (compilation_config=3): same tokens and logprobs as the eager forward, every
graph compiled inside LLM(), none inside requests. One small model, because compiling is slow here."""

from __future__ import annotations

import pytest

from allmos import LLM, SamplingParams


@pytest.fixture(scope="module")
def folder(tiny_model_factory):
    return tiny_model_factory("qwen3", num_hidden_layers=1)


def _run(llm: LLM):
    prompts = [[5, 6, 7], [9] * 40, [3, 1, 4, 1, 5, 9, 2, 6], [11]]
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True, logprobs=2)
    outs = llm.generate([prompts[0]], params, use_tqdm=False)  # batch of one
    outs += llm.generate(prompts, params, use_tqdm=False)  # prefill of several, decode batches of 4..1
    return [o.token_ids for o in outs], [o.outputs[0].logprobs for o in outs]


def _value(logprob) -> float:
    return logprob.logprob if hasattr(logprob, "logprob") else logprob


def test_compiled_forward_matches_eager_and_never_compiles_in_a_request(folder):
    from torch._dynamo.utils import counters

    eager = LLM(str(folder), kvcache_block_size=16, dtype="float32", device="cpu")
    assert eager.engine.runner.compiled is None  # the default: eager
    compiled = LLM(str(folder), kvcache_block_size=16, dtype="float32", device="cpu", compilation_config=3)
    runner = compiled.engine.runner
    assert runner.compiled is not None
    graphs = counters["stats"]["unique_graphs"]
    tokens, logprobs = _run(compiled)
    assert counters["stats"]["unique_graphs"] == graphs  # nothing compiled after LLM()
    assert not runner.compiled._warned  # and no step fell back to eager
    ref_tokens, ref_logprobs = _run(eager)
    assert tokens == ref_tokens
    for seq, ref_seq in zip(logprobs, ref_logprobs):
        for step, ref_step in zip(seq, ref_seq):
            assert step.keys() == ref_step.keys()
            for token in step:
                assert abs(_value(step[token]) - _value(ref_step[token])) < 1e-4


def test_enforce_eager_skips_compilation(folder):
    llm = LLM(str(folder), kvcache_block_size=16, device="cpu", compilation_config=3, enforce_eager=True)
    assert llm.engine.runner.compiled is None
