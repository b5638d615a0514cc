"""Cascade attention through the whole engine: requests on cached prompt prefixes give the same greedy tokens
with ``enable_cascade_attention`` on and off, and the same as the torch backend (the oracle).

On the CPU the Triton backend runs through the interpreter (``TRITON_INTERPRET=1``, set by conftest.py), so
the shapes stay tiny; the sharing threshold is lowered to match (``DEFAULT_CASCADE_POLICY``). One run also
routes decode steps through ``DecodeGraphs`` in eager mode (the padded shapes and persistent buffers of the
CUDA graphs): requests finish at different steps, so batch sizes, padding and groups change between steps
and no step may see an earlier one's groups. The ``gpu`` case runs the comparison with CUDA graphs on
realistic sizes.
"""

from __future__ import annotations

import os
import random

import numpy as np
import pytest
import torch

from allmos import LLM, SamplingParams
from allmos.attention import cascade, triton_backend
from allmos.attention.metadata import AttentionMetadata
from allmos.attention.torch_backend import TorchAttentionBackend
from allmos.config import EngineConfig
from allmos.engine.cuda_graphs import DecodeGraphs
from allmos.engine.step_inputs import HostStep

needs_triton = pytest.mark.skipif(not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1",
                                  reason="the Triton backend needs CUDA or TRITON_INTERPRET=1")


def shared_prompts(num: int, prefix_len: int, rng: random.Random) -> tuple[list[int], list[list[int]]]:
    prefix = [rng.randrange(3, 500) for _ in range(prefix_len)]
    return prefix, [prefix + [rng.randrange(3, 500) for _ in range(rng.randint(1, 9))] for _ in range(num)]


def generate(model_dir, prefixes: list[list[int]], prompts: list[list[int]], max_tokens: list[int],
             eager_graphs: bool = False, **engine) -> list[list[int]]:
    """Greedy tokens of ``prompts`` after one request per prefix that puts it into the prefix cache."""
    llm = LLM(str(model_dir), **engine)
    if eager_graphs:
        runner = llm.llm_engine.runner
        runner.graphs = DecodeGraphs(runner.model, runner.backend, runner.kv_caches, runner.config.max_num_seqs,
                                     -(-runner.max_model_len // runner.block_size), runner.device, capture=False)
    llm.generate([p + [7] for p in prefixes], SamplingParams(temperature=0.0, max_tokens=1), use_tqdm=False)
    params = [SamplingParams(temperature=0.0, max_tokens=m, ignore_eos=True) for m in max_tokens]
    outs = llm.generate(prompts, params, use_tqdm=False)
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
    rng = random.Random(0)
    # two prompt prefixes (2 and 1 shared blocks of 16; their last tokens sit in each request's own block),
    # requests of both interleaved, finishing after 2 to 5 tokens
    prefix_a, on_a = shared_prompts(4, 40, rng)
    prefix_b, on_b = shared_prompts(3, 20, rng)
    prompts = [p for pair in zip(on_a, on_b + [None]) for p in pair if p is not None]
    max_tokens = [5, 2, 4, 3, 5, 4, 2]
    engine = dict(dtype="float32", kvcache_block_size=16, max_model_len=128, num_kvcache_blocks=64, seed=0,
                  max_num_seqs=8)
    engine.update({} if torch.cuda.is_available() else {"device": "cpu"})
    args = ([prefix_a, prefix_b], prompts, max_tokens)
    on = generate(qwen3_dir, *args, attention_backend="triton", enable_cascade_attention=True, **engine)
    with_cascade = calls[0]
    off = generate(qwen3_dir, *args, attention_backend="triton", enable_cascade_attention=False, **engine)
    assert calls[0] == with_cascade >= 3 * 2  # decode steps used it (2 layers); never with the option off
    graphs = generate(qwen3_dir, *args, eager_graphs=True, attention_backend="triton", **engine)
    assert calls[0] > with_cascade
    oracle = generate(qwen3_dir, *args, attention_backend="torch", **engine)
    assert on == off == graphs == oracle


def test_option_is_validated():
    with pytest.raises(ValueError, match="enable_cascade_attention"):
        EngineConfig.from_kwargs(None, enable_cascade_attention="yes")


@pytest.mark.gpu
def test_greedy_tokens_equal_with_cascade_on_and_off_gpu(qwen3_dir):
    prefix, prompts = shared_prompts(48, 700, random.Random(1))  # 48 x 43 blocks of 16: above the threshold
    engine = dict(dtype="float32", kvcache_block_size=16, max_model_len=1024, seed=0, gpu_memory_utilization=0.3)
    max_tokens = [12 - i % 5 for i in range(48)]
    on = generate(qwen3_dir, [prefix], prompts, max_tokens, enable_cascade_attention=True, **engine)
    off = generate(qwen3_dir, [prefix], prompts, max_tokens, enable_cascade_attention=False, **engine)
    assert on == off


class _OneMemberTiles(TorchAttentionBackend):
    cascade_members_per_tile = 1  # one tile per member: the tile count follows the batch size


def test_decode_graph_buffers_hold_only_the_current_groups():
    """What a size-``bs`` cascade graph reads after ``load``: this step's groups, zeros elsewhere (a stale
    tile would make the prefix kernel overwrite another sequence's partials)."""
    cache = torch.zeros(4, 16, 1, 16)
    graphs = DecodeGraphs(torch.nn.Identity(), _OneMemberTiles(), [(cache, cache)], max_num_seqs=16,
                          max_blocks_per_seq=4, device=torch.device("cpu"), capture=False)

    def step(groups: list[cascade.CascadeGroup], n: int, bs: int) -> AttentionMetadata:
        arrays = cascade.cascade_arrays(groups, n, 1)
        zeros = np.zeros(n, dtype=np.int64)
        host = HostStep.for_decode(zeros, zeros, zeros, np.ones(n, dtype=np.int64), np.zeros((n, 4), dtype=np.int32),
                                np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64), arrays)
        graphs.load(host)
        assert graphs.size_for(n) == bs
        return graphs._metadata(bs, graphs.inputs[bs], cascade=True)

    step([cascade.CascadeGroup(np.arange(16), 3)], 16, 16)  # every buffer entry non-zero
    seen = step([cascade.CascadeGroup(np.array([0, 2]), 1), cascade.CascadeGroup(np.array([1, 3, 4]), 2)], 5, 8)
    assert seen.cascade_tiles.shape == (cascade.tile_capacity(8, 1), 3)
    assert seen.cascade_tiles[:5].tolist() == [[0, 0, 1], [0, 1, 1], [1, 2, 1], [1, 3, 1], [1, 4, 1]]
    assert not seen.cascade_tiles[5:].any()
    assert seen.cascade_prefix_blocks.tolist() == [1, 2, 1, 2, 2, 0, 0, 0]
    assert seen.cascade_members[:5].tolist() == [0, 2, 1, 3, 4]
