"""What a new user hits first: prompt forms, type errors, bounds, device checks, abort, and vLLM's logprob
shapes (``Logprob`` objects, ranks, prompt logprobs) checked against transformers."""

from __future__ import annotations

import gc
import random
import time

import pytest
import torch
from hf_reference import hf_logits

from allmos import LLM, Logprob, SamplingParams
from allmos.config import EngineConfig
from allmos.engine.batch import PromptLogprobsChunk, ScheduledBatch, ScheduledSeq
from allmos.engine.sampler import SamplingRow
from allmos.engine.serialization import BatchDecoder, BatchEncoder, deserialize_batch, serialize_batch
from allmos.outputs import logprob_values
from allmos.sampling_params import MAX_N

GREEDY = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)


@pytest.fixture(scope="module")
def llm(qwen3_dir):
    return LLM(str(qwen3_dir), kvcache_block_size=16)


@pytest.fixture(scope="module")
def tok_llm(tiny_llama_real_tokenizer):
    return LLM(str(tiny_llama_real_tokenizer), kvcache_block_size=16, max_model_len=256)


def make_prompts(n: int, seed: int = 0, lengths=(1, 40)) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(3, 512) for _ in range(rng.randint(*lengths))] for _ in range(n)]


def assert_all_blocks_free(llm: LLM) -> None:
    bm = llm.engine.block_manager
    bm.check_integrity()
    assert bm.num_free_blocks == bm.num_blocks
    assert not llm.engine.output_processor.requests and not llm.engine.core.sequences_left()


def assert_still_works(llm: LLM) -> None:
    out = llm.generate([[5, 6, 7]], GREEDY, use_tqdm=False)
    assert len(out[0].token_ids) == 4
    assert_all_blocks_free(llm)


def tokens(outs) -> list[list[int]]:
    return [o.token_ids for o in outs]


# --------------------------------------------------------------------------- prompt forms


def test_prompt_dicts_equal_plain_prompts(llm):
    a, b = make_prompts(2, seed=1)
    plain = tokens(llm.generate([a, b], GREEDY, use_tqdm=False))
    one = llm.generate({"prompt_token_ids": a}, GREEDY, use_tqdm=False)
    assert len(one) == 1 and one[0].token_ids == plain[0] and one[0].prompt_token_ids == a
    many = llm.generate([{"prompt_token_ids": a}, {"prompt_token_ids": tuple(b)}], GREEDY, use_tqdm=False)
    assert tokens(many) == plain
    mixed = llm.generate([{"prompt_token_ids": a}, b], GREEDY, use_tqdm=False)
    assert tokens(mixed) == plain


def test_prompt_token_ids_keyword(llm):
    a, b = make_prompts(2, seed=2)
    plain = tokens(llm.generate([a, b], GREEDY, use_tqdm=False))
    assert tokens(llm.generate(prompt_token_ids=[a, b], sampling_params=GREEDY, use_tqdm=False)) == plain
    assert tokens(llm.generate(sampling_params=GREEDY, prompt_token_ids=a, use_tqdm=False)) == plain[:1]
    with pytest.raises(ValueError, match="not both"):
        llm.generate([a], GREEDY, prompt_token_ids=[a], use_tqdm=False)
    with pytest.raises(ValueError, match="needs prompts"):
        llm.generate(sampling_params=GREEDY, use_tqdm=False)
    with pytest.raises(ValueError, match="prompt_token_ids"):
        llm.generate(prompt_token_ids=[a, "text"], sampling_params=GREEDY, use_tqdm=False)
    assert_still_works(llm)


def test_text_prompt_dict(tok_llm):
    params = SamplingParams(temperature=0, max_tokens=5, ignore_eos=True)
    plain = tok_llm.generate("Hello there", params, use_tqdm=False)[0]
    for prompt in ({"prompt": "Hello there"}, [{"prompt": "Hello there"}]):
        out = tok_llm.generate(prompt, params, use_tqdm=False)
        assert len(out) == 1 and out[0].prompt == "Hello there"
        assert out[0].prompt_token_ids == plain.prompt_token_ids and out[0].token_ids == plain.token_ids
    streamed = [d["token_ids"] for d in tok_llm.stream({"prompt": "Hello there"}, params)]
    assert sum(streamed, []) == plain.token_ids


@pytest.mark.parametrize("prompt,match", [
    ({"foo": 1, "bar": 2}, r"\['bar', 'foo'\]"),
    ({"prompt_token_ids": [1, 2, 3], "multi_modal_data": {}}, "multi_modal_data"),
    ({"prompt": "hi", "prompt_token_ids": [1]}, "exactly one key"),
    ({}, "exactly one key"),
    ({"prompt": 5}, "'prompt' of a prompt dict must be a str"),
    ({"prompt_token_ids": "abc"}, "prompt_token_ids' must be a list"),
    ({"prompt_token_ids": [1, "a"]}, "integer token ids"),
    (5, "prompts must be"),
    (None, "needs prompts"),
    (3.5, "prompts must be"),
    ([1, "a"], "mixes token ids"),
    ([[1, 2], 7], "mixes token ids"),
    ([[1, 2], None], "a prompt must be"),
    ([[1, 2.0]], "integer token ids"),
    ([[True, 2]], "integer token ids"),
    ([{"prompt_token_ids": [4]}, {"text": "x"}], r"\['text'\]"),
])
def test_bad_prompts_raise_value_error(llm, prompt, match):
    with pytest.raises(ValueError, match=match):
        llm.generate(prompt, GREEDY, use_tqdm=False)
    assert_still_works(llm)


def test_dict_is_not_iterated_as_its_keys(llm):
    """A bad dict used to become one request per key; now nothing is queued at all."""
    with pytest.raises(ValueError):
        llm.generate({"foo": 1, "bar": 2}, GREEDY, use_tqdm=False)
    assert not llm.engine.has_unfinished()
    with pytest.raises(ValueError):
        llm.engine.add_request(None, {"prompt_token_ids": [1], "foo": 2}, GREEDY)
    with pytest.raises(ValueError, match="a prompt must be"):
        llm.engine.add_request(None, 7, GREEDY)
    with pytest.raises(ValueError, match="SamplingParams"):
        llm.engine.add_request(None, [1, 2], {"temperature": 0})
    assert_still_works(llm)


def test_stream_takes_one_prompt(llm):
    a = make_prompts(1, seed=3)[0]
    want = llm.generate([a], GREEDY, use_tqdm=False)[0].token_ids
    assert sum((d["token_ids"] for d in llm.stream({"prompt_token_ids": a}, GREEDY)), []) == want
    for bad, match in ((["Hi", "Yo"], "one prompt"), ([[1, 2], [3]], "one prompt"),
                       ([{"prompt_token_ids": [1]}], "one prompt"), (5, "a prompt must be"),
                       (None, "a prompt must be"), ({"foo": 1}, "foo")):
        with pytest.raises(ValueError, match=match):
            next(iter(llm.stream(bad, GREEDY)))
    assert_still_works(llm)


def test_sampling_params_argument_type(llm):
    with pytest.raises(ValueError, match="sampling_params must be a SamplingParams"):
        llm.generate([[1, 2]], {"temperature": 0}, use_tqdm=False)
    with pytest.raises(ValueError, match="sampling_params must be a SamplingParams"):
        llm.generate([[1, 2]], [GREEDY, "greedy"], use_tqdm=False)
    assert_still_works(llm)


# --------------------------------------------------------------------------- SamplingParams types and bounds

NUMERIC_FIELDS = ("n", "temperature", "top_p", "top_k", "min_p", "seed", "max_tokens", "min_tokens",
                  "presence_penalty", "frequency_penalty", "repetition_penalty", "logprobs", "prompt_logprobs")
INT_FIELDS = ("n", "top_k", "seed", "max_tokens", "min_tokens", "logprobs", "prompt_logprobs")
BOOL_FIELDS = ("ignore_eos", "include_stop_str_in_output", "skip_special_tokens")


@pytest.mark.parametrize("field", NUMERIC_FIELDS)
def test_numeric_field_given_a_string(field):
    with pytest.raises(ValueError, match=rf"SamplingParams\.{field} must be .*got str '1'"):
        SamplingParams(**{field: "1"})


@pytest.mark.parametrize("field", INT_FIELDS)
def test_int_field_rejects_bool_and_float(field):
    with pytest.raises(ValueError, match=rf"SamplingParams\.{field} must be an integer, got bool"):
        SamplingParams(**{field: True})
    with pytest.raises(ValueError, match=rf"SamplingParams\.{field} must be an integer, got float"):
        SamplingParams(**{field: 2.0})


@pytest.mark.parametrize("field", BOOL_FIELDS)
def test_flag_field_takes_bools(field):
    with pytest.raises(ValueError, match=rf"SamplingParams\.{field} must be True or False, got int 1"):
        SamplingParams(**{field: 1})
    assert getattr(SamplingParams(**{field: True}), field) is True


@pytest.mark.parametrize("kwargs,match", [
    (dict(temperature=float("nan")), "temperature must be finite"),
    (dict(temperature=float("inf")), "temperature must be finite"),
    (dict(temperature=True), "temperature must be a number, got bool"),
    (dict(stop=123), "stop must be a string or a list of strings, got int 123"),
    (dict(stop=[123]), "stop must hold strings"),
    (dict(stop=["ok", None]), "stop must hold strings"),
    (dict(stop=[""]), "non-empty"),
    (dict(stop_token_ids=5), "stop_token_ids must be a list of token ids"),
    (dict(stop_token_ids=["2"]), "stop_token_ids must hold token ids"),
    (dict(stop_token_ids=[True]), "stop_token_ids must hold token ids"),
    (dict(prompt_logprobs=-1), "prompt_logprobs must be None or an integer >= 0"),
])
def test_sampling_params_type_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SamplingParams(**kwargs)


def test_numbers_from_numpy_become_python_numbers():
    import numpy as np

    p = SamplingParams(n=np.int64(2), temperature=np.float32(0.5), seed=np.int64(3), stop_token_ids=[np.int64(4)])
    assert type(p.n) is int and type(p.temperature) is float and type(p.seed) is int
    assert p.stop_token_ids == [4] and type(p.stop_token_ids[0]) is int
    assert SamplingParams(temperature=1).temperature == 1.0 and SamplingParams(stop="x").stop == ["x"]


def test_n_is_bounded():
    assert MAX_N == 1024
    assert SamplingParams(n=MAX_N).n == MAX_N
    start = time.perf_counter()
    with pytest.raises(ValueError, match=r"SamplingParams\.n must be an integer in \[1, 1024\], got 1000000"):
        SamplingParams(n=10**6)
    assert time.perf_counter() - start < 1.0
    assert "1024" in SamplingParams.__doc__


def test_generation_config_numbers_written_as_floats(qwen3_dir, tmp_path):
    import json
    import shutil

    folder = tmp_path / "g"
    shutil.copytree(qwen3_dir, folder)
    (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": 2, "top_k": 20.0, "temperature": 1}))
    params = LLM(str(folder)).engine.default_sampling_params()
    assert params.top_k == 20 and type(params.top_k) is int and params.temperature == 1.0


def test_prompt_logprobs_beyond_vocab(llm):
    with pytest.raises(ValueError, match="prompt_logprobs must be <= the vocabulary size 512"):
        llm.generate([[1, 2]], SamplingParams(prompt_logprobs=513), use_tqdm=False)
    assert_still_works(llm)


# --------------------------------------------------------------------------- engine options


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message of a machine without CUDA")
def test_cuda_device_without_cuda_fails_at_once(tmp_path):
    start = time.perf_counter()
    for device in ("cuda", "cuda:0"):
        with pytest.raises(ValueError, match="no CUDA device is available"):
            LLM(str(tmp_path / "not-even-a-model"), device=device)  # checked before anything is loaded
    assert time.perf_counter() - start < 1.0


def test_cuda_index_beyond_device_count(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert EngineConfig.from_kwargs(None, device="cuda:1").device == "cuda:1"
    with pytest.raises(ValueError, match=r"device='cuda:2' but only 2 CUDA device\(s\) are available"):
        EngineConfig.from_kwargs(None, device="cuda:2")
    with pytest.raises(ValueError, match="index after 'cuda:'"):
        EngineConfig.from_kwargs(None, device="cuda:x")
    with pytest.raises(ValueError, match="device must be"):
        EngineConfig.from_kwargs(None, device="tpu")


def test_trust_remote_code(qwen3_dir):
    assert EngineConfig.from_kwargs(str(qwen3_dir), trust_remote_code=False).trust_remote_code is False
    with pytest.raises(ValueError, match="trust_remote_code=True is not supported"):
        LLM(str(qwen3_dir), trust_remote_code=True)


def test_llm_engine_alias(llm):
    assert llm.llm_engine is llm.engine


# --------------------------------------------------------------------------- abort


def test_abort_unknown_ids_are_ignored(llm):
    assert llm.abort("no-such-id") == []
    assert llm.llm_engine.abort_request("no-such-id") == []
    assert llm.abort([]) == []
    with pytest.raises(ValueError, match="request_id must be a str or an iterable"):
        llm.abort(5)
    with pytest.raises(ValueError, match="request ids are strings"):
        llm.abort(["a", 5])
    assert_still_works(llm)


def test_abort_several_returns_the_aborted_outputs(llm):
    engine = llm.engine
    p1, p2, p3 = make_prompts(3, seed=4)
    long = SamplingParams(max_tokens=200, ignore_eos=True)
    first = engine.add_request(None, p1, long)
    second = engine.add_request(None, p2, SamplingParams(n=2, max_tokens=200, ignore_eos=True))
    keep = engine.add_request(None, p3, SamplingParams(max_tokens=6, ignore_eos=True))
    for _ in range(3):
        engine.step()
    outs = llm.abort(iter([first, "unknown", second]))
    assert [o.request_id for o in outs] == [first, second]
    assert all(c.finish_reason == "abort" for o in outs for c in o.outputs) and all(o.finished for o in outs)
    assert llm.abort(first) == []  # already gone
    delivered = {}
    while engine.has_unfinished():
        for o in engine.step():
            delivered[o.request_id] = o
    assert delivered[first].outputs[0].finish_reason == "abort"  # the next step delivers them too
    assert delivered[keep].outputs[0].finish_reason == "length" and len(delivered[keep].token_ids) == 6
    assert_all_blocks_free(llm)


def test_abort_ends_a_stream(llm):
    stream = llm.stream(make_prompts(1, seed=5)[0], SamplingParams(max_tokens=100, ignore_eos=True))
    first = next(stream)
    assert not first["finished"]
    assert [o.request_id for o in llm.abort(first["output"].request_id)] == [first["output"].request_id]
    rest = list(stream)
    assert rest[-1]["finished"] and rest[-1]["output"].outputs[0].finish_reason == "abort"
    assert_all_blocks_free(llm)


# --------------------------------------------------------------------------- logprobs against transformers


def hf_rank_bounds(ref_row: torch.Tensor, value: float, tol: float = 1e-4) -> tuple[int, int]:
    """The 1-based rank a token of logprob ``value`` has in ``ref_row``, up to ``tol`` of float noise."""
    return int((ref_row > value + tol).sum()) + 1, int((ref_row > value - tol).sum()) + 1


def check_position(entry: dict[int, Logprob], ref_row: torch.Tensor, token: int, k: int) -> int:
    """``entry`` (one position's dict) holds ``token`` with its reference logprob and rank, and the top
    ``k`` of ``ref_row`` with ranks 1..k; returns ``token``'s rank."""
    chosen = entry[token]
    assert isinstance(chosen, Logprob)
    assert abs(chosen.logprob - ref_row[token].item()) < 1e-4
    low, high = hf_rank_bounds(ref_row, chosen.logprob)
    assert low <= chosen.rank <= high
    top = torch.topk(ref_row, k)
    assert set(entry) == {token} | set(top.indices.tolist())
    for rank, (tid, value) in enumerate(zip(top.indices.tolist(), top.values.tolist()), start=1):
        assert abs(entry[tid].logprob - value) < 1e-4
        if tid != token:
            assert entry[tid].rank == rank
    return chosen.rank


def check_prompt_logprobs(out, qwen3_dir, k: int) -> None:
    prompt = out.prompt_token_ids
    assert out.prompt_logprobs is not None and len(out.prompt_logprobs) == len(prompt)
    assert out.prompt_logprobs[0] is None
    ref = torch.log_softmax(hf_logits(qwen3_dir, prompt), dim=-1)  # [len, vocab]
    for i in range(1, len(prompt)):
        check_position(out.prompt_logprobs[i], ref[i - 1], prompt[i], k)


def test_sampled_logprobs_are_logprob_objects_with_true_ranks(llm, qwen3_dir):
    ps = make_prompts(3, seed=6, lengths=(5, 30))
    for params in (SamplingParams(temperature=0, max_tokens=8, ignore_eos=True, logprobs=3),
                   SamplingParams(temperature=1.5, max_tokens=12, ignore_eos=True, logprobs=2, seed=9)):
        ranks = []
        for out in llm.generate(ps, params, use_tqdm=False):
            completion = out.outputs[0]
            prompt = out.prompt_token_ids
            ref = torch.log_softmax(hf_logits(qwen3_dir, prompt + completion.token_ids[:-1]), dim=-1)
            for step, (token, entry) in enumerate(zip(completion.token_ids, completion.logprobs, strict=True)):
                ranks.append(check_position(entry, ref[len(prompt) - 1 + step], token, params.logprobs))
                assert entry[token].decoded_token is None  # this model has no tokenizer
                assert next(iter(entry)) == token  # the sampled token comes first, as in vLLM
            total = sum(e[t].logprob for t, e in zip(completion.token_ids, completion.logprobs))
            assert abs(completion.cumulative_logprob - total) < 1e-4
            assert out.prompt_logprobs is None
        if params.temperature == 0:
            assert set(ranks) == {1}
        else:
            assert max(ranks) > 3  # the sampled run really draws tokens outside the top-k


def test_logprob_values_helper(llm):
    out = llm.generate([[5, 6, 7]], SamplingParams(temperature=0, max_tokens=3, logprobs=1, prompt_logprobs=1),
                       use_tqdm=False)[0]
    floats = logprob_values(out.outputs[0].logprobs)
    assert floats == [{t: lp.logprob for t, lp in d.items()} for d in out.outputs[0].logprobs]
    assert all(isinstance(v, float) for d in floats for v in d.values())
    assert logprob_values(out.prompt_logprobs)[0] is None and logprob_values(None) is None


def test_decoded_tokens(tok_llm):
    tok = tok_llm.tokenizer
    out = tok_llm.generate("The cat sat", SamplingParams(temperature=0, max_tokens=4, ignore_eos=True, logprobs=2,
                                                         prompt_logprobs=2), use_tqdm=False)[0]
    entries = out.outputs[0].logprobs + out.prompt_logprobs[1:]
    assert entries and all(lp.decoded_token == tok.decode([t]) for d in entries for t, lp in d.items())


@pytest.mark.parametrize("engine_kwargs", [
    dict(),
    dict(max_num_batched_tokens=16),  # every long prompt is chunked
    dict(max_num_batched_tokens=7, enable_prefix_caching=False),  # chunks not aligned to blocks
])
def test_prompt_logprobs_match_transformers(qwen3_dir, engine_kwargs):
    llm = LLM(str(qwen3_dir), kvcache_block_size=16, **engine_kwargs)
    ps = make_prompts(3, seed=7, lengths=(20, 50)) + [[9, 10]]
    params = [SamplingParams(temperature=0, max_tokens=3, ignore_eos=True, prompt_logprobs=k) for k in (3, 0, 5, 2)]
    for out, p in zip(llm.generate(ps, params, use_tqdm=False), params, strict=True):
        check_prompt_logprobs(out, qwen3_dir, p.prompt_logprobs)
        if p.prompt_logprobs == 0:
            assert all(len(d) == 1 for d in out.prompt_logprobs[1:])
    assert_all_blocks_free(llm)


def test_prompt_logprobs_skip_prefix_cache_hits(qwen3_dir):
    llm = LLM(str(qwen3_dir), kvcache_block_size=16, max_num_batched_tokens=24)
    shared = make_prompts(1, seed=8, lengths=(40, 40))[0]
    first = llm.generate([shared + [11, 12]], GREEDY, use_tqdm=False)[0]
    assert first.num_cached_tokens == 0
    params = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True, prompt_logprobs=2)
    out = llm.generate([shared + [13, 14, 15]], params, use_tqdm=False)[0]
    assert out.num_cached_tokens == 0  # computed its whole prompt, for the logits of every position
    check_prompt_logprobs(out, qwen3_dir, 2)
    again = llm.generate([shared + [16]], GREEDY, use_tqdm=False)[0]
    assert again.num_cached_tokens == 32  # the cache itself still serves other requests
    both = llm.generate([shared + [17], shared + [18, 19]], [GREEDY, params], use_tqdm=False)
    assert both[0].num_cached_tokens == 32 and both[1].num_cached_tokens == 0
    check_prompt_logprobs(both[1], qwen3_dir, 2)
    assert_all_blocks_free(llm)


def test_prompt_logprobs_edge_cases(llm, qwen3_dir):
    one = llm.generate([[7]], SamplingParams(max_tokens=2, prompt_logprobs=3), use_tqdm=False)[0]
    assert one.prompt_logprobs == [None]
    p = make_prompts(1, seed=9, lengths=(35, 35))[0]
    n2 = llm.generate([p], SamplingParams(n=2, temperature=1.0, max_tokens=3, prompt_logprobs=1, seed=1),
                      use_tqdm=False)[0]
    assert len(n2.outputs) == 2
    check_prompt_logprobs(n2, qwen3_dir, 1)
    stream = list(llm.stream(p, SamplingParams(temperature=0, max_tokens=3, prompt_logprobs=1)))
    check_prompt_logprobs(stream[-1]["output"], qwen3_dir, 1)
    assert_all_blocks_free(llm)


def test_prompt_logprobs_survive_preemption(qwen3_dir, monkeypatch):
    """A KV cache too small for the batch: requests are preempted, some in the middle of their chunked
    prompt, and recompute it; the stored prompt logprobs still match transformers position by position."""
    llm = LLM(str(qwen3_dir), kvcache_block_size=16, num_kvcache_blocks=12, max_num_batched_tokens=16)
    engine = llm.engine
    chunks = []
    store = engine.output_processor._store_prompt_logprobs
    monkeypatch.setattr(engine.output_processor, "_store_prompt_logprobs",
                        lambda chunk: (chunks.append((chunk.request_id, chunk.start_pos)), store(chunk))[1])
    ps = make_prompts(6, seed=10, lengths=(30, 50))
    params = SamplingParams(temperature=0, max_tokens=60, ignore_eos=True, prompt_logprobs=2)
    outs = llm.generate(ps, params, use_tqdm=False)
    assert engine.scheduler.num_preemptions > 0
    assert len(chunks) > len(set(chunks))  # some chunk was computed twice (recomputed after a preemption)
    for out in outs:
        check_prompt_logprobs(out, qwen3_dir, 2)
    assert_all_blocks_free(llm)


def test_common_path_does_no_prompt_logprob_work(llm, monkeypatch):
    runner = llm.engine.runner
    flags = []
    execute = runner.execute
    monkeypatch.setattr(runner, "execute", lambda batch: (flags.append(batch.has_prompt_logprobs), execute(batch))[1])

    def refuse(*args):
        raise AssertionError("prompt logprobs computed for a request that did not ask")

    monkeypatch.setattr(runner, "_prompt_logprobs", refuse)
    llm.generate(make_prompts(4, seed=11), SamplingParams(max_tokens=5, logprobs=2), use_tqdm=False)
    assert flags and not any(flags)


# --------------------------------------------------------------------------- the step message


def _row(**kwargs) -> SamplingRow:
    """A row as the decoder returns it (id sequences as lists)."""
    return SamplingRow(prompt_token_ids=[], output_token_ids=[], banned_token_ids=[], **kwargs)


def _batch_with_prompt_chunks() -> ScheduledBatch:
    return ScheduledBatch([
        ScheduledSeq("a", [5, 6, 7], 0, [3], None, PromptLogprobsChunk(4, [6, 7])),
        ScheduledSeq("b", [1], 9, [0], _row(temperature=0.0)),
        ScheduledSeq("c", [8, 9], 3, [1, 2], _row(num_logprobs=1), PromptLogprobsChunk(0, [9])),
    ], has_prompt_logprobs=True)


def test_step_message_carries_prompt_logprob_chunks():
    batch = _batch_with_prompt_chunks()
    assert deserialize_batch(serialize_batch(batch)) == batch
    plain = ScheduledBatch([ScheduledSeq("b", [1], 9, [0], _row(temperature=0.0))])
    assert deserialize_batch(serialize_batch(plain)) == plain and not plain.has_prompt_logprobs
    encoder, decoder = BatchEncoder(), BatchDecoder()
    for b in (batch, plain, batch):
        got = decoder.decode(encoder.encode(b))
        assert got == b and got.has_prompt_logprobs == b.has_prompt_logprobs


def test_malformed_prompt_chunk_in_message():
    data = serialize_batch(_batch_with_prompt_chunks()).replace(b"[4,[6,7]]", b"[4]")
    with pytest.raises(ValueError, match="malformed"):
        deserialize_batch(data)


def test_tp2_prompt_logprobs_match_tp1(qwen3_dir, monkeypatch):
    """Tensor parallelism on CPU ranks: every rank runs the LM head over the prompt positions (it gathers
    over ranks); the driver's values equal a single process's."""
    monkeypatch.setenv("ALLMOS_TP_VERIFY", "1")
    monkeypatch.delenv("MASTER_PORT", raising=False)
    ps = make_prompts(3, seed=12, lengths=(10, 45))
    params = SamplingParams(temperature=0.8, seed=3, max_tokens=4, ignore_eos=True, logprobs=2, prompt_logprobs=3)
    kwargs = dict(kvcache_block_size=16, max_num_batched_tokens=32, device="cpu")
    single = LLM(str(qwen3_dir), **kwargs)
    want = single.generate(ps, params, use_tqdm=False)
    del single
    gc.collect()
    tp = LLM(str(qwen3_dir), tensor_parallel_size=2, **kwargs)
    try:
        got = tp.generate(ps, params, use_tqdm=False)
    finally:
        tp.shutdown()
    for g, w in zip(got, want, strict=True):
        assert g.token_ids == w.token_ids
        for a, b in zip(g.prompt_logprobs[1:] + g.outputs[0].logprobs, w.prompt_logprobs[1:] + w.outputs[0].logprobs,
                        strict=True):
            assert a.keys() == b.keys()
            assert all(abs(a[t].logprob - b[t].logprob) < 1e-4 and a[t].rank == b[t].rank for t in a)
