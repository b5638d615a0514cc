"""The decode-graph input path on the CPU: ``DecodeGraphs(capture=False)`` runs the same padded forward that
the captured graphs run, fed by ``load`` straight into the persistent buffers. Its tokens must equal the
runner's ordinary path (float32, greedy and seeded sampling, batches of odd sizes so padding rows exist)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from allmos import LLM, SamplingParams
from allmos.engine import cuda_graphs
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


PLAIN = [SamplingParams(temperature=0, max_tokens=12, ignore_eos=True),
         SamplingParams(temperature=0.9, seed=3, max_tokens=12, ignore_eos=True)]
NEEDS_SAMPLER = [SamplingParams(temperature=0.8, top_p=0.9, seed=7, max_tokens=12, ignore_eos=True),
                 SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, logprobs=1)]
# drawn by the graphs' filtered draw (top-k up to 64, top-p beside it, min-p)
FILTERED = [SamplingParams(temperature=0.8, top_k=20, top_p=0.9, seed=5, max_tokens=12, ignore_eos=True),
            SamplingParams(temperature=1.1, min_p=0.2, seed=6, max_tokens=12, ignore_eos=True)]


def _count_calls(graphs: DecodeGraphs, name: str) -> list[int]:
    calls = []
    original = getattr(graphs, name)
    setattr(graphs, name, lambda n, cascade=False, *rest: calls.append((n, *rest)) or original(n, cascade, *rest))
    return calls


@pytest.mark.parametrize("num_prompts", [1, 5, 11])
@pytest.mark.parametrize("params", [PLAIN[0], PLAIN[1], PLAIN, NEEDS_SAMPLER[0], NEEDS_SAMPLER[1],
                                    [PLAIN[1], NEEDS_SAMPLER[0]], FILTERED, [PLAIN[0], FILTERED[0]]],
                         ids=lambda p: "mixed" if isinstance(p, list) else None)
def test_graph_input_path_matches_ordinary_path(engines, num_prompts, params):
    """Greedy and temperature-only batches are drawn inside the graphs, and so are batches with small top-k,
    top-p beside it or min-p (the filtered draw); batches with a row that needs the sampler (top-p alone,
    logprobs) are sampled by it from the graphs' logits. Same tokens either way (a list of params alternates
    them over the prompts, so a batch may mix greedy, random and filtered rows)."""
    plain, graphed = engines
    graphs = _attach_graphs(graphed, max_num_seqs=16)
    replays, draws = _count_calls(graphs, "replay"), _count_calls(graphs, "draw")
    prompts = _prompts(num_prompts, seed=num_prompts)
    listed = params if isinstance(params, list) else [params]
    params = [listed[i % len(listed)] for i in range(num_prompts)]
    a = plain.generate(prompts, params, use_tqdm=False)
    b = graphed.generate(prompts, params, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in a] == [o.outputs[0].token_ids for o in b]
    assert replays, "the decode steps did not go through the graph input path"
    if any(p in NEEDS_SAMPLER for p in params):
        assert not draws
    else:
        assert len(draws) == len(replays)
        filtered = any(p in FILTERED for p in params)
        assert all(bool(d[1:] and d[1]) == filtered for d in draws)  # the filtered draw when a filter is on


def test_filtered_batches_above_the_filtered_sizes_use_the_sampler(engines, monkeypatch):
    """Only sizes up to FILTERED_DRAW_MAX_BATCH have a filtered draw; a larger filtered batch is sampled by
    the runner's sampler from the graphs' logits (same tokens), and a plain one is still drawn."""
    monkeypatch.setattr(cuda_graphs, "FILTERED_DRAW_MAX_BATCH", 4)
    plain, graphed = engines
    graphs = _attach_graphs(graphed, max_num_seqs=16)
    draws = _count_calls(graphs, "draw")
    prompts = _prompts(7, seed=3)
    params = [SamplingParams(temperature=0.8, top_k=20, top_p=0.9, seed=5, max_tokens=3 + 2 * i, ignore_eos=True)
              for i in range(7)]  # the batch shrinks from 7 rows to 1
    a = plain.generate(prompts, params, use_tqdm=False)
    b = graphed.generate(prompts, params, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in a] == [o.outputs[0].token_ids for o in b]
    assert draws and all(n <= 4 for n, *_ in draws)  # the larger steps went to the sampler
    assert graphs.draws_filtered(4) and not graphs.draws_filtered(5)
    with pytest.raises(ValueError, match="no filtered draw"):
        graphs.draw(7, False, True)


def test_load_writes_padding_block_tables_and_draw_columns(qwen3_dir, engines):
    graphs = _attach_graphs(engines[1], max_num_seqs=16)
    graphs.store_sampled(torch.tensor([99, 98], dtype=torch.int64))  # the previous step sampled 2 rows
    host = HostStep.for_decode(
        input_ids=np.array([5, 0, 7], np.int64), positions=np.array([3, 20, 0], np.int64),
        slot_mapping=np.array([19, 36, 48], np.int64), seq_lens=np.array([4, 21, 1], np.int64),
        block_tables=np.array([[1, 0], [9, 2], [3, 0]], np.int32), pending=np.array([1], np.int64),
        pending_rows=np.array([1], np.int64))
    columns = [np.array([1, 2, 3], np.int32), np.array([-4, 5, 6], np.int32),
               np.array([0.5, 1.0, 2.0], np.float32).view(np.int32), np.array([1, 0, 1], np.float32).view(np.int32),
               np.array([20, 300, 7], np.int32), np.array([0.9, 1.0, 0.5], np.float32).view(np.int32),
               np.array([0.0, 0.1, 0.0], np.float32).view(np.int32)]
    graphs.load(host, columns)
    views = graphs.inputs[4]  # 3 rows run in the size-4 graph
    assert views.input_ids.tolist() == [5, 0, 7, 0]
    assert graphs.i64[views.input_index].tolist() == [5, 98, 7, 0]  # row 1 takes the previous step's row 1
    assert views.positions.tolist() == [3, 20, 0, 0]
    assert views.slot_mapping.tolist() == [19, 36, 48, -1]
    assert views.seq_lens.tolist() == [4, 21, 1, 0]
    assert views.block_tables[:3, :2].tolist() == [[1, 0], [9, 2], [3, 0]]
    lo, hi, inv_t, noise, top_k, top_p, min_p = views.draw_columns
    assert lo.tolist() == [1, 2, 3, 0] and hi.tolist() == [-4, 5, 6, 0]
    assert inv_t.view(torch.float32).tolist() == [0.5, 1.0, 2.0, 0.0]
    assert noise.view(torch.float32).tolist() == [1.0, 0.0, 1.0, 0.0]
    assert top_k.tolist() == [20, 300, 7, 0]
    assert top_p.view(torch.float32).tolist() == pytest.approx([0.9, 1.0, 0.5, 0.0])
    assert min_p.view(torch.float32).tolist() == pytest.approx([0.0, 0.1, 0.0, 0.0])
    graphs.load(host)  # a step sampled outside the graphs: the columns are zeros
    assert all(c.tolist() == [0, 0, 0, 0] for c in views.draw_columns)
