"""Random schedules through the split engine (input processor, engine core, output processor) and through
the reference copy of the engine before the split (``tests/legacy_engine``, see its docstring): every
step returns the same outputs (token ids, text, finish and stop reasons, logprobs, prompt logprobs, cached
token counts), and both leave every KV block free.

Schedules mix adds, aborts and steps; the engines run with a tiny KV cache (preemptions), a small token
budget (chunked prefill), prefix caching on shared prompt prefixes, ``n > 1``, seeded and engine-seeded
sampling, penalties (the synchronous path), stop strings, stop token ids, ``min_tokens``, logprobs and
prompt logprobs, streaming and final-only requests.
"""

from __future__ import annotations

import random
import shutil

import pytest
from conftest import make_tiny_model
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from legacy_engine.llm_engine import LLMEngine as LegacyEngine

from allmos.config import EngineConfig
from allmos.engine.llm_engine import LLMEngine
from allmos.sampling_params import SamplingParams

ENGINE = dict(kvcache_block_size=16, num_kvcache_blocks=14, max_num_batched_tokens=48, max_num_seqs=6,
              max_model_len=256, seed=3)

ops = st.lists(st.one_of(
    st.tuples(st.just("add"), st.integers(0, 10**6)),
    st.tuples(st.just("add"), st.integers(0, 10**6)),
    st.tuples(st.just("step"), st.integers(1, 3)),
    st.tuples(st.just("abort"), st.integers(0, 50)),
), min_size=4, max_size=14)


def random_request(rng: random.Random, prefix: list[int], vocab: int) -> tuple[list[int], SamplingParams, bool]:
    length = rng.randint(1, 60)
    shared = prefix[:rng.choice([0, 16, 33])] if rng.random() < 0.5 else []
    prompt = (shared + [rng.randrange(3, vocab) for _ in range(length)])[:120]
    kwargs = dict(max_tokens=rng.randint(1, 12), temperature=rng.choice([0.0, 0.8, 1.0]),
                  seed=rng.choice([None, rng.randrange(1000)]), n=rng.choice([1, 1, 2, 3]),
                  ignore_eos=rng.random() < 0.7)
    if rng.random() < 0.25:
        kwargs.update(repetition_penalty=1.3, presence_penalty=0.5, frequency_penalty=0.2)
    if rng.random() < 0.3:
        kwargs["stop"] = [rng.choice(["e", "a", "in", " t", "er"])]
    if rng.random() < 0.2:
        kwargs["stop_token_ids"] = [rng.randrange(3, vocab) for _ in range(3)]
    if rng.random() < 0.2:
        kwargs["min_tokens"] = rng.randint(0, kwargs["max_tokens"])
    if rng.random() < 0.3:
        kwargs["logprobs"] = rng.choice([0, 2])
    if rng.random() < 0.15:
        kwargs["prompt_logprobs"] = rng.choice([0, 1])
    return prompt, SamplingParams(**kwargs), rng.random() < 0.4


def same_step(new: LLMEngine, old: LegacyEngine) -> None:
    """One step of each: the same outputs, and the same scheduler and KV-cache state afterwards."""
    assert comparable(new.step()) == comparable(old.step())
    stats = new.get_stats()
    assert (stats.num_running, stats.num_waiting, stats.num_preemptions, stats.num_free_blocks) == (
        len(old.scheduler.running), len(old.scheduler.waiting), old.scheduler.num_preemptions,
        old.block_manager.num_free_blocks)


def comparable(outputs) -> list:
    """Everything of a RequestOutput but the wall-clock metrics."""
    return [(o.request_id, o.prompt, o.prompt_token_ids, o.finished, o.num_cached_tokens, o.prompt_logprobs,
             [(c.index, c.text, c.token_ids, c.cumulative_logprob, c.logprobs, c.finish_reason, c.stop_reason)
              for c in o.outputs]) for o in outputs]


@pytest.fixture(scope="module")
def engine_pairs(tmp_path_factory, default_model_dir):
    """(new, reference) engine pairs, prefix caching on and off, on a tiny random Llama (vocabulary 512)
    with SmolLM2's tokenizer (ids below 512 decode to short byte-level pieces, so stop strings match).
    The pairs live across examples: both engines of a pair see the same history, so they stay in step."""
    folder = make_tiny_model(tmp_path_factory.mktemp("llama_eq"), "llama", vocab_size=512)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (default_model_dir / name).exists():
            shutil.copy(default_model_dir / name, folder / name)
    pairs = {}
    for prefix_caching in (True, False):
        config = EngineConfig.from_kwargs(str(folder), enable_prefix_caching=prefix_caching, **ENGINE)
        pairs[prefix_caching] = (LLMEngine(config), LegacyEngine(config))
    yield pairs
    for pair in pairs.values():
        for engine in pair:
            engine.shutdown()


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                HealthCheck.function_scoped_fixture])
@given(operations=ops, prefix_caching=st.booleans())
def test_split_engine_matches_the_pre_split_engine(engine_pairs, operations, prefix_caching):
    new, old = engine_pairs[prefix_caching]
    vocab = new.info.vocab_size
    rng = random.Random(len(operations))
    prefix = [rng.randrange(3, vocab) for _ in range(40)]
    live: list[str] = []
    for op, arg in operations:
        if op == "add":
            prompt, params, stream = random_request(random.Random(arg), prefix, vocab)
            results = []
            for engine in (new, old):
                try:
                    results.append(engine.add_request(None, prompt, params, stream=stream))
                except ValueError as exc:
                    results.append(f"ValueError: {exc}")
            assert results[0] == results[1]
            live.append(results[0])
        elif op == "abort" and live:
            rid = live[arg % len(live)]
            assert comparable([o for o in [new.abort(rid)] if o]) == comparable([o for o in [old.abort(rid)] if o])
        for _ in range(arg if op == "step" else 1):
            same_step(new, old)
    for _ in range(2000):
        if not (new.has_unfinished() or old.has_unfinished()):
            break
        same_step(new, old)
    assert not new.has_unfinished() and not old.has_unfinished()
    for engine in (new, old):
        engine.block_manager.check_integrity()
        assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks
