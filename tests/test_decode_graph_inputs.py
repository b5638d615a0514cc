"""The decode-graph input path on the CPU: ``DecodeGraphs(capture=False)`` runs the same padded forward that
the captured graphs run, fed by ``load`` straight into the persistent buffers. Its tokens must equal the
runner's ordinary path (float32, greedy and seeded sampling, batches of odd sizes so padding rows exist)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from allmos import LLM, SamplingParams
from allmos.engine.cuda_graphs import DecodeGraphs
from allmos.engine.step_inputs import HostStep


def _attach_graphs(llm: LLM, max_num_seqs: int) -> DecodeGraphs:
    runner = llm.llm_engine.runner
    max_blocks = -(-runner.max_model_len // runner.block_size)
    graphs = DecodeGraphs(runner.model, runner.backend, runner.kv_caches, max_num_seqs, max_blocks, runner.device,
                          capture=False)
    runner.graphs = graphs
    return graphs


@pytest.fixture(scope="module")
def engines(qwen3_dir):
    kw = dict(dtype="float32", device="cpu", max_model_len=256, kvcache_block_size=16, max_num_seqs=16,
              num_kvcache_blocks=128)
    return LLM(str(qwen3_dir), **kw), LLM(str(qwen3_dir), **kw)


def _prompts(n: int, seed: int) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [rng.integers(3, 200, size=int(rng.integers(1, 40))).tolist() for _ in range(n)]


@pytest.mark.parametrize("num_prompts", [1, 5, 11])
def test_graph_input_path_matches_ordinary_path(engines, num_prompts):
    plain, graphed = engines
    graphs = _attach_graphs(graphed, max_num_seqs=16)
    used = []
    original = graphs.replay
    graphs.replay = lambda n, cascade=False: used.append(n) or original(n, cascade)
    prompts = _prompts(num_prompts, seed=num_prompts)
    params = [SamplingParams(temperature=0, max_tokens=12, ignore_eos=True),
              SamplingParams(temperature=0.8, top_p=0.9, seed=7, max_tokens=12, ignore_eos=True)]
    for sp in params:
        a = plain.generate(prompts, sp, use_tqdm=False)
        b = graphed.generate(prompts, sp, use_tqdm=False)
        assert [o.outputs[0].token_ids for o in a] == [o.outputs[0].token_ids for o in b]
    assert used, "the decode steps did not go through the graph input path"


def test_load_writes_padding_and_block_tables(qwen3_dir, engines):
    graphs = _attach_graphs(engines[1], max_num_seqs=16)
    host = HostStep.for_decode(
        input_ids=np.array([5, 6, 7], np.int64), positions=np.array([3, 20, 0], np.int64),
        slot_mapping=np.array([19, 36, 48], np.int64), seq_lens=np.array([4, 21, 1], np.int64),
        block_tables=np.array([[1, 0], [9, 2], [3, 0]], np.int32), pending=np.array([1], np.int64),
        pending_rows=np.array([0], np.int64))
    input_ids, pending, rows = graphs.load(host)
    views = graphs.inputs[4]  # 3 rows run in the size-4 graph
    assert input_ids.tolist() == [5, 6, 7] and pending.tolist() == [1] and rows.tolist() == [0]
    assert views.input_ids.tolist() == [5, 6, 7, 0]
    assert views.positions.tolist() == [3, 20, 0, 0]
    assert views.slot_mapping.tolist() == [19, 36, 48, -1]
    assert views.seq_lens.tolist() == [4, 21, 1, 0]
    assert views.block_tables[:3, :2].tolist() == [[1, 0], [9, 2], [3, 0]]
    assert torch.equal(input_ids, views.input_ids[:3])
