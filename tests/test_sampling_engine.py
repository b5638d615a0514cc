"""The request side through the whole engine: seeds, n, abort, stop strings, logprobs, streaming."""

from __future__ import annotations

import random

import pytest
import torch
from hf_reference import hf_logits

from allmos import LLM, SamplingParams


@pytest.fixture(scope="module")
def llm(qwen3_dir):
    return LLM(str(qwen3_dir), kvcache_block_size=16)


def prompts(n, seed=0):
    rng = random.Random(seed)
    return [[rng.randrange(3, 512) for _ in range(rng.randint(1, 40))] for _ in range(n)]


def assert_all_blocks_free(llm):
    bm = llm.engine.block_manager
    bm.check_integrity()
    assert bm.num_free_blocks == bm.num_blocks


def test_top_k_1_and_tiny_top_p_equal_greedy(llm):
    ps = prompts(4)
    greedy = [o.token_ids for o in llm.generate(ps, SamplingParams(temperature=0, max_tokens=10), use_tqdm=False)]
    for params in (SamplingParams(temperature=1.0, top_k=1, max_tokens=10, seed=3),
                   SamplingParams(temperature=0.8, top_p=1e-6, max_tokens=10, seed=4)):
        assert [o.token_ids for o in llm.generate(ps, params, use_tqdm=False)] == greedy


def test_seeded_request_is_batch_invariant(llm):
    target = prompts(1, seed=9)[0]
    seeded = SamplingParams(temperature=1.0, top_p=0.9, seed=1234, max_tokens=16, ignore_eos=True)
    alone = llm.generate([target], seeded, use_tqdm=False)[0].token_ids
    others = [SamplingParams(temperature=t, top_k=k, max_tokens=m, ignore_eos=True)
              for t, k, m in [(0, -1, 5), (1.5, 20, 30), (0.7, -1, 9), (1.0, 5, 12), (0.3, -1, 20), (2.0, -1, 3),
                              (1.0, 50, 7)]]
    mixed_prompts = prompts(7, seed=10)
    mixed_prompts.insert(3, target)
    mixed_params = others[:3] + [seeded] + others[3:]
    outs = llm.generate(mixed_prompts, mixed_params, use_tqdm=False)
    assert outs[3].token_ids == alone
    unseeded = llm.generate([target] * 2, SamplingParams(temperature=1.0, max_tokens=16, ignore_eos=True),
                            use_tqdm=False)
    assert unseeded[0].token_ids != unseeded[1].token_ids  # unseeded requests draw their own seeds


def test_n_returns_distinct_completions_sharing_prompt_blocks(llm):
    p = [t for t in prompts(3, seed=5) for t in t][:50]  # 50 tokens: three full blocks of 16
    engine = llm.engine
    rid = engine.add_request(None, p, SamplingParams(n=3, temperature=1.0, max_tokens=8, seed=7, ignore_eos=True))
    seqs = engine.core.sequences(rid)
    out = None
    while out is None:
        out = next((o for o in engine.step() if o.request_id == rid), None)
    assert len(out.outputs) == 3 and [c.index for c in out.outputs] == [0, 1, 2]
    assert len({tuple(c.token_ids) for c in out.outputs}) > 1
    assert all(c.finish_reason == "length" and len(c.token_ids) == 8 for c in out.outputs)
    assert [s.num_cached_tokens for s in seqs[1:]] == [48, 48]  # siblings reuse the first one's prompt blocks
    assert_all_blocks_free(llm)
    aborted = engine.add_request(None, p, SamplingParams(n=2, max_tokens=50, ignore_eos=True))
    engine.step()
    assert engine.abort(aborted).outputs[1].finish_reason == "abort"  # a sibling that never started
    assert_all_blocks_free(llm)


def test_abort_mid_generation_frees_blocks(llm):
    engine = llm.engine
    rid = engine.add_request("to-abort", prompts(1)[0], SamplingParams(max_tokens=200, ignore_eos=True))
    keep = engine.add_request("keep", prompts(1, seed=2)[0], SamplingParams(max_tokens=5, ignore_eos=True))
    for _ in range(4):
        engine.step()
    out = engine.abort(rid)
    assert out.finished and out.outputs[0].finish_reason == "abort"
    assert 0 < len(out.outputs[0].token_ids) < 200 and -1 not in out.outputs[0].token_ids
    done = {}
    while engine.has_unfinished():
        for o in engine.step():
            if o.finished:
                done[o.request_id] = o
    assert done[keep].outputs[0].finish_reason == "length" and len(done[keep].outputs[0].token_ids) == 5
    assert done[rid].outputs[0].finish_reason == "abort"  # also delivered through step()
    assert_all_blocks_free(llm)


def test_stop_token_ids_and_min_tokens(llm):
    p = prompts(1, seed=11)[0]
    free = llm.generate([p], SamplingParams(temperature=0, max_tokens=12, ignore_eos=True), use_tqdm=False)[0]
    stop_at = free.token_ids[4]
    first = free.token_ids.index(stop_at)
    out = llm.generate([p], SamplingParams(temperature=0, max_tokens=12, stop_token_ids=[stop_at]),
                       use_tqdm=False)[0]
    assert out.token_ids == free.token_ids[: first + 1]
    assert out.outputs[0].finish_reason == "stop" and out.outputs[0].stop_reason == stop_at
    banned = llm.generate([p], SamplingParams(temperature=0, max_tokens=12, stop_token_ids=[stop_at],
                                              min_tokens=12), use_tqdm=False)[0]
    assert stop_at not in banned.token_ids[:11] and len(banned.token_ids) == 12


def test_greedy_logprobs_match_transformers(llm, qwen3_dir):
    p = prompts(1, seed=12)[0]
    out = llm.generate([p], SamplingParams(temperature=0, max_tokens=6, logprobs=3), use_tqdm=False)[0]
    completion = out.outputs[0]
    logits = hf_logits(qwen3_dir, p + completion.token_ids[:-1])[len(p) - 1:]
    ref = torch.log_softmax(logits, dim=-1)
    total = 0.0
    for step, (token, entry) in enumerate(zip(completion.token_ids, completion.logprobs)):
        assert abs(entry[token].logprob - ref[step, token].item()) < 1e-4
        top = torch.topk(ref[step], 3)
        for tid, val in zip(top.indices.tolist(), top.values.tolist()):
            assert abs(entry[tid].logprob - val) < 1e-4
        total += entry[token].logprob
    assert abs(completion.cumulative_logprob - total) < 1e-4


def test_penalties_change_output_through_engine(llm):
    p = prompts(1, seed=13)[0]
    base = llm.generate([p], SamplingParams(temperature=0, max_tokens=20, ignore_eos=True), use_tqdm=False)[0]
    pen = llm.generate([p], SamplingParams(temperature=0, max_tokens=20, ignore_eos=True,
                                           repetition_penalty=2.0, frequency_penalty=1.5), use_tqdm=False)[0]
    assert len(set(pen.token_ids)) >= len(set(base.token_ids))
    assert pen.token_ids != base.token_ids


# ---------------------------------------------------------------- with a real byte-level tokenizer

@pytest.fixture(scope="module")
def tok_llm(tiny_llama_real_tokenizer):
    return LLM(str(tiny_llama_real_tokenizer), kvcache_block_size=16)


def test_stream_deltas_concatenate_with_multibyte_text(tok_llm):
    tok = tok_llm.tokenizer
    saw_split_char = False
    for seed in range(4):
        params = SamplingParams(temperature=1.0, max_tokens=40, seed=seed, ignore_eos=True)
        deltas, final = [], None
        for delta in tok_llm.stream("日本語のテキスト 🙂 héllo", params):
            assert "\ufffd" not in delta["text"] or "\ufffd" in delta["output"].outputs[0].text
            deltas.append(delta["text"])
            final = delta["output"]
        text = final.outputs[0].text
        assert "".join(deltas) == text
        assert text == tok.decode(final.outputs[0].token_ids, skip_special_tokens=True)
        pieces = [tok.decode([t]) for t in final.outputs[0].token_ids]
        saw_split_char |= any("\ufffd" in piece for piece in pieces)
    assert saw_split_char, "the test should exercise characters split across tokens"
    assert_all_blocks_free(tok_llm)


def _spanning_stop(tok, token_ids: list[int], text: str) -> tuple[str, int] | None:
    """A stop string that starts inside one token's text and ends inside the next one's, and first occurs
    there; returns (stop, offset of its first character)."""
    ends = [len(tok.decode(token_ids[: i + 1])) for i in range(len(token_ids))]
    clean = [not tok.decode(token_ids[: i + 1]).endswith("\ufffd") for i in range(len(token_ids))]
    for i in range(1, len(ends) - 1):
        start_left, boundary, end_right = ends[i - 1], ends[i], ends[i + 1]
        if not (clean[i - 1] and clean[i] and clean[i + 1]) or boundary - start_left < 1 or end_right - boundary < 1:
            continue
        for left in (2, 1):
            for right in (2, 1):
                if boundary - left < start_left or boundary + right > end_right:
                    continue
                stop = text[boundary - left: boundary + right]
                if "\ufffd" not in stop and stop.strip() and text.find(stop) == boundary - left:
                    return stop, boundary - left
    return None


@pytest.fixture(scope="module")
def default_llm(default_model_dir):
    return LLM(str(default_model_dir), kvcache_block_size=16, max_model_len=512)


def test_stop_string_spanning_two_tokens(default_llm):
    tok = default_llm.tokenizer
    base = dict(temperature=0, max_tokens=30, ignore_eos=True)
    free = default_llm.generate("The quick brown fox", SamplingParams(**base), use_tqdm=False)[0].outputs[0]
    found = _spanning_stop(tok, free.token_ids, free.text)
    assert found, "no token boundary to test on"
    stop, cut = found
    for include in (False, True):
        out = default_llm.generate("The quick brown fox", SamplingParams(**base, stop=[stop],
                                                                    include_stop_str_in_output=include),
                               use_tqdm=False)[0].outputs[0]
        assert out.text == (free.text[: cut + len(stop)] if include else free.text[:cut])
        assert out.finish_reason == "stop" and out.stop_reason == stop


def test_min_tokens_defers_stop_strings(default_llm):
    """A stop string that ends inside the first min_tokens tokens' text does not stop the request."""
    base = dict(temperature=0, max_tokens=30, ignore_eos=True)
    free = default_llm.generate("The quick brown fox", SamplingParams(**base), use_tqdm=False)[0].outputs[0]
    tok = default_llm.tokenizer
    assert tok.decode(free.token_ids) == free.text  # so token counts map to character offsets
    stop = free.text.lstrip()[:2]
    early = default_llm.generate("The quick brown fox", SamplingParams(**base, stop=[stop]),
                                 use_tqdm=False)[0].outputs[0]
    assert early.finish_reason == "stop" and early.text == free.text[:free.text.find(stop)]
    min_tokens = 4
    boundary = len(tok.decode(free.token_ids[:min_tokens]))
    found = free.text.find(stop, max(boundary - len(stop) + 1, 0))
    late = default_llm.generate("The quick brown fox", SamplingParams(**base, stop=[stop], min_tokens=min_tokens),
                                use_tqdm=False)[0].outputs[0]
    assert late.text == (free.text if found < 0 else free.text[:found])
    assert late.finish_reason == ("length" if found < 0 else "stop")
    assert len(late.token_ids) > min_tokens


def test_warm_up_leaves_no_trace(qwen3_dir):
    """The GPU start-up warm-up (run here on the CPU) leaves no request, no count and an untouched RNG:
    unseeded sampling afterwards gives what a fresh engine gives."""
    from allmos.engine.warmup import warm_up

    params = [SamplingParams(temperature=0.8, max_tokens=8), SamplingParams(temperature=0, max_tokens=8)]
    fresh = LLM(str(qwen3_dir), kvcache_block_size=16, max_model_len=128)
    want = [o.token_ids for o in fresh.generate(prompts(2, seed=21), params, use_tqdm=False)]
    warmed = LLM(str(qwen3_dir), kvcache_block_size=16, max_model_len=128)
    warm_up(warmed.engine)
    assert not warmed.engine.has_unfinished() and warmed.engine.num_generated_tokens == 0
    assert_all_blocks_free(warmed)
    assert warmed.engine.block_manager._hash_to_block  # the warm-up did run its requests (blocks cached)
    got = [o.token_ids for o in warmed.generate(prompts(2, seed=21), params, use_tqdm=False)]
    assert got == want


def test_engine_is_freed_by_reference_counting(qwen3_dir):
    """LLM() freezes the start-up heap (gc.freeze), which the cyclic collector then never visits; so an
    engine must not sit in a reference cycle, or `del llm` would never free it (nor its KV cache)."""
    import gc
    import weakref

    llm = LLM(str(qwen3_dir), kvcache_block_size=16)
    llm.generate([[5, 6, 7]], SamplingParams(max_tokens=3), use_tqdm=False)
    assert gc.get_freeze_count() > 0
    refs = [weakref.ref(obj) for obj in (llm, llm.engine, llm.engine.runner, llm.engine.scheduler)]
    gc.disable()
    try:
        del llm
        assert all(ref() is None for ref in refs)
    finally:
        gc.enable()


def test_chat_template_and_errors(tok_llm, llm):
    out = tok_llm.chat([{"role": "user", "content": "hi"}], SamplingParams(max_tokens=3), use_tqdm=False)
    assert len(out) == 1 and out[0].prompt.startswith("<|im_start|>")
    outs = tok_llm.chat([[{"role": "user", "content": "a"}], [{"role": "user", "content": "b"}]],
                        SamplingParams(max_tokens=2), use_tqdm=False)
    assert len(outs) == 2
    custom = tok_llm.chat([{"role": "user", "content": "x"}], SamplingParams(max_tokens=2), use_tqdm=False,
                          chat_template="{% for m in messages %}[{{ m['content'] }}]{% endfor %}")
    assert custom[0].prompt == "[x]"
    with pytest.raises(ValueError, match="tokenizer"):
        llm.chat([{"role": "user", "content": "hi"}])
