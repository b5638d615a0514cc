"""`allmos serve` end to end: the real `openai` client against a real server on 127.0.0.1 (default model).

One server for the whole module (API key on). Outputs are checked against the offline `LLM` built with
the same engine settings (greedy and seeded sampling are batch-independent, so they must agree), and
against the server's own results for the same request run alone.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")

from server_harness import ServerProcess, metric_value  # noqa: E402

from allmos import LLM, SamplingParams, __version__  # noqa: E402

MODEL = "SmolLM2-135M-Instruct"
KEY = "test-key-123"
ENGINE = dict(max_model_len=512, kvcache_block_size=16, num_kvcache_blocks=512, dtype="float32")
PROMPTS = ["Hello, my name is", "The capital of France is", "Once upon a time", "The best way to learn is",
           "My favourite food is", "In the year 2050,", "The ocean is", "Python is a programming language that"]
CHAT = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def server(default_model_dir, tmp_path_factory):
    # float32: the oracle format, whose greedy tokens do not depend on the batch they run in (the automatic CPU
    # format computes in bfloat16, where a near-tie at the last token can flip with the batch's shape)
    args = ["--max-model-len", "512", "--kvcache-block-size", "16", "--num-kvcache-blocks", "512", "--dtype", "float32"]
    proc = ServerProcess(*args, api_key=KEY, log_path=tmp_path_factory.mktemp("server") / "server.log")
    try:
        proc.wait_ready()
        yield proc
    finally:
        proc.stop()


@pytest.fixture(scope="module")
def offline(default_model_dir):
    llm = LLM(**ENGINE)
    yield llm
    llm.shutdown()


@pytest.fixture(scope="module")
def client(server):
    with openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=180) as c:
        yield c


def greedy(max_tokens: int, **kw) -> SamplingParams:
    return SamplingParams(temperature=0.0, max_tokens=max_tokens, **kw)


# ---------------------------------------------------------------------- basics
def test_info_endpoints(server, client):
    assert [m.id for m in client.models.list().data] == [MODEL]
    assert httpx.get(server.url + "/health").status_code == 200
    assert httpx.get(server.url + "/version").json() == {"version": __version__}
    page = httpx.get(server.url + "/")
    assert page.status_code == 200 and "/v1/chat/completions" in page.text
    tok = httpx.post(server.url + "/tokenize", json={"prompt": "Hello world"}, headers=server.headers()).json()
    assert tok["count"] == len(tok["tokens"]) > 0 and tok["max_model_len"] == 512
    detok = httpx.post(server.url + "/detokenize", json={"tokens": tok["tokens"]}, headers=server.headers()).json()
    assert detok["prompt"].endswith("Hello world")


def test_completions_match_offline(client, offline):
    prompts = PROMPTS[:3]
    resp = client.completions.create(model=MODEL, prompt=prompts, max_tokens=12, temperature=0)
    ref = offline.generate(prompts, greedy(12), use_tqdm=False)
    assert [c.index for c in resp.choices] == [0, 1, 2]
    assert [c.text for c in resp.choices] == [r.text for r in ref]
    assert [c.finish_reason for c in resp.choices] == [r.outputs[0].finish_reason for r in ref]
    assert resp.usage.completion_tokens == sum(len(r.token_ids) for r in ref)
    assert resp.usage.prompt_tokens == sum(len(r.prompt_token_ids) for r in ref)
    assert resp.usage.total_tokens == resp.usage.prompt_tokens + resp.usage.completion_tokens


def test_prompt_shapes(server, client):
    ids = httpx.post(server.url + "/tokenize", json={"prompt": PROMPTS[0]}, headers=server.headers()).json()["tokens"]
    ids2 = httpx.post(server.url + "/tokenize", json={"prompt": PROMPTS[1]}, headers=server.headers()).json()["tokens"]
    as_text = client.completions.create(model=MODEL, prompt=PROMPTS[0], max_tokens=6, temperature=0)
    as_ids = client.completions.create(model=MODEL, prompt=ids, max_tokens=6, temperature=0)
    as_lists = client.completions.create(model=MODEL, prompt=[ids, ids2], max_tokens=6, temperature=0)
    as_texts = client.completions.create(model=MODEL, prompt=PROMPTS[:2], max_tokens=6, temperature=0)
    assert as_text.choices[0].text == as_ids.choices[0].text
    assert [c.text for c in as_lists.choices] == [c.text for c in as_texts.choices]
    assert as_lists.choices[0].text == as_text.choices[0].text
    echo = client.completions.create(model=MODEL, prompt=PROMPTS[0], max_tokens=6, temperature=0, echo=True)
    assert echo.choices[0].text == PROMPTS[0] + as_text.choices[0].text


def test_chat_full_stream_and_cached_prompt(client, offline):
    full = client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=12, temperature=0)
    ref = offline.chat(CHAT, greedy(12), use_tqdm=False)[0]
    assert full.choices[0].message.role == "assistant"
    assert full.choices[0].message.content == ref.text
    assert full.usage.prompt_tokens == len(ref.prompt_token_ids)
    assert full.usage.completion_tokens == len(ref.token_ids)
    chunks = list(client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=12, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    content = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert content == ref.text
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == [full.choices[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == len(ref.token_ids)
    assert all(c.usage is None for c in chunks[:-1])
    # the same conversation again: its full prompt blocks come from the prefix cache
    cached = chunks[-1].usage.prompt_tokens_details.cached_tokens
    assert cached == (full.usage.prompt_tokens - 1) // 16 * 16 > 0


def test_completion_stream_with_usage(client):
    full = client.completions.create(model=MODEL, prompt=PROMPTS[2], max_tokens=10, temperature=0)
    chunks = list(client.completions.create(model=MODEL, prompt=PROMPTS[2], max_tokens=10, temperature=0,
                                            stream=True, stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == full.choices[0].text
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 10
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"


def test_raw_sse_framing(server):
    body = {"model": MODEL, "prompt": PROMPTS[0], "max_tokens": 3, "temperature": 0, "stream": True}
    with httpx.stream("POST", server.url + "/v1/completions", json=body, headers=server.headers(), timeout=120) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        raw = r.read().decode()
    frames = raw.split("\n\n")
    assert frames[-1] == "" and frames[-2] == "data: [DONE]"
    for frame in frames[:-2]:
        assert frame.startswith("data: ") and "\n" not in frame
        assert json.loads(frame[6:])["object"] == "text_completion"


# ---------------------------------------------------------------------- sampling features
def test_n_and_seed(client, offline):
    kw = dict(model=MODEL, prompt=PROMPTS[3], max_tokens=8, temperature=0.9)
    first = client.completions.create(n=3, seed=7, **kw)
    again = client.completions.create(n=3, seed=7, **kw)
    other = client.completions.create(n=3, seed=8, **kw)
    texts = [c.text for c in first.choices]
    assert [c.index for c in first.choices] == [0, 1, 2]
    assert [c.text for c in again.choices] == texts
    assert [c.text for c in other.choices] != texts
    ref = offline.generate(PROMPTS[3], SamplingParams(n=3, seed=7, temperature=0.9, max_tokens=8), use_tqdm=False)[0]
    assert texts == [o.text for o in ref.outputs]
    assert first.usage.completion_tokens == sum(len(o.token_ids) for o in ref.outputs)
    streamed = {0: "", 1: "", 2: ""}
    for chunk in client.completions.create(n=3, seed=7, stream=True, **kw):
        for choice in chunk.choices:
            streamed[choice.index] += choice.text
    assert [streamed[i] for i in range(3)] == texts


def test_logprobs(client, offline):
    resp = client.completions.create(model=MODEL, prompt=PROMPTS[4], max_tokens=6, temperature=0, logprobs=3)
    lp = resp.choices[0].logprobs
    ref = offline.generate(PROMPTS[4], greedy(6, logprobs=3), use_tqdm=False)[0].outputs[0]
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 6
    assert "".join(lp.tokens) == resp.choices[0].text
    for i, (token_id, value) in enumerate(zip(ref.token_ids, lp.token_logprobs)):
        assert value == pytest.approx(ref.logprobs[i][token_id].logprob, abs=1e-4)
        assert len(lp.top_logprobs[i]) == 3
        assert max(lp.top_logprobs[i].values()) == pytest.approx(value, abs=1e-4)  # greedy: the top-1 token
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(6)]
    chat = client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=5, temperature=0, logprobs=True,
                                          top_logprobs=2)
    content = chat.choices[0].logprobs.content
    assert len(content) == chat.usage.completion_tokens
    for entry in content:
        assert len(entry.top_logprobs) == 2 and bytes(entry.bytes).decode() == entry.token
        assert entry.logprob == pytest.approx(entry.top_logprobs[0].logprob, abs=1e-4)


def test_stop_strings(client, offline):
    base = offline.generate(PROMPTS[0], greedy(16), use_tqdm=False)[0].text
    stop = base.split()[2]  # a word from the middle of the greedy continuation
    ref = offline.generate(PROMPTS[0], greedy(16, stop=[stop]), use_tqdm=False)[0].outputs[0]
    resp = client.completions.create(model=MODEL, prompt=PROMPTS[0], max_tokens=16, temperature=0, stop=[stop])
    choice = resp.choices[0]
    assert (choice.text, choice.finish_reason) == (ref.text, "stop")
    assert choice.model_extra["stop_reason"] == stop
    assert resp.usage.completion_tokens == len(ref.token_ids) < 16
    chunks = list(client.completions.create(model=MODEL, prompt=PROMPTS[0], max_tokens=16, temperature=0,
                                            stop=stop, stream=True))
    assert "".join(c.choices[0].text for c in chunks) == ref.text
    assert chunks[-1].choices[0].finish_reason == "stop"
    kept = client.completions.create(model=MODEL, prompt=PROMPTS[0], max_tokens=16, temperature=0, stop=[stop],
                                     extra_body={"include_stop_str_in_output": True})
    assert kept.choices[0].text == ref.text + stop


def test_vllm_sampling_extras(client, offline):
    extra = {"top_k": 5, "min_p": 0.05, "repetition_penalty": 1.3, "min_tokens": 4, "ignore_eos": True}
    resp = client.completions.create(model=MODEL, prompt=PROMPTS[5], max_tokens=8, temperature=0.8, seed=3,
                                     presence_penalty=0.5, frequency_penalty=0.3, extra_body=extra)
    params = SamplingParams(temperature=0.8, seed=3, max_tokens=8, presence_penalty=0.5, frequency_penalty=0.3,
                            **extra)
    assert resp.choices[0].text == offline.generate(PROMPTS[5], params, use_tqdm=False)[0].text


# ---------------------------------------------------------------------- concurrency
async def _stream_text(client, prompt: str, max_tokens: int) -> tuple[str, str | None]:
    stream = await client.completions.create(model=MODEL, prompt=prompt, max_tokens=max_tokens, temperature=0,
                                             stream=True)
    text, finish = "", None
    async for chunk in stream:
        text += chunk.choices[0].text
        finish = chunk.choices[0].finish_reason or finish
    return text, finish


async def _stream_then_disconnect(client, prompt: str, num_chunks: int) -> int:
    stream = await client.completions.create(model=MODEL, prompt=prompt, max_tokens=400, temperature=0, stream=True)
    seen = 0
    async for _ in stream:
        seen += 1
        if seen >= num_chunks:
            break
    await stream.close()  # closes the connection mid-stream
    return seen


def _metrics(server) -> str:
    return httpx.get(server.url + "/metrics", timeout=10).text


def test_64_streams_with_8_disconnects(server, client):
    alone = {p: client.completions.create(model=MODEL, prompt=p, max_tokens=12, temperature=0).choices[0].text
             for p in PROMPTS}
    before = _metrics(server)
    aborts_before = metric_value(before, "allmos:request_success_total", finished_reason="abort") or 0.0
    tokens_before = metric_value(before, "allmos:generation_tokens_total")

    async def run():
        async with openai.AsyncOpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=300) as c:
            keep = [_stream_text(c, p, 12) for p in PROMPTS for _ in range(7)]
            drop = [_stream_then_disconnect(c, p, 2) for p in PROMPTS]
            return await asyncio.wait_for(asyncio.gather(*keep, *drop), timeout=300)

    results = asyncio.run(run())
    kept, dropped = results[:56], results[56:]
    expected = [(alone[p], "length") for p in PROMPTS for _ in range(7)]
    assert kept == expected
    assert dropped == [2] * 8
    deadline = time.monotonic() + 60
    while True:  # the aborts free every KV block (bounded wait)
        text = _metrics(server)
        state = {name: metric_value(text, f"allmos:{name}") for name in
                 ("kv_cache_usage_perc", "num_free_kv_blocks", "num_requests_running", "num_requests_waiting")}
        if state == {"kv_cache_usage_perc": 0.0, "num_free_kv_blocks": 512.0, "num_requests_running": 0.0,
                     "num_requests_waiting": 0.0} or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert state["kv_cache_usage_perc"] == 0.0 and state["num_free_kv_blocks"] == 512.0, state
    assert state["num_requests_running"] == 0.0 and state["num_requests_waiting"] == 0.0, state
    assert metric_value(text, "allmos:request_success_total", finished_reason="abort") - aborts_before == 8
    generated = metric_value(text, "allmos:generation_tokens_total") - tokens_before
    assert generated < 56 * 12 + 8 * 200  # the dropped streams (max_tokens=400) stopped early


# ---------------------------------------------------------------------- errors
def _bad_request_matrix(server) -> list[tuple[str, str, object, dict, int, str | None]]:
    """(method, path, JSON body or raw bytes, extra headers, expected status, expected error param)."""
    c, ch = "/v1/completions", "/v1/chat/completions"
    ok = {"model": MODEL, "prompt": "Hi", "max_tokens": 4}
    msgs = {"model": MODEL, "messages": CHAT, "max_tokens": 4}
    cases = [
        ({"max_tokens": "5"}, "max_tokens"), ({"max_tokens": 0}, "max_tokens"), ({"max_tokens": -1}, "max_tokens"),
        ({"max_tokens": 600}, "max_tokens"), ({"temperature": -1}, "temperature"), ({"top_p": 0}, "top_p"),
        ({"top_p": 1.5}, "top_p"), ({"top_k": -2}, "top_k"), ({"min_p": 2}, "min_p"), ({"n": 0}, "n"),
        ({"n": 100000}, "n"), ({"seed": -1}, "seed"), ({"stop": [""]}, "stop"), ({"stop": 5}, "stop"),
        ({"presence_penalty": 3}, "presence_penalty"), ({"frequency_penalty": -3}, "frequency_penalty"),
        ({"repetition_penalty": 0}, "repetition_penalty"), ({"logprobs": 50}, "logprobs"),
        ({"logprobs": -1}, "logprobs"), ({"echo": "yes"}, "echo"), ({"ignore_eos": "no"}, "ignore_eos"),
        ({"min_tokens": -1}, "min_tokens"), ({"min_tokens": 9}, "min_tokens"), ({"stream": "x"}, "stream"),
        ({"stream_options": {"include_usage": True}}, "stream_options"), ({"prompt": None}, "prompt"),
        ({"prompt": []}, "prompt"), ({"prompt": [[]]}, "prompt"), ({"prompt": [999999]}, "prompt"),
        ({"prompt": ["a", 1]}, "prompt"), ({"prompt": "hello " * 600}, "prompt"),
        ({"logit_bias": {"1": 2}}, "logit_bias"), ({"stop_token_ids": [999999]}, "stop_token_ids"),
        ({"echo": True, "logprobs": 1}, "echo"),
    ]
    matrix = [("POST", c, {**ok, **change}, {}, 400, param) for change, param in cases]
    chat_cases = [
        ({"messages": None}, "messages"), ({"messages": []}, "messages"),
        ({"messages": [{"content": "x"}]}, "messages[0].role"),
        ({"logprobs": True, "top_logprobs": 30}, "top_logprobs"), ({"top_logprobs": 2}, "top_logprobs"),
        ({"max_completion_tokens": 0}, "max_completion_tokens"),
        ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
         "messages[0].content[0]"),
        ({"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools"),
    ]
    matrix += [("POST", ch, {**msgs, **change}, {}, 400, param) for change, param in chat_cases]
    matrix += [
        ("POST", c, {**ok, "model": "no-such-model"}, {}, 404, "model"),
        ("POST", ch, {**msgs, "model": "no-such-model"}, {}, 404, "model"),
        ("POST", c, ok, {"Authorization": "Bearer wrong-key"}, 401, None),
        ("POST", c, ok, {"Authorization": ""}, 401, None),
        ("GET", "/v1/models", None, {"Authorization": "Bearer " + KEY[:-1]}, 401, None),
        ("POST", "/v1/nothing-here", ok, {}, 404, None),
        ("GET", "/nothing-here", None, {}, 404, None),
        ("GET", c, None, {}, 405, None),
        ("POST", c, b"{\"prompt\": ", {}, 400, None),
        ("POST", c, b"[1, 2]", {}, 400, None),
        ("POST", c, b"", {}, 400, None),
        ("POST", c, b"{\"prompt\": \"" + b"x" * (5 << 20) + b"\"}", {}, 413, None),
    ]
    return matrix


def test_bad_requests_while_a_stream_runs(server, client, offline):
    reference = offline.generate(PROMPTS[6], greedy(64), use_tqdm=False)[0].text
    result: dict = {"text": "", "chunks": 0}
    started = threading.Event()

    def long_stream():
        for chunk in client.completions.create(model=MODEL, prompt=PROMPTS[6], max_tokens=64, temperature=0,
                                               stream=True):
            result["text"] += chunk.choices[0].text
            result["chunks"] += 1
            result["finish"] = chunk.choices[0].finish_reason
            started.set()

    thread = threading.Thread(target=long_stream, daemon=True)
    thread.start()
    assert started.wait(120), "the long stream never started"
    failures = []
    with httpx.Client(base_url=server.url, timeout=60) as http:
        for method, path, body, headers, status, param in _bad_request_matrix(server):
            hdrs = {**server.headers(), **headers}
            if isinstance(body, bytes):
                resp = http.request(method, path, content=body, headers={**hdrs, "Content-Type": "application/json"})
            else:
                resp = http.request(method, path, json=body, headers=hdrs)
            error = resp.json().get("error") if resp.headers.get("content-type", "").startswith("application/json") \
                else None
            ok = (resp.status_code == status and isinstance(error, dict)
                  and set(error) == {"message", "type", "param", "code"} and error["message"]
                  and (param is None or error["param"] == param))
            if not ok:
                failures.append((method, path, str(body)[:80], status, param, resp.status_code, resp.text[:300]))
    still_streaming = thread.is_alive()
    thread.join(120)
    assert not failures, "\n".join(map(str, failures))
    assert still_streaming, "the stream ended before the matrix did; it did not overlap the bad requests"
    assert (result["text"], result["finish"]) == (reference, "length")
    after = client.completions.create(model=MODEL, prompt=PROMPTS[6], max_tokens=4, temperature=0)
    assert after.choices[0].text == offline.generate(PROMPTS[6], greedy(4), use_tqdm=False)[0].text


def test_openai_client_errors(server):
    with openai.OpenAI(base_url=server.url + "/v1", api_key="wrong", max_retries=0) as bad_key:
        with pytest.raises(openai.AuthenticationError):
            bad_key.models.list()
    with openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0) as c:
        with pytest.raises(openai.NotFoundError) as not_found:
            c.completions.create(model="gpt-nothing", prompt="hi", max_tokens=2)
        assert not_found.value.body["param"] == "model"
        with pytest.raises(openai.BadRequestError) as bad:
            c.completions.create(model=MODEL, prompt="hi", max_tokens=2, temperature=-1)
        assert bad.value.body["param"] == "temperature"


def test_metrics(server, client):
    long_prompt = " ".join(PROMPTS)  # more than one 16-token block: the second run hits the prefix cache
    hits_before = metric_value(_metrics(server), "allmos:prefix_cache_hits_total")
    for _ in range(2):
        client.completions.create(model=MODEL, prompt=long_prompt, max_tokens=4, temperature=0)
    text = _metrics(server)
    for name in ("allmos:num_requests_running", "allmos:num_requests_waiting", "allmos:kv_cache_usage_perc",
                 "allmos:prefix_cache_queries_total", "allmos:prefix_cache_hits_total",
                 "allmos:prompt_tokens_total", "allmos:generation_tokens_total",
                 "allmos:time_to_first_token_seconds_count", "allmos:inter_token_latency_seconds_count",
                 "allmos:e2e_request_latency_seconds_count", "allmos:request_queue_time_seconds_count"):
        assert metric_value(text, name) is not None, name
    assert metric_value(text, "allmos:generation_tokens_total") >= 4
    assert metric_value(text, "allmos:prefix_cache_hits_total") - hits_before >= 16
    assert metric_value(text, "allmos:e2e_request_latency_seconds_count") >= 1
    assert metric_value(text, "allmos:request_success_total", finished_reason="length") >= 1
