"""Tensor parallelism: tp=2 (driver + one spawned worker, gloo on the CPU) against tp=1, lifecycle, failures.

The oracle is the single-process engine (itself checked against transformers in test_engine_parity).
Every tp=2 engine here runs with ALLMOS_TP_VERIFY=1, so each step also checks that both ranks sampled
the same tokens.
"""

from __future__ import annotations

import gc
import os
import random
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest
import torch

from allmos import LLM, SamplingParams
from allmos.engine.batch import ScheduledBatch, ScheduledSeq
from allmos.engine.model_runner import PendingStep
from allmos.engine.sampler import SamplingRow
from allmos.engine.serialization import (
    BatchDecoder,
    BatchEncoder,
    Message,
    MessageKind,
    decode_message,
    deserialize_batch,
    encode_message,
    serialize_batch,
)
from allmos.engine.tp_runner import WorkerError, _WatchedStep
from allmos.engine.worker import check_same_tokens, connect_store, init_rank_groups

MAX_NEW = 10
# Bounds that separate "raised / exited" from "hung" (the collectives' own timeout is 30 minutes); wide
# enough that a busy 2-core machine never trips them.
HANG_S = 120.0
CHILD_EXIT_S = 30.0
ENGINE = dict(kvcache_block_size=16, max_num_batched_tokens=96)


@pytest.fixture(autouse=True)
def verify_tokens(monkeypatch):
    monkeypatch.setenv("ALLMOS_TP_VERIFY", "1")
    monkeypatch.delenv("ALLMOS_TP_FAIL_AT", raising=False)
    monkeypatch.delenv("MASTER_PORT", raising=False)


def make_prompts(seed: int, lengths=(1, 5, 17, 40, 130), vocab: int = 512) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(3, vocab) for _ in range(n)] for n in lengths]


GREEDY = SamplingParams(temperature=0, max_tokens=MAX_NEW, ignore_eos=True)


def sampled_params() -> list[SamplingParams]:
    return [
        SamplingParams(temperature=0.8, top_p=0.9, top_k=50, seed=7, max_tokens=MAX_NEW, ignore_eos=True, logprobs=2),
        SamplingParams(temperature=1.0, seed=11, n=2, max_tokens=MAX_NEW, ignore_eos=True),
        SamplingParams(temperature=0.7, min_p=0.05, seed=3, repetition_penalty=1.3, presence_penalty=0.5,
                       max_tokens=MAX_NEW, ignore_eos=True),  # penalties: token lists travel in the message
        SamplingParams(temperature=0.9, seed=5, min_tokens=4, max_tokens=MAX_NEW),  # banned ids until min_tokens
        SamplingParams(temperature=0, max_tokens=MAX_NEW, ignore_eos=True, logprobs=3),
    ]


def generate(llm: LLM, prompts, params):
    outs = llm.generate(prompts, params, use_tqdm=False)
    bm = llm.engine.block_manager
    bm.check_integrity()
    assert bm.num_free_blocks == bm.num_blocks
    return outs


def tokens(outs) -> list[list[list[int]]]:
    return [[c.token_ids for c in o.outputs] for o in outs]


def live_children() -> set[int]:
    """Live (non-zombie) child processes of this process, except multiprocessing's resource tracker."""
    me, found = os.getpid(), set()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmdline = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        state, ppid = stat.rsplit(")", 1)[1].split()[:2]
        if int(ppid) == me and state != "Z" and b"resource_tracker" not in cmdline:
            found.add(int(entry.name))
    return found


def wait_until(predicate, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return predicate()


# --------------------------------------------------------------------------- serialization


def test_batch_roundtrip_is_exact():
    row = SamplingRow(temperature=0.1 + 0.2, top_k=7, top_p=0.95, min_p=1e-3, seed=2**63 - 5, position=12345,
                      presence_penalty=-0.3, frequency_penalty=1e-17, repetition_penalty=1.3, num_logprobs=0,
                      prompt_token_ids=[1, 2, 3], output_token_ids=[9, 9], banned_token_ids=[2])
    batch = ScheduledBatch([
        ScheduledSeq("a", [5, 6, 7], 0, [3, 4], row),
        ScheduledSeq("b#1", [-1], 40, [0, 1, 2], SamplingRow(temperature=0.0, num_logprobs=None,
                                                             prompt_token_ids=[], output_token_ids=[],
                                                             banned_token_ids=[])),
        ScheduledSeq("c \u00e9\"", list(range(100)), 16, [9], None),  # a prefill chunk that samples nothing
    ])
    assert deserialize_batch(serialize_batch(batch)) == batch
    message = decode_message(encode_message(Message(MessageKind.STEP, batch)))
    assert message.kind is MessageKind.STEP and message.batch == batch
    assert decode_message(encode_message(Message(MessageKind.SHUTDOWN))) == Message(MessageKind.SHUTDOWN)
    assert deserialize_batch(serialize_batch(ScheduledBatch([]))) == ScheduledBatch([])


def test_stateful_channel_reproduces_every_batch():
    """Random step sequences (requests leaving and returning, tables growing or replaced as after a
    preemption, rows kept, rebuilt or dropped): the decoder returns each batch exactly, and a steady decode
    step sends neither block tables nor rows again."""
    rng = random.Random(0)
    for _trial in range(30):
        encoder, decoder = BatchEncoder(), BatchDecoder()
        tables = {f"r{i}": [rng.randrange(1000)] for i in range(12)}
        rows = {rid: _row(temperature=rng.random(), seed=rng.randrange(2**63)) for rid in tables}
        for _step in range(25):
            seqs = []
            for rid in rng.sample(sorted(tables), rng.randrange(0, len(tables) + 1)):
                event = rng.random()
                if event < 0.3:
                    tables[rid] = tables[rid] + [rng.randrange(1000)]
                elif event < 0.35:
                    tables[rid] = [rng.randrange(1000) for _ in range(rng.randrange(0, 4))]
                elif event < 0.45:
                    rows[rid] = _row(temperature=rng.random(), output_token_ids=[rng.randrange(9)])
                sampling = None if rng.random() < 0.1 else rows[rid]
                seqs.append(ScheduledSeq(rid, [rng.randrange(-1, 50) for _ in range(rng.randrange(1, 4))],
                                         rng.randrange(100), list(tables[rid]), sampling))
            batch = ScheduledBatch(seqs)
            assert decode_message(encode_message(Message(MessageKind.STEP, batch), encoder), decoder).batch == batch
    steady = ScheduledBatch([ScheduledSeq(f"r{i}", [-1], 700, list(range(8 * i, 8 * i + 6)),
                                          _row(seed=i)) for i in range(64)])
    encoder = BatchEncoder()
    first, again = encoder.encode(steady), encoder.encode(steady)
    assert len(again) < len(first) / 3
    assert BatchDecoder().decode(first) == steady


def _row(**fields) -> SamplingRow:
    """A row as it comes back from JSON (sequence fields as lists)."""
    return SamplingRow(**{"prompt_token_ids": [], "output_token_ids": [], "banned_token_ids": [], **fields})


def test_decoder_rejects_state_it_does_not_hold():
    batch = ScheduledBatch([ScheduledSeq("a", [-1], 5, [1, 2], SamplingRow())])
    encoder = BatchEncoder()
    encoder.encode(batch)
    with pytest.raises(ValueError, match="block ids"):
        BatchDecoder().decode(encoder.encode(batch))  # a decoder that missed the first message


def test_bad_messages_raise_value_error():
    with pytest.raises(ValueError, match="kind"):
        decode_message(b"\x09")
    with pytest.raises(ValueError, match="version"):
        deserialize_batch(b"[999, []]")
    with pytest.raises(ValueError):
        deserialize_batch(b"not json")


# --------------------------------------------------------------------------- parity


@pytest.mark.parametrize("arch,kwargs", [
    ("qwen3", dict(num_kv_heads=2)),             # GQA: one KV head per rank, q/k norms
    ("llama", dict(num_kv_heads=1, tie=True)),   # MQA: the KV head is replicated on both ranks; tied LM head
])
def test_tp2_matches_tp1(tiny_model_factory, arch, kwargs):
    folder = str(tiny_model_factory(arch, **kwargs))
    greedy_prompts = make_prompts(1)
    sampled_prompts = make_prompts(2)
    single = LLM(folder, **ENGINE)
    want_greedy = tokens(generate(single, greedy_prompts, GREEDY))
    want_sampled = generate(single, sampled_prompts, sampled_params())
    del single
    gc.collect()

    tp = LLM(folder, tensor_parallel_size=2, **ENGINE)
    assert tp.engine.runner.num_kv_blocks == tp.engine.block_manager.num_blocks
    assert tokens(generate(tp, greedy_prompts, GREEDY)) == want_greedy
    got_sampled = generate(tp, sampled_prompts, sampled_params())
    assert tokens(got_sampled) == tokens(want_sampled)
    for got, want in zip(got_sampled, want_sampled, strict=True):
        for a, b in zip(got.outputs, want.outputs, strict=True):
            assert (a.logprobs is None) == (b.logprobs is None)
            for step_a, step_b in zip(a.logprobs or [], b.logprobs or [], strict=True):
                assert step_a.keys() == step_b.keys()
                assert all(abs(step_a[t].logprob - step_b[t].logprob) < 1e-4 for t in step_a)
    workers = tp.engine.runner.workers
    del tp
    gc.collect()
    assert all(not p.is_alive() for p in workers)


def test_tp2_matches_tp1_under_preemption(qwen3_dir):
    """A KV cache too small for the batch: requests are preempted and recomputed, so block tables are
    replaced and requests leave and rejoin the step messages (the stateful channel's full-resend paths)."""
    prompts = make_prompts(3)
    kwargs = dict(ENGINE, num_kvcache_blocks=12)
    single = LLM(str(qwen3_dir), **kwargs)
    want = tokens(generate(single, prompts, GREEDY))
    preemptions = single.engine.scheduler.num_preemptions
    del single
    gc.collect()
    assert preemptions > 0  # the test exercises what it claims to
    tp = LLM(str(qwen3_dir), tensor_parallel_size=2, **kwargs)
    assert tokens(generate(tp, prompts, GREEDY)) == want
    tp.engine.shutdown()


def test_two_engines_at_once(qwen3_dir, monkeypatch):
    before = live_children()
    prompts = make_prompts(4, lengths=(3, 33, 70))
    single = LLM(str(qwen3_dir), **ENGINE)
    want = tokens(generate(single, prompts, GREEDY))
    del single
    gc.collect()

    with socket.socket() as s:  # the first engine rendezvous at MASTER_PORT, the second picks a free port
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(port))
    first = LLM(str(qwen3_dir), tensor_parallel_size=2, **ENGINE)
    monkeypatch.delenv("MASTER_PORT")
    second = LLM(str(qwen3_dir), tensor_parallel_size=2, **ENGINE)
    assert len(live_children() - before) == 2
    assert tokens(generate(first, prompts, GREEDY)) == want
    assert tokens(generate(second, prompts[::-1], GREEDY)) == want[::-1]
    assert tokens(generate(first, prompts[:1], GREEDY)) == want[:1]

    # a worker killed while its engine idles: that engine reports it, the other one keeps working
    victim = second.engine.runner.workers[0]
    os.kill(victim.pid, signal.SIGKILL)
    with pytest.raises(WorkerError, match=f"pid {victim.pid}.*exited with code -9"):
        second.generate(prompts[:1], GREEDY, use_tqdm=False)
    assert tokens(generate(first, prompts[1:], GREEDY)) == want[1:]
    del first, second
    gc.collect()
    assert wait_until(lambda: not (live_children() - before), CHILD_EXIT_S), live_children() - before


# --------------------------------------------------------------------------- failures


def test_worker_exception_surfaces_in_driver(qwen3_dir, monkeypatch):
    before = live_children()
    monkeypatch.setenv("ALLMOS_TP_FAIL_AT", "1:3")  # rank 1 raises in its third step
    llm = LLM(str(qwen3_dir), tensor_parallel_size=2, **ENGINE)
    start = time.monotonic()
    with pytest.raises(WorkerError, match="injected failure on rank 1 at step 3"):
        llm.generate(make_prompts(5, lengths=(4, 9)), GREEDY, use_tqdm=False)
    assert time.monotonic() - start < HANG_S
    assert not (live_children() - before)  # the failure already stopped every worker
    with pytest.raises(RuntimeError, match="worker"):
        llm.generate([[5, 6, 7]], GREEDY, use_tqdm=False)
    del llm
    gc.collect()
    assert wait_until(lambda: not (live_children() - before), CHILD_EXIT_S)


def test_worker_failing_at_startup_fails_the_constructor(qwen3_dir, monkeypatch):
    before = live_children()
    monkeypatch.setenv("ALLMOS_TP_FAIL_AT", "1:0")
    start = time.monotonic()
    with pytest.raises(WorkerError, match="injected failure on rank 1 at start-up"):
        LLM(str(qwen3_dir), tensor_parallel_size=2, **ENGINE)
    assert time.monotonic() - start < HANG_S
    gc.collect()
    assert not (live_children() - before)
    assert wait_until(lambda: not (live_children() - before), CHILD_EXIT_S)


def _token_check_errors(tokens_per_rank: list[list[int]]) -> list[BaseException | None]:
    """Run the ALLMOS_TP_VERIFY check over a real gloo group, ranks as threads of this process."""
    stores = [connect_store("127.0.0.1", 0, 2, 0, 30)]
    stores.append(connect_store("127.0.0.1", stores[0].port, 2, 1, 30))
    errors: list[BaseException | None] = [None, None]

    def rank_main(rank: int) -> None:
        groups = init_rank_groups(stores[rank], rank, 2, torch.device("cpu"), 30)
        try:
            check_same_tokens(groups.control, 2, tokens_per_rank[rank])
        except RuntimeError as exc:
            errors[rank] = exc

    threads = [threading.Thread(target=rank_main, args=(rank,)) for rank in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    return errors


def test_token_check_detects_divergence():
    assert _token_check_errors([[4, 5, 6], [4, 5, 6]]) == [None, None]
    errors = _token_check_errors([[4, 5, 6], [4, 5, 7]])
    assert all(isinstance(e, RuntimeError) and "different tokens" in str(e) for e in errors), errors


def test_gpu_wait_raises_when_a_worker_fails_meanwhile():
    """The GPU-only polling wait, with a step that never completes and a failure reported meanwhile."""

    class NeverReady(PendingStep):
        def is_ready(self) -> bool:
            return False

    class Pool:
        failure = None

    pool = Pool()
    step = _WatchedStep(NeverReady(None, []), pool)
    threading.Timer(0.2, lambda: setattr(pool, "failure", "rank 1 raised: boom")).start()
    start = time.monotonic()
    with pytest.raises(WorkerError, match="boom"):
        step.result()
    assert time.monotonic() - start < HANG_S


def test_tp_must_divide_heads(qwen3_dir):
    before = live_children()
    with pytest.raises(ValueError, match="tensor_parallel_size=3 .*num_attention_heads=4"):
        LLM(str(qwen3_dir), tensor_parallel_size=3)
    assert not (live_children() - before)


DRIVER_SCRIPT = """
import signal, sys, time
from allmos import LLM, SamplingParams

if __name__ == "__main__":
    # Ctrl-C live, as in a terminal: a test run started in the background inherits SIGINT ignored, and Python
    # then installs no KeyboardInterrupt handler
    signal.signal(signal.SIGINT, signal.default_int_handler)
    llm = LLM(sys.argv[1], tensor_parallel_size=2, kvcache_block_size=16)
    print("WORKERS", *[p.pid for p in llm.engine.runner.workers], flush=True)
    params = SamplingParams(temperature=0, max_tokens=1500, ignore_eos=True)
    while True:
        llm.generate([[5, 6, 7]] * 8, params, use_tqdm=False)
"""


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGKILL])
def test_no_orphans_when_driver_is_interrupted_or_killed(qwen3_dir, tmp_path, sig):
    script = tmp_path / "driver.py"
    script.write_text(textwrap.dedent(DRIVER_SCRIPT))
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
    stderr = tmp_path / "driver.err"
    with stderr.open("w") as err:
        driver = subprocess.Popen([sys.executable, str(script), str(qwen3_dir)], stdout=subprocess.PIPE,
                                  stderr=err, text=True, env=env)
    try:
        line = driver.stdout.readline()
        assert line.startswith("WORKERS"), line
        workers = [int(pid) for pid in line.split()[1:]]
        time.sleep(0.5)  # mid-generate
        driver.send_signal(sig)
        try:
            driver.wait(timeout=30)
        except subprocess.TimeoutExpired:
            pytest.fail(f"the driver did not exit after {sig.name}:\n{stderr.read_text()[-3000:]}")

        def gone() -> bool:
            return not any(Path(f"/proc/{pid}").exists() and "Z" not in _state(pid) for pid in workers)

        assert wait_until(gone, CHILD_EXIT_S), f"worker(s) {workers} outlived the driver ({sig.name})"
    finally:
        if driver.poll() is None:
            driver.kill()


UNGUARDED_SCRIPT = """
import sys
from allmos import LLM, SamplingParams
llm = LLM(sys.argv[1] if len(sys.argv) > 1 else FOLDER, tensor_parallel_size=2, kvcache_block_size=16)
out = llm.generate([[5, 6, 7]], SamplingParams(temperature=0, max_tokens=4, ignore_eos=True), use_tqdm=False)
print("TOKENS", *out[0].token_ids, flush=True)
"""


def test_workers_never_import_the_users_main_module(qwen3_dir, tmp_path):
    """A script with no ``__main__`` guard, and the same script read from standard input, both work:
    workers start from their own entry point instead of re-importing the user's main module."""
    single = LLM(str(qwen3_dir), kvcache_block_size=16)
    want = single.generate([[5, 6, 7]], SamplingParams(temperature=0, max_tokens=4, ignore_eos=True),
                           use_tqdm=False)[0].token_ids
    del single
    script = tmp_path / "unguarded.py"
    script.write_text(UNGUARDED_SCRIPT)
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
    env.pop("ALLMOS_TP_VERIFY", None)
    from_file = subprocess.run([sys.executable, str(script), str(qwen3_dir)], capture_output=True, text=True,
                               env=env, timeout=HANG_S)
    from_stdin = subprocess.run([sys.executable, "-"], input=UNGUARDED_SCRIPT.replace(
        "FOLDER", repr(str(qwen3_dir))), capture_output=True, text=True, env=env, timeout=HANG_S)
    for proc in (from_file, from_stdin):
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert f"TOKENS {' '.join(map(str, want))}" in proc.stdout.splitlines(), proc.stdout


def _state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return "Z"


# --------------------------------------------------------------------------- GPU


def _agree_under_tie_rule(ours, theirs, tie_gap: float = 0.1) -> bool:
    """Identical, or the first divergence sits where tp=1's top two logprobs nearly tie and each side's
    token is in the other's top 5."""
    for i, (a, b) in enumerate(zip(ours.token_ids, theirs.token_ids, strict=True)):
        if a == b:
            continue
        top_ours = sorted(ours.logprobs[i].items(), key=lambda kv: -kv[1].logprob)
        top_theirs = sorted(theirs.logprobs[i].items(), key=lambda kv: -kv[1].logprob)
        gap = top_theirs[0][1].logprob - top_theirs[1][1].logprob
        return gap < tie_gap and a in dict(top_theirs) and b in dict(top_ours)
    return True


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")
def test_gpu_tp2_matches_tp1_bf16(tiny_model_factory):
    # ALLMOS_TP_VERIFY stays on: both ranks must sample identical tokens over NCCL + CUDA graphs too
    folder = str(tiny_model_factory("qwen3", num_kv_heads=4, vocab_size=2048, hidden_size=512,
                                    intermediate_size=1024, num_attention_heads=8, num_hidden_layers=4,
                                    head_dim=128))
    rng = random.Random(0)
    prompts = [[rng.randrange(3, 2048) for _ in range(rng.choice([1, 7, 64, 300]))] for _ in range(12)]
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True, logprobs=5)
    kwargs = dict(dtype="bfloat16", device="cuda", gpu_memory_utilization=0.3, max_model_len=1024)
    before = live_children()
    single = LLM(folder, **kwargs)
    want = single.generate(prompts, params, use_tqdm=False)
    del single
    gc.collect()
    torch.cuda.empty_cache()
    tp = LLM(folder, tensor_parallel_size=2, **kwargs)
    got = tp.generate(prompts, params, use_tqdm=False)
    for g, w in zip(got, want, strict=True):
        assert _agree_under_tie_rule(g.outputs[0], w.outputs[0]), (g.outputs[0].token_ids, w.outputs[0].token_ids)
    tp.engine.shutdown()
    assert not (live_children() - before)
    del tp
    _return_gpu_memory()


def _return_gpu_memory() -> None:
    """Hand this process's cached GPU memory back, so a later engine (maybe another process) can size
    its KV cache from what is really free."""
    gc.collect()
    torch.cuda.empty_cache()


GPU_FAILURE_SCRIPT = """
import os, sys, time
from allmos import LLM, SamplingParams
from allmos.engine.tp_runner import WorkerError

if __name__ == "__main__":
    llm = LLM(sys.argv[1], tensor_parallel_size=2, device="cuda", dtype="bfloat16", gpu_memory_utilization=0.3,
              max_model_len=1024)
    print("WORKERS", *[p.pid for p in llm.engine.runner.workers], flush=True)
    start = time.monotonic()
    try:
        llm.generate([[5, 6, 7]] * 4, SamplingParams(temperature=0, max_tokens=50, ignore_eos=True), use_tqdm=False)
    except WorkerError as exc:
        print("RAISED", "injected failure" in str(exc), round(time.monotonic() - start, 2), flush=True)
"""


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")
def test_gpu_worker_failure_inside_cuda_graph_decode_does_not_hang(tiny_model_factory, tmp_path):
    """Rank 1 raises at its third step (a graph-captured decode): the driver's NCCL collective must be
    aborted, the engine must raise WorkerError, and the whole driver must exit (run in a subprocess so a
    hang fails the test instead of blocking it)."""
    folder = tiny_model_factory("qwen3", num_kv_heads=4, vocab_size=2048, hidden_size=512,
                                intermediate_size=1024, num_attention_heads=8, num_hidden_layers=4, head_dim=128)
    _return_gpu_memory()  # the subprocess sizes its KV cache from the card's free memory
    script = tmp_path / "gpu_failure.py"
    script.write_text(textwrap.dedent(GPU_FAILURE_SCRIPT))
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent), "ALLMOS_TP_FAIL_AT": "1:3"}
    env.pop("ALLMOS_TP_VERIFY", None)
    proc = subprocess.run([sys.executable, str(script), str(folder)], capture_output=True, text=True, env=env,
                          timeout=240)
    lines = proc.stdout.splitlines()
    assert any(line.startswith("RAISED True") for line in lines), (proc.stdout, proc.stderr[-3000:])
    workers = [int(pid) for line in lines if line.startswith("WORKERS") for pid in line.split()[1:]]
    assert wait_until(lambda: all(_state(pid) == "Z" for pid in workers), CHILD_EXIT_S)
