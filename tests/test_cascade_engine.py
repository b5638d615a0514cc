"""Cascade attention through the whole engine: many requests on one cached prompt prefix give the same greedy
tokens with ``enable_cascade_attention`` on and off, and the same as the torch backend (the oracle).

On the CPU the Triton backend runs through the interpreter (``TRITON_INTERPRET=1``, set by conftest.py), so
the shapes stay tiny; the sharing threshold is lowered to match (``DEFAULT_CASCADE_POLICY``). The ``gpu``
case runs the same comparison with CUDA graphs on realistic sizes.
"""

from __future__ import annotations

import os
import random

import pytest
import torch

from allmos import LLM, SamplingParams
from allmos.attention import cascade, triton_backend
from allmos.config import EngineConfig

needs_triton = pytest.mark.skipif(not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1",
                                  reason="the Triton backend needs CUDA or TRITON_INTERPRET=1")


def shared_prompts(num: int, prefix_len: int, seed: int) -> tuple[list[int], list[list[int]]]:
    rng = random.Random(seed)
    prefix = [rng.randrange(3, 500) for _ in range(prefix_len)]
    return prefix, [prefix + [rng.randrange(3, 500) for _ in range(rng.randint(1, 9))] for _ in range(num)]


def generate(model_dir, prompts: list[list[int]], prefix: list[int], max_tokens: int, **engine) -> list[list[int]]:
    """Greedy tokens of ``prompts`` after one request that puts ``prefix`` into the prefix cache."""
    llm = LLM(str(model_dir), **engine)
    greedy = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    llm.generate([prefix + [7]], SamplingParams(temperature=0.0, max_tokens=1), use_tqdm=False)
    outs = llm.generate(prompts, greedy, use_tqdm=False)
    llm.shutdown()
    return [o.outputs[0].token_ids for o in outs]


def count_calls(monkeypatch) -> list[int]:
    calls = [0]
    original = triton_backend.cascade_decode_attention

    def counted(*args, **kwargs):
        calls[0] += 1
        return original(*args, **kwargs)

    monkeypatch.setattr(triton_backend, "cascade_decode_attention", counted)
    return calls


@needs_triton
def test_greedy_tokens_equal_with_cascade_on_and_off(qwen3_dir, monkeypatch):
    monkeypatch.setattr(cascade, "DEFAULT_CASCADE_POLICY", cascade.CascadePolicy(min_saved_tokens=0))
    calls = count_calls(monkeypatch)
    prefix, prompts = shared_prompts(6, 40, seed=0)  # 2 shared blocks of 16; tokens 32..39 in each own block
    engine = dict(dtype="float32", kvcache_block_size=16, max_model_len=128, num_kvcache_blocks=48, seed=0)
    device = {} if torch.cuda.is_available() else {"device": "cpu"}
    on = generate(qwen3_dir, prompts, prefix, 4, attention_backend="triton", enable_cascade_attention=True,
                  **engine, **device)
    with_cascade = calls[0]
    off = generate(qwen3_dir, prompts, prefix, 4, attention_backend="triton", enable_cascade_attention=False,
                   **engine, **device)
    oracle = generate(qwen3_dir, prompts, prefix, 4, attention_backend="torch", **engine, **device)
    num_layers = 2
    assert with_cascade >= 3 * num_layers and calls[0] == with_cascade  # decode steps used it; off never
    assert on == off == oracle


def test_option_is_validated():
    with pytest.raises(ValueError, match="enable_cascade_attention"):
        EngineConfig.from_kwargs(None, enable_cascade_attention="yes")


@pytest.mark.gpu
def test_greedy_tokens_equal_with_cascade_on_and_off_gpu(qwen3_dir):
    prefix, prompts = shared_prompts(48, 700, seed=1)  # 48 x 43 blocks of 16 shared: far above the threshold
    engine = dict(dtype="float32", kvcache_block_size=16, max_model_len=1024, seed=0, gpu_memory_utilization=0.3)
    on = generate(qwen3_dir, prompts, prefix, 12, enable_cascade_attention=True, **engine)
    off = generate(qwen3_dir, prompts, prefix, 12, enable_cascade_attention=False, **engine)
    assert on == off
