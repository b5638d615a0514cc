"""Greedy output equals transformers' generate, token for token, across engine configurations."""

from __future__ import annotations

import random

import pytest
from hf_reference import hf_greedy

from allmos import LLM, SamplingParams

MAX_NEW = 12


def make_prompts(seed: int = 0, n: int = 9, vocab: int = 512) -> list[list[int]]:
    rng = random.Random(seed)
    lengths = [1, 3, 17, 40, 64, 90, 130, 200, 33][:n]
    return [[rng.randrange(3, vocab) for _ in range(length)] for length in lengths]


def run(folder, prompts, **kwargs):
    llm = LLM(str(folder), **kwargs)
    outs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=MAX_NEW, ignore_eos=True), use_tqdm=False)
    bm = llm.engine.block_manager
    bm.check_integrity()
    assert bm.num_free_blocks == bm.num_blocks, "every block must be free after generate"
    return llm, [o.token_ids for o in outs]


CONFIGS = {
    "prefix_on": dict(kvcache_block_size=16),
    "prefix_off": dict(kvcache_block_size=16, enable_prefix_caching=False),
    "chunked": dict(kvcache_block_size=16, max_num_batched_tokens=24),
    "block256": dict(kvcache_block_size=256),
    "few_seqs": dict(kvcache_block_size=16, max_num_seqs=3),
}


@pytest.mark.parametrize("name", list(CONFIGS))
def test_greedy_matches_transformers(qwen3_dir, name):
    prompts = make_prompts()
    _, ours = run(qwen3_dir, prompts, **CONFIGS[name])
    assert ours == hf_greedy(qwen3_dir, prompts, MAX_NEW)


def test_preemption_by_recompute_keeps_tokens(qwen3_dir):
    rng = random.Random(3)
    prompts = [[rng.randrange(3, 512) for _ in range(n)] for n in (15, 14, 13, 15, 12, 15, 11, 15)]
    # All eight fit one block each at admission; each needs a second block while decoding, and
    # 10 blocks cannot hold 16: the newest running sequences get preempted and recomputed.
    llm, ours = run(qwen3_dir, prompts, kvcache_block_size=16, num_kvcache_blocks=10)
    assert llm.engine.scheduler.num_preemptions > 0
    assert ours == hf_greedy(qwen3_dir, prompts, MAX_NEW)


@pytest.mark.parametrize("arch,kwargs", [
    ("qwen3", dict(num_kv_heads=4)),            # MHA
    ("qwen3", dict(num_kv_heads=1, tie=True)),  # MQA, tied head
    ("qwen3", dict(num_kv_heads=2, tie=True)),  # GQA, tied head
])
def test_shapes_and_heads(tiny_model_factory, arch, kwargs):
    folder = tiny_model_factory(arch, **kwargs)
    prompts = make_prompts(seed=1, n=8)
    _, ours = run(folder, prompts, kvcache_block_size=16, max_num_batched_tokens=64)
    assert ours == hf_greedy(folder, prompts, MAX_NEW)


def test_shared_prefix_hits_cache(qwen3_dir):
    rng = random.Random(5)
    prefix = [rng.randrange(3, 512) for _ in range(100)]
    first = [prefix + [rng.randrange(3, 512) for _ in range(k)] for k in (3, 9)]
    second = [prefix + [rng.randrange(3, 512) for _ in range(k)] for k in (5, 20, 1)]
    llm = LLM(str(qwen3_dir), kvcache_block_size=16)
    params = SamplingParams(temperature=0, max_tokens=MAX_NEW, ignore_eos=True)
    llm.generate(first, params, use_tqdm=False)
    outs = llm.generate(second, params, use_tqdm=False)
    assert all(o.num_cached_tokens >= 96 for o in outs)  # 6 full blocks of the shared 100-token prefix
    assert [o.token_ids for o in outs] == hf_greedy(qwen3_dir, second, MAX_NEW)
    llm.engine.block_manager.check_integrity()
