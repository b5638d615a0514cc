"""Property tests: random add / step / abort / finish sequences through the scheduler and block
manager, with ``check_integrity()`` after every operation (no model involved)."""

from __future__ import annotations

import random

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from allmos.engine.request import Request, RequestStatus
from allmos.engine.scheduler import ContinuousBatchingScheduler, SchedulerConfig
from allmos.memory.block_manager import BlockManager
from allmos.sampling_params import SamplingParams

ops = st.lists(
    st.one_of(
        st.tuples(st.just("add"), st.integers(1, 70), st.integers(1, 30), st.integers(0, 3)),
        st.tuples(st.just("step"), st.integers(0, 0), st.integers(0, 0), st.integers(0, 0)),
        st.tuples(st.just("abort"), st.integers(0, 50), st.integers(0, 0), st.integers(0, 0)),
    ),
    min_size=1, max_size=60,
)


def step(sched, rng, budget, max_num_seqs):
    """One scheduler step with a fake model: every sampled sequence gets a random token."""
    batch = sched.schedule()
    sched.check_integrity()
    if sched.has_unfinished():
        assert not batch.is_empty, "a schedule with work pending must make progress"
    assert batch.num_tokens <= budget and len(batch.seqs) <= max_num_seqs
    sched.on_step_done(batch)
    for seq in batch.sampled_seqs:
        req = sched.requests[seq.request_id]
        req.append_token(rng.randrange(100))
        if req.num_output_tokens >= req.params.max_tokens:
            sched.finish(req, "length")


def simulate(operations, num_blocks, block_size, budget, max_num_seqs, prefix_caching):
    bm = BlockManager(num_blocks, block_size, prefix_caching)
    sched = ContinuousBatchingScheduler(SchedulerConfig(max_num_seqs, budget, 4096), bm)
    rng = random.Random(0)
    shared_prefix = [rng.randrange(100) for _ in range(40)]
    made = 0
    for op, a, b, c in operations:
        if op == "add":
            prompt = (shared_prefix[: a // 2] + [rng.randrange(100) for _ in range(a - a // 2)]) if c else \
                [rng.randrange(100) for _ in range(a)]
            req = Request(f"r{made}", prompt, SamplingParams(max_tokens=b), seed=made)
            made += 1
            try:
                sched.add(req)
            except ValueError:
                assert bm.num_blocks_for(min(a + b, 4096)) > num_blocks  # rejected only if it can never fit
        elif op == "step":
            step(sched, rng, budget, max_num_seqs)
        else:
            live = sorted(sched.requests)
            if live:
                sched.finish(sched.requests[live[a % len(live)]], "abort")
        sched.check_integrity()
    # drain: everything finishes and every block comes back
    for _ in range(10_000):
        if not sched.has_unfinished():
            break
        step(sched, rng, budget, max_num_seqs)
        sched.check_integrity()
    assert not sched.has_unfinished()
    assert bm.num_free_blocks == num_blocks
    bm.check_integrity()


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(operations=ops, num_blocks=st.integers(3, 24), block_size=st.sampled_from([4, 8, 16]),
       budget=st.integers(1, 64), max_num_seqs=st.integers(1, 6), prefix_caching=st.booleans())
def test_random_workloads_keep_invariants(operations, num_blocks, block_size, budget, max_num_seqs, prefix_caching):
    simulate(operations, num_blocks, block_size, budget, max_num_seqs, prefix_caching)


@settings(max_examples=80, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["alloc", "free", "compute"]), st.integers(0, 7), st.integers(1, 40)),
                max_size=80))
def test_block_manager_direct(operations):
    """Allocate / compute / free directly, with prefix hits on shared token streams."""
    bm = BlockManager(12, 4)
    streams = [[i % 3] * 200 for i in range(8)]  # only three distinct token streams: many prefix hits
    seqs: dict[int, Request] = {}
    for op, k, n in operations:
        if op == "alloc" and k not in seqs:
            req = Request(str(k), streams[k][:n], SamplingParams(), seed=0)
            cached = bm.find_cached_prefix(req)
            assert len(cached) * 4 < n
            if bm.allocate(req, n - len(cached) * 4, cached):
                req.num_computed_tokens = len(cached) * 4
                seqs[k] = req
        elif op == "compute" and k in seqs:
            req = seqs[k]
            req.num_computed_tokens = req.num_tokens
            bm.cache_full_blocks(req)
        elif op == "free" and k in seqs:
            bm.free(seqs.pop(k))
        bm.check_integrity(list(seqs.values()))
    for req in seqs.values():
        bm.free(req)
    bm.check_integrity()
    assert bm.num_free_blocks == 12


def test_lru_reuse_of_freed_cached_blocks():
    bm = BlockManager(4, 2)
    a = Request("a", [1, 2, 3, 4, 5], SamplingParams(), seed=0)
    assert bm.allocate(a, 5)
    a.num_computed_tokens = 5
    bm.cache_full_blocks(a)
    bm.free(a)  # blocks stay cached while free
    b = Request("b", [1, 2, 3, 4, 9], SamplingParams(), seed=0)
    hit = bm.find_cached_prefix(b)
    assert len(hit) == 2
    assert bm.allocate(b, 1, hit)
    assert b.block_table[:2] == hit
    bm.check_integrity([b])


def test_request_too_large_for_cache_rejected():
    bm = BlockManager(4, 16)
    sched = ContinuousBatchingScheduler(SchedulerConfig(8, 64, 4096), bm)
    with pytest.raises(ValueError, match="KV cache"):
        sched.add(Request("x", list(range(60)), SamplingParams(max_tokens=10), seed=0))
    assert not sched.has_unfinished()


def test_preempted_request_resumes_before_new_work():
    bm = BlockManager(4, 4)
    sched = ContinuousBatchingScheduler(SchedulerConfig(8, 64, 4096), bm)
    reqs = [Request(f"r{i}", [i] * 4, SamplingParams(max_tokens=8), seed=0) for i in range(3)]
    for r in reqs:
        sched.add(r)
    batch = sched.schedule()
    sched.on_step_done(batch)
    for s in batch.sampled_seqs:
        sched.requests[s.request_id].append_token(0)
    batch = sched.schedule()  # each needs a second block: 3 + 3 > 4, the newest is preempted
    assert sched.num_preemptions >= 1
    assert sched.waiting[0].status is RequestStatus.WAITING
    late = Request("late", [9] * 4, SamplingParams(max_tokens=1), seed=0)
    sched.add(late)
    assert list(sched.waiting)[-1] is late
    sched.check_integrity()
