"""The server's parts below HTTP (wire protocol, engine delta outputs, the core adapter, front-end output
processing) and the failure paths of a real server (overload, engine-core death), on tiny models."""

from __future__ import annotations

import os
import signal
import threading
import time

import pytest

msgspec = pytest.importorskip("msgspec")
pytest.importorskip("fastapi")
httpx = pytest.importorskip("httpx")

from server_harness import ServerProcess  # noqa: E402

from allmos import LLM, SamplingParams  # noqa: E402
from allmos.config import EngineConfig  # noqa: E402
from allmos.engine.llm_engine import LLMEngine  # noqa: E402
from allmos.server.core_process import EngineCore  # noqa: E402
from allmos.server.output_processor import OutputProcessor, new_request_state  # noqa: E402
from allmos.server.protocol import (  # noqa: E402
    AbortRequests,
    AddRequest,
    Codec,
    CoreMessage,
    CoreStats,
    FrontendMessage,
    NewTokens,
    SamplingSettings,
    StepOutputs,
    frame_length,
)

PROMPT = [5, 17, 99, 3, 42, 7, 11]


# ---------------------------------------------------------------------- protocol
def test_frames_round_trip():
    front, core = Codec(CoreMessage), Codec(FrontendMessage)
    add = AddRequest("r1", PROMPT, SamplingSettings(n=2, temperature=0.5, seed=3, stop_token_ids=[9]), 12.5)
    frame = front.frame(add)
    assert frame_length(frame[:4]) == len(frame) - 4
    assert core.decode(frame[4:]) == add
    step = StepOutputs(NewTokens(["r1", "r2"], [0, 1], [4, 5], {1: ("stop", 9)}, {0: [(4, -0.1), (8, -2.0)]}),
                       [], [], CoreStats(num_running_reqs=1, kv_cache_usage=0.25), 1.0)
    assert front.decode(core.frame(step)[4:]) == step
    assert core.decode(front.frame(AbortRequests(["a", "b"]))[4:]) == AbortRequests(["a", "b"])
    with pytest.raises(ValueError):
        frame_length((2**31).to_bytes(4, "big"))
    with pytest.raises(msgspec.DecodeError):  # a message of the wrong direction is not accepted
        front.decode(front.frame(add)[4:])


def test_sse_frames_have_no_raw_line_separators():
    import json

    from allmos.server.serving import sse

    text = "a\u2028b\u2029c\x85d\u00e9\n"
    frame = sse({"text": text}).decode()
    assert frame.endswith("\n\n") and len(frame[:-2].splitlines()) == 1  # even str.splitlines() keeps it whole
    assert json.loads(frame[len("data: "):])["text"] == text


# ---------------------------------------------------------------------- engine delta outputs
@pytest.fixture(scope="module")
def tiny_engine(qwen3_dir):
    engine = LLMEngine(EngineConfig.from_kwargs(str(qwen3_dir), max_model_len=256, kvcache_block_size=16,
                                                num_kvcache_blocks=64))
    yield engine
    engine.shutdown()


def _drain(engine) -> list:
    outputs, steps = [], 0
    while engine.has_unfinished() and steps < 500:
        outputs += engine.step()
        steps += 1
    return outputs


def test_engine_delta_outputs_concatenate_to_the_full_output(tiny_engine):
    params = SamplingParams(n=2, temperature=0.8, seed=5, max_tokens=9, logprobs=2)
    full_id = tiny_engine.add_request(None, PROMPT, params)
    full = [o for o in _drain(tiny_engine) if o.request_id == full_id][-1]
    delta_id = tiny_engine.add_request(None, PROMPT, params, stream=True, detokenize=False, delta=True)
    deltas = [o for o in _drain(tiny_engine) if o.request_id == delta_id]
    for index in range(2):
        parts = [o.outputs[index] for o in deltas]
        assert all(t >= 0 for p in parts for t in p.token_ids)  # never the pending slot
        assert [t for p in parts for t in p.token_ids] == full.outputs[index].token_ids
        assert [lp for p in parts for lp in p.logprobs] == full.outputs[index].logprobs
        assert all(p.text == "" for p in parts)
    assert deltas[-1].finished and tiny_engine.get_stats().num_free_blocks == 64
    with pytest.raises(ValueError, match="stop"):
        tiny_engine.add_request(None, PROMPT, SamplingParams(stop=["x"]), detokenize=False)


def test_engine_core_adapter(tiny_engine):
    core = EngineCore(tiny_engine)
    settings = SamplingSettings(temperature=0.0, max_tokens=6)
    assert core.add(AddRequest("a", PROMPT * 5, settings, time.time())) is None
    assert core.add(AddRequest("b", PROMPT * 5, settings, time.time())) is None
    rejected = core.add(AddRequest("c", [1] * 300, settings, time.time()))
    assert rejected is not None and "maximum context length" in rejected.message
    tokens: dict[str, list[int]] = {"a": [], "b": []}
    scheduled, finishes = [], []
    for _ in range(100):
        if not core.has_work():
            break
        new_tokens, new = core.step()
        scheduled += new
        for request_id, _, token, finish in _rows(new_tokens):
            tokens[request_id].append(token)
            if finish:
                finishes.append((request_id, finish[0]))
        if len(tokens["b"]) >= 2 and ("b", "abort") not in finishes:
            core.abort(["b"])
            finishes.append(("b", "abort"))
    assert sorted(s.request_id for s in scheduled) == ["a", "b"]
    assert {s.request_id: s.num_cached_tokens for s in scheduled}["b"] in (0, 32)  # a's full blocks, if cached
    assert ("a", "length") in finishes and len(tokens["a"]) == 6
    assert 2 <= len(tokens["b"]) < 6
    stats = core.stats()
    assert stats.num_free_blocks == stats.num_kv_blocks == 64 and stats.kv_cache_usage == 0.0
    assert stats.prefix_cache_queries == 2 * len(PROMPT) * 5


def test_engine_core_matches_offline(qwen3_dir, tiny_engine):
    llm = LLM(str(qwen3_dir), max_model_len=256, kvcache_block_size=16, num_kvcache_blocks=64)
    ref = llm.generate([PROMPT], SamplingParams(temperature=0.0, max_tokens=8, stop_token_ids=[7]),
                       use_tqdm=False)[0].outputs[0]
    llm.shutdown()
    core = EngineCore(tiny_engine)
    core.add(AddRequest("x", PROMPT, SamplingSettings(temperature=0.0, max_tokens=8, stop_token_ids=[7]), 0.0))
    got, finish = [], None
    for _ in range(100):
        if not core.has_work():
            break
        for _, _, token, row_finish in _rows(core.step()[0]):
            got.append(token)
            finish = row_finish or finish
    assert got == ref.token_ids and finish == (ref.finish_reason, ref.stop_reason)


def test_engine_core_sampled_logprobs_match_offline(qwen3_dir, tiny_engine):
    """n > 1, seeded sampling, logprobs: the adapter's rows, gathered per sequence, carry the offline
    engine's tokens, logprob pairs (sampled token first, no repeats) and finish reasons."""
    params = SamplingParams(n=2, temperature=0.8, seed=11, max_tokens=7, logprobs=2, stop_token_ids=[7])
    llm = LLM(str(qwen3_dir), max_model_len=256, kvcache_block_size=16, num_kvcache_blocks=64)
    ref = llm.generate([PROMPT], params, use_tqdm=False)[0].outputs
    llm.shutdown()
    core = EngineCore(tiny_engine)
    settings = SamplingSettings(n=2, temperature=0.8, seed=11, max_tokens=7, logprobs=2, stop_token_ids=[7])
    core.add(AddRequest("s", PROMPT, settings, 0.0))
    tokens, logprobs, finishes = {0: [], 1: []}, {0: [], 1: []}, {}
    for _ in range(100):
        if not core.has_work():
            break
        new = core.step()[0]
        assert set(new.logprobs) == set(range(len(new.token_ids)))  # every row of a request that asked
        for row, (_, index, token, finish) in enumerate(_rows(new)):
            tokens[index].append(token)
            logprobs[index].append(new.logprobs[row])
            if finish:
                finishes[index] = finish
    for c in ref:
        assert tokens[c.index] == c.token_ids
        assert logprobs[c.index] == [[(t, lp.logprob) for t, lp in d.items()] for d in c.logprobs]
        assert finishes[c.index] == (c.finish_reason, c.stop_reason)


def _rows(new: NewTokens) -> list[tuple[str, int, int, tuple[str, int | None] | None]]:
    """(request id, completion index, token, (finish_reason, stop_reason) or None) per row."""
    return [(r, i, t, new.finished.get(row))
            for row, (r, i, t) in enumerate(zip(new.request_ids, new.indices, new.token_ids, strict=True))]


# ---------------------------------------------------------------------- front-end output processing
@pytest.fixture(scope="module")
def tokenizer(default_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(default_model_dir)


def _step(request_id: str, index: int, token_ids: list[int], finish_reason: str | None = None,
          stop_reason: int | None = None) -> StepOutputs:
    """One sequence's tokens as rows of one message; the finish (if any) on the last row."""
    finished = {len(token_ids) - 1: (finish_reason, stop_reason)} if finish_reason else {}
    new = NewTokens([request_id] * len(token_ids), [index] * len(token_ids), list(token_ids), finished)
    return StepOutputs(new, [], [], CoreStats(), 0.0)


def test_stop_string_inside_a_multi_token_delta(tokenizer):
    ids = tokenizer.encode(" one two three four five", add_special_tokens=False)
    prompt = tokenizer.encode("Count:", add_special_tokens=False)
    processor = OutputProcessor()
    state = new_request_state("r", prompt, SamplingParams(stop=["three"], max_tokens=50), tokenizer)
    processor.add(state)
    to_abort = processor.process(_step("r", 0, ids))
    _, outs = state.queue.get_nowait()
    assert outs[0].text == " one two " and outs[0].finish_reason == "stop" and outs[0].stop_reason == "three"
    kept = outs[0].token_ids
    assert tokenizer.decode(kept).endswith("three") and len(kept) < len(ids)  # cut right after the stop's token
    assert to_abort == ["r"] and "r" not in processor.states


def test_stop_token_wins_over_stop_string_and_siblings_continue(tokenizer):
    ids = tokenizer.encode(" alpha beta", add_special_tokens=False)
    processor = OutputProcessor()
    state = new_request_state("r", [1, 2], SamplingParams(n=2, stop=["beta"], max_tokens=50), tokenizer)
    processor.add(state)
    # sequence 0: the core ended it on the token that also completes the stop string -> the core's reason
    assert processor.process(_step("r", 0, ids, "stop", ids[-1])) == []
    _, outs = state.queue.get_nowait()
    assert (outs[0].finish_reason, outs[0].stop_reason) == ("stop", ids[-1])
    # sequence 1: the stop string ends it here while the core still runs it -> the request is aborted
    assert processor.process(_step("r", 1, ids)) == ["r"]
    _, outs = state.queue.get_nowait()
    assert (outs[0].text, outs[0].finish_reason, outs[0].stop_reason) == (" alpha ", "stop", "beta")


def test_rows_of_several_requests_in_one_step(tokenizer):
    """Rows interleave requests and come in any completion order: each request gets one item with its
    outputs in completion order, logprobs per kept token, and the finished sequence's reason."""
    ids = tokenizer.encode(" red green blue", add_special_tokens=False)
    processor = OutputProcessor()
    a = new_request_state("a", [1], SamplingParams(n=2, max_tokens=50, logprobs=1), tokenizer)
    b = new_request_state("b", [1], SamplingParams(max_tokens=50), tokenizer)
    processor.add(a)
    processor.add(b)
    pairs = [[(t, -0.5), (3, -1.5)] for t in ids]
    new = NewTokens(["a", "b", "a", "a"], [1, 0, 0, 1], [ids[0], ids[1], ids[2], ids[1]],
                    {1: ("length", None)}, {0: pairs[0], 2: pairs[2], 3: pairs[1]})
    assert processor.process(StepOutputs(new, [], [], CoreStats(), 0.0)) == []
    _, outs_a = a.queue.get_nowait()
    assert [(o.index, o.token_ids, o.logprobs) for o in outs_a] == [(0, [ids[2]], [pairs[2]]),
                                                                    (1, [ids[0], ids[1]], [pairs[0], pairs[1]])]
    assert (outs_a[0].text, outs_a[1].text) == (tokenizer.decode([ids[2]]), tokenizer.decode(ids[:2]))
    _, outs_b = b.queue.get_nowait()
    assert [(o.index, o.token_ids, o.logprobs, o.finish_reason) for o in outs_b] == [(0, [ids[1]], None, "length")]
    assert outs_b[0].text == tokenizer.decode([ids[1]])  # flushed at the finish
    assert "b" not in processor.states and "a" in processor.states


def test_finish_flushes_held_back_text(tokenizer):
    ids = tokenizer.encode(" café au lait", add_special_tokens=False)
    processor = OutputProcessor()
    state = new_request_state("r", [1], SamplingParams(stop=["xyzzy"], max_tokens=50), tokenizer)
    processor.add(state)
    texts = []
    for i, token in enumerate(ids):
        last = i == len(ids) - 1
        processor.process(_step("r", 0, [token], "length" if last else None))
        texts += [o.text for o in state.queue.get_nowait()[1]]
    assert "".join(texts) == tokenizer.decode(ids)


# ---------------------------------------------------------------------- a real server: overload, core death
@pytest.fixture(scope="module")
def tiny_server(tiny_llama_real_tokenizer, tmp_path_factory):
    args = [str(tiny_llama_real_tokenizer), "--served-model-name", "tiny", "--max-model-len", "2048",
            "--max-num-seqs", "2", "--max-queued-requests", "0", "--kvcache-block-size", "16",
            "--num-kvcache-blocks", "512"]
    proc = ServerProcess(*args, log_path=tmp_path_factory.mktemp("tiny_server") / "server.log")
    try:
        proc.wait_ready()
        yield proc
    finally:
        proc.stop()


def _open_stream(http: httpx.Client, url: str):
    body = {"model": "tiny", "prompt": [5, 6, 7], "max_tokens": 2000, "ignore_eos": True, "stream": True}
    response = http.send(http.build_request("POST", url + "/v1/completions", json=body), stream=True)
    assert response.status_code == 200
    return response


def test_non_streaming_disconnect_aborts(tiny_server):
    from server_harness import metric_value

    url = tiny_server.url
    aborted = metric_value(httpx.get(url + "/metrics").text, "allmos:request_success_total", finished_reason="abort")
    body = {"model": "tiny", "prompt": [5, 6, 7], "max_tokens": 2000, "ignore_eos": True}
    with pytest.raises(httpx.ReadTimeout):  # the client gives up and closes the connection
        httpx.post(url + "/v1/completions", json=body, timeout=httpx.Timeout(60, read=1.5))
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        text = httpx.get(url + "/metrics").text
        running = metric_value(text, "allmos:num_requests_running")
        if running == 0 and metric_value(text, "allmos:kv_cache_usage_perc") == 0:
            break
        time.sleep(0.2)
    assert metric_value(text, "allmos:num_requests_running") == 0
    assert metric_value(text, "allmos:kv_cache_usage_perc") == 0
    assert metric_value(text, "allmos:request_success_total", finished_reason="abort") == aborted + 1
    assert metric_value(text, "allmos:generation_tokens_total") < 2000


def test_overload_then_engine_death(tiny_server):
    openai = pytest.importorskip("openai")
    url = tiny_server.url
    with httpx.Client(timeout=60) as http:
        streams = [_open_stream(http, url), _open_stream(http, url)]
        overloaded = http.post(url + "/v1/completions", json={"model": "tiny", "prompt": [5], "max_tokens": 2})
        assert overloaded.status_code == 503 and overloaded.json()["error"]["code"] == "overloaded"
        for s in streams:
            s.close()
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:  # the closed streams are aborted, so capacity returns
            ok = http.post(url + "/v1/completions", json={"model": "tiny", "prompt": [5], "max_tokens": 2})
            if ok.status_code == 200:
                break
            time.sleep(0.2)
        assert ok.status_code == 200

    # a stream in flight when the engine core dies ends with an error instead of hanging
    errors: list[Exception] = []
    got_first = threading.Event()

    def stream_until_error():
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=60)
        try:
            for _ in client.completions.create(model="tiny", prompt=[5, 6], max_tokens=2000,
                                               extra_body={"ignore_eos": True},
                                               stream=True):
                got_first.set()
        except Exception as exc:  # the error event in the stream
            errors.append(exc)
        finally:
            got_first.set()

    thread = threading.Thread(target=stream_until_error, daemon=True)
    thread.start()
    assert got_first.wait(60)
    os.kill(tiny_server.core_pid(), signal.SIGKILL)
    thread.join(30)
    assert not thread.is_alive(), "the stream hung after the engine core died"
    assert errors and isinstance(errors[0], openai.APIError) and "engine" in str(errors[0]).lower()
    with httpx.Client(timeout=10) as http:
        health = http.get(url + "/health")
        assert health.status_code == 503 and health.json()["error"]["code"] == "engine_unavailable"
        after = http.post(url + "/v1/completions", json={"model": "tiny", "prompt": [5], "max_tokens": 2})
        assert after.status_code == 503 and set(after.json()["error"]) == {"message", "type", "param", "code"}
        assert http.get(url + "/v1/models").status_code == 200  # the front end itself still answers
    assert tiny_server.proc.poll() is None
