"""Whole-engine checks on a GPU: Triton backend + CUDA graphs against transformers (bf16) and eager."""

from __future__ import annotations

import random

import pytest
import torch

from allmos import LLM, SamplingParams

pytestmark = pytest.mark.gpu

MAX_NEW = 24


@pytest.fixture(scope="module")
def gpu_model_dir(tmp_path_factory, tiny_model_factory):
    # head_dim 128, GQA 2, a few layers: the shapes of the benchmark model, smaller
    return tiny_model_factory("qwen3", num_kv_heads=4, vocab_size=2048, hidden_size=512, intermediate_size=1024,
                              num_attention_heads=8, num_hidden_layers=4, head_dim=128)


def prompts(n=12, seed=0, vocab=2048):
    rng = random.Random(seed)
    return [[rng.randrange(3, vocab) for _ in range(rng.choice([1, 7, 64, 300, 1100]))] for _ in range(n)]


def agree_under_tie_rule(hf_model, prompt, ours, ours_top5, theirs, tie_gap=0.1):
    """Identical, or diverging first where transformers' top two logits nearly tie, with each side's token
    in the other's top 5."""
    for i, (a, b) in enumerate(zip(ours, theirs)):
        if a == b:
            continue
        with torch.no_grad():
            logits = hf_model(torch.tensor([prompt + theirs[:i]], device="cuda")).logits[0, -1].float()
        top = torch.topk(logits, 5)
        gap = (top.values[0] - top.values[1]).item()
        return gap < tie_gap and a in top.indices.tolist() and b in ours_top5[i]
    return True


def test_greedy_matches_transformers_bf16(gpu_model_dir):
    import transformers

    hf = transformers.AutoModelForCausalLM.from_pretrained(gpu_model_dir, dtype=torch.bfloat16).cuda().eval()
    ps = prompts()
    llm = LLM(str(gpu_model_dir), dtype="bfloat16", kvcache_block_size=16, max_model_len=2048, num_kvcache_blocks=1024)
    outs = llm.generate(ps, SamplingParams(temperature=0, max_tokens=MAX_NEW, ignore_eos=True, logprobs=5),
                        use_tqdm=False)
    exact = 0
    for p, out in zip(ps, outs):
        with torch.no_grad():
            ref = hf.generate(torch.tensor([p], device="cuda"), max_new_tokens=MAX_NEW, min_new_tokens=MAX_NEW,
                              do_sample=False, pad_token_id=0, eos_token_id=None)[0, len(p):].tolist()
        top5 = [list(d.keys()) for d in out.outputs[0].logprobs]
        assert agree_under_tie_rule(hf, p, out.token_ids, top5, ref), (p[:8], out.token_ids, ref)
        exact += out.token_ids == ref
    assert exact >= len(ps) // 2


@pytest.mark.parametrize("block_size", [16, 256])
def test_cuda_graphs_match_eager(gpu_model_dir, block_size):
    ps = prompts(n=21, seed=1)
    params = SamplingParams(temperature=0, max_tokens=MAX_NEW, ignore_eos=True)
    graph = LLM(str(gpu_model_dir), dtype="bfloat16", kvcache_block_size=block_size, max_model_len=2048,
                max_num_seqs=64)
    assert graph.engine.runner.graphs.capture
    eager = LLM(str(gpu_model_dir), dtype="bfloat16", kvcache_block_size=block_size, max_model_len=2048,
                max_num_seqs=64, enforce_eager=True, num_kvcache_blocks=1024)
    assert not eager.engine.runner.graphs.capture  # same padded decode shapes, run eagerly
    a = [o.token_ids for o in graph.generate(ps, params, use_tqdm=False)]
    b = [o.token_ids for o in eager.generate(ps, params, use_tqdm=False)]
    assert a == b


def test_torch_backend_on_gpu_matches_triton(gpu_model_dir):
    ps = prompts(n=6, seed=2)
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    t = LLM(str(gpu_model_dir), dtype="float32", attention_backend="triton", kvcache_block_size=16,
            max_model_len=2048, enforce_eager=True, num_kvcache_blocks=1024)
    r = LLM(str(gpu_model_dir), dtype="float32", attention_backend="torch", kvcache_block_size=16,
            max_model_len=2048, enforce_eager=True, num_kvcache_blocks=1024)
    assert [o.token_ids for o in t.generate(ps, params, use_tqdm=False)] == \
        [o.token_ids for o in r.generate(ps, params, use_tqdm=False)]


def test_dummy_load_and_token_prompts(tmp_path):
    import shutil

    from allmos.benchmark import DEFAULT_BENCH_MODEL

    shutil.copy(DEFAULT_BENCH_MODEL / "config.json", tmp_path / "config.json")
    llm = LLM(str(tmp_path), load_format="dummy", max_model_len=1024, max_num_seqs=8, num_kvcache_blocks=64)
    out = llm.generate([[1, 2, 3]], SamplingParams(max_tokens=4, ignore_eos=True), use_tqdm=False)
    assert len(out[0].token_ids) == 4
    with pytest.raises(ValueError, match="tokenizer"):
        llm.generate("text", SamplingParams(max_tokens=4), use_tqdm=False)


def test_graph_draws_match_eager_sampling(gpu_model_dir):
    """Seeded sampling through the captured draw graphs (plain and filtered: Qwen3's top_k 20 + top_p 0.95,
    min-p) gives the eager engine's tokens, in batches small enough for the filtered draw graphs and larger."""
    kw = dict(dtype="bfloat16", kvcache_block_size=16, max_model_len=2048, max_num_seqs=64, num_kvcache_blocks=1024)
    graph = LLM(str(gpu_model_dir), **kw)
    eager = LLM(str(gpu_model_dir), enforce_eager=True, **kw)
    draws = []
    graphs = graph.engine.runner.graphs
    draw = type(graphs).draw
    graphs.draw = lambda n, cascade=False, filtered=False: draws.append((n, filtered)) or draw(graphs, n, cascade,
                                                                                                 filtered)
    settings = [dict(temperature=0.8), dict(temperature=0.6, top_k=20, top_p=0.95), dict(temperature=1.0, min_p=0.1)]
    try:
        for n in (5, 21):
            ps = prompts(n=n, seed=n)
            for i, setting in enumerate(settings):
                params = [SamplingParams(**setting, seed=100 * i + j, max_tokens=MAX_NEW, ignore_eos=True)
                          for j in range(n)]
                a = [o.token_ids for o in graph.generate(ps, params, use_tqdm=False)]
                b = [o.token_ids for o in eager.generate(ps, params, use_tqdm=False)]
                assert a == b, (n, setting)
    finally:
        del graphs.draw  # the wrapper refers to the graphs: without this the engine outlives the test
    assert any(filtered for _, filtered in draws) and any(not filtered for _, filtered in draws)
