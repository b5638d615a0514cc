"""The compiled CPU forward (compilation_config=3: one decoder layer; 2: the whole forward): same tokens and
logprobs as the eager forward, every graph compiled inside LLM(), none inside requests. Small models, because
compiling is slow here."""

from __future__ import annotations

import pytest

from allmos import LLM, SamplingParams


@pytest.fixture(scope="module")
def folder(tiny_model_factory):
    return tiny_model_factory("qwen3", num_hidden_layers=2)


def _run(llm: LLM):
    prompts = [[5, 6, 7], [9] * 40, [3, 1, 4, 1, 5, 9, 2, 6], [11]]
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True, logprobs=2)
    outs = llm.generate([prompts[0]], params, use_tqdm=False)  # batch of one
    outs += llm.generate(prompts, params, use_tqdm=False)  # prefill of several, decode batches of 4..1
    return [o.token_ids for o in outs], [o.outputs[0].logprobs for o in outs]


def _value(logprob) -> float:
    return logprob.logprob if hasattr(logprob, "logprob") else logprob


def _assert_same(tokens, logprobs, ref_tokens, ref_logprobs):
    assert tokens == ref_tokens
    for seq, ref_seq in zip(logprobs, ref_logprobs):
        for step, ref_step in zip(seq, ref_seq):
            assert step.keys() == ref_step.keys()
            for token in step:
                assert abs(_value(step[token]) - _value(ref_step[token])) < 1e-4


def _compiled_run(folder, level: int):
    """(tokens, logprobs) of a compiled engine; asserts that LLM() compiled two graphs (one token, dynamic
    token count), whatever the number of layers, and that requests compiled nothing and never ran eagerly."""
    from torch._dynamo.utils import counters

    before = counters["stats"]["unique_graphs"]
    llm = LLM(str(folder), kvcache_block_size=16, dtype="float32", device="cpu", compilation_config=level)
    runner = llm.engine.runner
    assert runner.compiled is not None and runner.compiled.level == level
    graphs = counters["stats"]["unique_graphs"]
    assert graphs - before == 2  # level 3: one layer's graphs serve both layers
    result = _run(llm)
    assert counters["stats"]["unique_graphs"] == graphs  # nothing compiled after LLM()
    assert not runner.compiled._warned  # and no step fell back to eager
    if level == 3:  # steps called the layer's graphs directly, warm-up having found that equal
        assert runner.compiled._direct.usable and runner.compiled._direct.checked > 0
    return result


@pytest.fixture(scope="module")
def eager_run(folder):
    llm = LLM(str(folder), kvcache_block_size=16, dtype="float32", device="cpu")
    assert llm.engine.runner.compiled is None  # the default: eager
    return _run(llm)


@pytest.mark.parametrize("level", [3, 2])
def test_compiled_forward_matches_eager_and_never_compiles_in_a_request(folder, eager_run, level):
    _assert_same(*_compiled_run(folder, level), *eager_run)


def test_layerwise_compile_serves_dynamic_ntk_rope(tiny_model_factory):
    """Level 3 computes the RoPE tables eagerly, so dynamic NTK scaling (per-step sequence lengths) compiles;
    prompts beyond max_position_embeddings take the scaled frequencies."""
    folder = tiny_model_factory("llama", num_hidden_layers=2, rope_theta=2000.0, max_position_embeddings=32,
                                rope_scaling={"rope_type": "dynamic", "factor": 2.0})
    eager = LLM(str(folder), kvcache_block_size=16, dtype="float32", device="cpu")
    _assert_same(*_compiled_run(folder, 3), *_run(eager))


def test_enforce_eager_skips_compilation(folder):
    llm = LLM(str(folder), kvcache_block_size=16, device="cpu", compilation_config=3, enforce_eager=True)
    assert llm.engine.runner.compiled is None


def test_compilation_config_levels():
    from allmos.config import EngineConfig

    with pytest.raises(ValueError, match="compilation_config"):
        EngineConfig.from_kwargs(None, compilation_config=1)
    assert not EngineConfig.from_kwargs(None, compilation_config=0).compile_cpu_forward
    assert EngineConfig.from_kwargs(None, compilation_config=2).compile_cpu_forward


def test_layers_alike_tells_layer_kinds_apart(folder):
    """Level 3 drops the guards on modules only when one traced layer stands for every layer."""
    import torch

    from allmos.engine.cpu_compile import layers_alike

    llm = LLM(str(folder), kvcache_block_size=16, dtype="float32", device="cpu")
    layers = llm.engine.runner.model.model.layers
    assert layers_alike(layers)  # the layer index differs, and is a tensor input of the graph
    layers[1].input_layernorm.eps *= 2
    assert not layers_alike(layers)
    layers[1].input_layernorm.eps /= 2
    layers[1].mlp.down_proj.weight.data = layers[1].mlp.down_proj.weight.data.to(torch.bfloat16)
    assert not layers_alike(layers)
