"""Tests of allmos.engine.sampler against references computed from the definitions.

References: argmax for greedy; softmax(logits / T) restricted by top-k / top-p / min-p
(computed in float64 here) for the empirical frequencies; vLLM's penalty formulas in a
plain Python loop; torch.log_softmax of the raw logits for logprobs; Python big-int
splitmix64 / murmur3 for the counter hash.
"""

from __future__ import annotations

import dataclasses
import math
import os
import random
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from allmos.engine import sampler as sampler_module
from allmos.engine.sampler import (
    GraphDraw,
    Sampler,
    SamplingRow,
    SamplingTensors,
    apply_penalties,
    graph_draw,
    graph_threshold,
    noise_key,
    uniform_bits_torch,
)

CPU = torch.device("cpu")


def _build(rows: list[SamplingRow], vocab_size: int) -> SamplingTensors:
    return SamplingTensors.build(rows, vocab_size, CPU)


def _sample(logits: torch.Tensor, rows: list[SamplingRow]):
    return Sampler(use_triton=False)(logits, _build(rows, logits.shape[1]))


# --------------------------------------------------------------------------- hash reference

M32, M64 = (1 << 32) - 1, (1 << 64) - 1


def _ref_splitmix_finalizer(z: int) -> int:
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & M64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & M64
    return z ^ (z >> 31)


def _ref_fmix32(x: int) -> int:
    x ^= x >> 16
    x = (x * 0x85EBCA6B) & M32
    x ^= x >> 13
    x = (x * 0xC2B2AE35) & M32
    return x ^ (x >> 16)


def _ref_bits(seed: int, position: int, index: int) -> int:
    state = _ref_splitmix_finalizer((seed + 0x9E3779B97F4A7C15) & M64)
    key = _ref_splitmix_finalizer((state + (position + 1) * 0x9E3779B97F4A7C15) & M64)
    x = _ref_fmix32((index * 0x9E3779B1 + (key & M32)) & M32)
    x = _ref_fmix32(x ^ (key >> 32))
    return x >> 9


def test_hash_matches_python_big_int_reference():
    pairs = [(0, 0), (1, 0), (12345, 77), (2**63 - 1, 2**40), (987654321987, 5)]
    rows = [SamplingRow(seed=s, position=p) for s, p in pairs]
    t = _build(rows, 600)
    bits = uniform_bits_torch(t.noise_key_lo, t.noise_key_hi, 600)  # [5, 600]
    for r, (seed, position) in enumerate(pairs):
        key = (int(t.noise_key_hi[r]) & M32) << 32 | (int(t.noise_key_lo[r]) & M32)
        assert noise_key(seed, position) == key
        expected = [_ref_bits(seed, position, i) for i in range(600)]
        assert bits[r].tolist() == expected


def test_hash_bits_look_uniform():
    rows = [SamplingRow(seed=s, position=3) for s in range(64)]
    t = _build(rows, 4096)
    u = (uniform_bits_torch(t.noise_key_lo, t.noise_key_hi, 4096).double() + 0.5) / 2**23  # [64, 4096]
    n = u.numel()
    assert abs(u.mean().item() - 0.5) < 5 * math.sqrt(1 / 12 / n)
    counts = torch.histc(u.float(), bins=16, min=0, max=1)
    chi2 = ((counts - n / 16) ** 2 / (n / 16)).sum().item()
    assert chi2 < 15 + 6 * math.sqrt(30)
    # neighbouring indices and neighbouring rows are uncorrelated
    for a, b in ((u[:, :-1], u[:, 1:]), (u[:-1], u[1:])):
        corr = torch.corrcoef(torch.stack([a.flatten(), b.flatten()]))[0, 1].item()
        assert abs(corr) < 5 / math.sqrt(a.numel())


# --------------------------------------------------------------------------- greedy


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_greedy_is_argmax(dtype):
    torch.manual_seed(0)
    logits = torch.randn(16, 257).to(dtype)
    out = _sample(logits, [SamplingRow(temperature=0.0, seed=i, position=i) for i in range(16)])
    assert out.token_ids.dtype == torch.int64
    assert torch.equal(out.token_ids, logits.float().argmax(-1))
    assert out.logprobs is None and out.logprob_token_ids is None


@pytest.mark.parametrize("params", [dict(top_k=1), dict(top_p=1e-6), dict(temperature=1e-6)])
def test_degenerate_filters_equal_greedy(params):
    torch.manual_seed(1)
    logits = torch.randn(32, 500) * 0.3
    rows = [SamplingRow(**{"temperature": 1.5, **params}, seed=100 + i, position=i) for i in range(32)]
    assert torch.equal(_sample(logits, rows).token_ids, logits.argmax(-1))


def test_greedy_rows_in_a_random_batch_stay_argmax():
    torch.manual_seed(2)
    logits = torch.randn(10, 300)
    rows = [SamplingRow(temperature=0.0 if i % 2 else 1.0, top_k=3, seed=i, position=5) for i in range(10)]
    tokens = _sample(logits, rows).token_ids
    assert torch.equal(tokens[1::2], logits[1::2].argmax(-1))


# --------------------------------------------------------------------------- distributions

DIST_LOGITS = [2.0, 1.5, 1.2, 1.0, 0.6, 0.3, 0.0, -0.4, -0.9, -1.5, -2.2, -3.0]


def _reference_probs(logits, temperature, top_k=-1, top_p=1.0, min_p=0.0) -> list[float]:
    """softmax(logits / T) restricted by top-k, then top-p, then min-p (float64)."""
    weights = [math.exp(v / temperature) for v in logits]
    order = sorted(range(len(logits)), key=lambda i: -logits[i])
    kept = set(order[:top_k] if top_k > 0 else order)

    def normalized():
        total = sum(weights[i] for i in kept)
        return {i: weights[i] / total for i in kept}

    if top_p < 1.0:
        probs, mass, survivors = normalized(), 0.0, set()
        for i in (i for i in order if i in kept):
            assert abs(mass - top_p) > 1e-3, "ambiguous top-p boundary in the test data"
            if mass < top_p:
                survivors.add(i)
            mass += probs[i]
        kept = survivors
    if min_p > 0.0:
        probs = normalized()
        top = max(probs.values())
        assert all(abs(p - min_p * top) > 1e-4 for p in probs.values()), "ambiguous min-p boundary"
        kept = {i for i in kept if probs[i] >= min_p * top}
    probs = normalized()
    return [probs.get(i, 0.0) for i in range(len(logits))]


def _assert_counts_match(counts: list[int], expected: list[float]) -> None:
    """Filtered-out tokens never drawn; each frequency within 5 sigma; chi-square within 6 sigma."""
    num_draws = sum(counts)
    chi2, df = 0.0, -1
    for count, p in zip(counts, expected, strict=True):
        if p == 0.0:
            assert count == 0, "a filtered-out token was sampled"
            continue
        sigma = math.sqrt(p * (1 - p) / num_draws)
        assert abs(count / num_draws - p) < 5 * sigma + 1e-12
        chi2 += (count - num_draws * p) ** 2 / (num_draws * p)
        df += 1
    assert chi2 < df + 6 * math.sqrt(2 * max(df, 1))


@pytest.mark.parametrize(
    "params",
    [
        dict(temperature=1.0),
        dict(temperature=0.4),
        dict(temperature=2.5),
        dict(temperature=0.7, top_k=5),
        dict(temperature=1.3, top_p=0.8),
        dict(temperature=1.0, min_p=0.1),
        dict(temperature=0.9, top_k=8, top_p=0.9, min_p=0.05),
    ],
)
def test_empirical_frequencies_match_filtered_softmax(params):
    """One row's logits, 20000 independent draws taken at positions 0..N-1 of one seed."""
    num_draws, vocab = 20000, len(DIST_LOGITS)
    logits = torch.tensor(DIST_LOGITS).expand(num_draws, vocab)
    rows = [SamplingRow(**params, seed=2024, position=p) for p in range(num_draws)]
    counts = torch.bincount(_sample(logits, rows).token_ids, minlength=vocab).tolist()
    _assert_counts_match(counts, _reference_probs(DIST_LOGITS, **params))


@pytest.mark.parametrize(
    "groups",
    [
        # with top-p in the batch (sorted path)
        [dict(temperature=0.8), dict(temperature=1.0, top_k=3), dict(temperature=1.0, top_k=6),
         dict(temperature=1.2, top_p=0.7), dict(temperature=0.6, min_p=0.3)],
        # top-k without top-p (top-k only path)
        [dict(temperature=1.5), dict(temperature=1.0, top_k=2), dict(temperature=0.8, top_k=5),
         dict(temperature=1.0, top_k=9, min_p=0.05)],
    ],
)
def test_mixed_parameters_in_one_batch_follow_their_own_distributions(groups):
    """Rows with distinct seeds and different filters share one batch; each group is checked."""
    per_group, vocab = 4000, len(DIST_LOGITS)
    rows = [SamplingRow(**groups[i % len(groups)], seed=i * 7919 + 1, position=11)
            for i in range(per_group * len(groups))]
    logits = torch.tensor(DIST_LOGITS).expand(len(rows), vocab)
    tokens = _sample(logits, rows).token_ids
    for g, params in enumerate(groups):
        counts = torch.bincount(tokens[g :: len(groups)], minlength=vocab).tolist()
        _assert_counts_match(counts, _reference_probs(DIST_LOGITS, **params))


# --------------------------------------------------------------------------- determinism


def _mixed_rows(target: SamplingRow) -> list[SamplingRow]:
    """Seven unrelated rows (every feature on somewhere) plus `target` at index 3."""
    others = [
        SamplingRow(temperature=0.0, seed=1, position=9),
        SamplingRow(temperature=1.2, top_k=20, seed=2, position=4, num_logprobs=4),
        SamplingRow(temperature=0.6, top_p=0.5, seed=3, position=100),
        SamplingRow(temperature=1.0, min_p=0.2, seed=4, position=1, banned_token_ids=[0, 5, 6]),
        SamplingRow(temperature=0.9, seed=5, position=50, presence_penalty=1.0, frequency_penalty=-0.5,
                    repetition_penalty=1.3, prompt_token_ids=[1, 2, 3], output_token_ids=[4, 4, 7]),
        SamplingRow(temperature=2.0, top_k=2, top_p=0.3, seed=6, position=2),
        SamplingRow(temperature=0.0, seed=7, position=3, num_logprobs=0),
    ]
    return others[:3] + [target] + others[3:]


@pytest.mark.parametrize(
    "target",
    [
        dict(temperature=0.9),
        dict(temperature=1.1, top_p=0.95),
        dict(temperature=0.7, top_k=40, min_p=0.01),
    ],
)
def test_seeded_row_is_batch_invariant(target):
    torch.manual_seed(3)
    vocab = 300
    row_logits = torch.randn(vocab) * 2
    other_logits = torch.randn(8, vocab)
    for position in (0, 7, 123, 10**9):
        row = SamplingRow(**target, seed=42, position=position)
        alone = _sample(row_logits[None], [row]).token_ids[0]
        batch_logits = other_logits.clone()
        batch_logits[3] = row_logits
        in_batch = _sample(batch_logits, _mixed_rows(row)).token_ids[3]
        reversed_batch = _sample(batch_logits.flip(0), _mixed_rows(row)[::-1]).token_ids[4]
        assert alone == in_batch == reversed_batch


def test_same_seed_and_position_repeat_different_seeds_differ():
    vocab = 64
    logits = torch.zeros(300, vocab)
    same = _sample(logits, [SamplingRow(seed=9, position=17) for _ in range(300)]).token_ids
    assert (same == same[0]).all()
    again = _sample(logits[:1], [SamplingRow(seed=9, position=17)]).token_ids
    assert again[0] == same[0]
    by_seed = _sample(logits, [SamplingRow(seed=s, position=17) for s in range(300)]).token_ids
    by_position = _sample(logits, [SamplingRow(seed=9, position=p) for p in range(300)]).token_ids
    # 300 uniform draws over 64 tokens cover about 63 of them
    assert by_seed.unique().numel() >= 55
    assert by_position.unique().numel() >= 55
    assert (by_seed != by_position).float().mean() > 0.9


# --------------------------------------------------------------------------- penalties


def _reference_penalties(logits: torch.Tensor, rows: list[SamplingRow]) -> torch.Tensor:
    """vLLM: repetition on prompt + output, then frequency (output counts), then presence."""
    out = logits.double().clone()
    for b, row in enumerate(rows):
        for v in range(logits.shape[1]):
            value = out[b, v].item()
            count = list(row.output_token_ids).count(v)
            if v in row.prompt_token_ids or count > 0:
                value = value / row.repetition_penalty if value > 0 else value * row.repetition_penalty
            value -= row.frequency_penalty * count
            value -= row.presence_penalty * (1.0 if count > 0 else 0.0)
            out[b, v] = value
    return out


def _penalty_rows() -> list[SamplingRow]:
    return [
        SamplingRow(repetition_penalty=1.5, prompt_token_ids=[0, 1, 2, 2], output_token_ids=[3, 3, 9]),
        SamplingRow(frequency_penalty=0.7, prompt_token_ids=[5, 6], output_token_ids=[5, 5, 5, 8, 1]),
        SamplingRow(presence_penalty=-1.2, output_token_ids=[2, 2, 4, 30]),
        SamplingRow(repetition_penalty=0.6, frequency_penalty=-0.3, presence_penalty=1.9,
                    prompt_token_ids=[7, 8, 39], output_token_ids=[8, 8, 11, 0]),
        SamplingRow(prompt_token_ids=[1, 2, 3], output_token_ids=[1, 2]),  # no penalty
        SamplingRow(repetition_penalty=2.0, prompt_token_ids=list(range(40)), output_token_ids=[]),
    ]


def test_penalties_match_vllm_definitions():
    torch.manual_seed(4)
    logits = torch.randn(6, 40) * 3
    rows = _penalty_rows()
    got = apply_penalties(logits, _build(rows, 40))
    torch.testing.assert_close(got.double(), _reference_penalties(logits, rows), rtol=1e-6, atol=1e-6)


def test_penalized_greedy_uses_penalized_argmax():
    torch.manual_seed(5)
    logits = torch.randn(6, 40) * 3
    rows = [dataclasses.replace(row, temperature=0.0) for row in _penalty_rows()]
    expected = _reference_penalties(logits, rows).argmax(-1)
    assert torch.equal(_sample(logits, rows).token_ids, expected)


def test_penalties_do_not_touch_the_input():
    logits = torch.randn(6, 40)
    before = logits.clone()
    _sample(logits, _penalty_rows())
    _sample(logits, [SamplingRow(banned_token_ids=[1, 2]) for _ in range(6)])
    assert torch.equal(logits, before)


# --------------------------------------------------------------------------- logprobs


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_logprobs_are_raw_log_softmax(dtype):
    torch.manual_seed(6)
    vocab = 100
    logits = (torch.randn(6, vocab) * 2).to(dtype)
    rows = [
        SamplingRow(num_logprobs=None, seed=1),
        SamplingRow(num_logprobs=0, temperature=0.5, seed=2),
        SamplingRow(num_logprobs=3, temperature=0.0, repetition_penalty=1.5, prompt_token_ids=[1, 2]),
        SamplingRow(num_logprobs=5, top_k=4, seed=3, presence_penalty=1.0, output_token_ids=[7]),
        SamplingRow(num_logprobs=None, top_p=0.5, seed=4, banned_token_ids=[0]),
        SamplingRow(num_logprobs=1, min_p=0.3, temperature=2.0, seed=5),
    ]
    out = _sample(logits, rows)
    reference = torch.log_softmax(logits.float(), dim=-1)  # [6, V]
    assert out.logprobs.shape == (6, 6) and out.logprobs.dtype == torch.float32
    assert out.logprob_token_ids.shape == (6, 6) and out.logprob_token_ids.dtype == torch.int64
    assert torch.equal(out.logprob_token_ids[:, 0], out.token_ids)
    torch.testing.assert_close(out.logprobs, reference.gather(1, out.logprob_token_ids))
    top = out.logprobs[:, 1:]
    assert (top[:, :-1] >= top[:, 1:]).all()
    torch.testing.assert_close(top, reference.sort(dim=-1, descending=True).values[:, :5])


def test_logprobs_with_only_sampled_column():
    logits = torch.randn(3, 20)
    out = _sample(logits, [SamplingRow(num_logprobs=0, seed=i) for i in range(3)])
    assert out.logprobs.shape == (3, 1)
    expected = torch.log_softmax(logits, -1).gather(1, out.token_ids[:, None])
    torch.testing.assert_close(out.logprobs, expected)


# --------------------------------------------------------------------------- banned ids


def test_banned_ids_are_never_sampled():
    vocab, num_draws = 20, 3000
    logits = torch.linspace(3.0, -3.0, vocab).expand(num_draws, vocab)  # ids 0 and 1 are the most likely
    rows = [SamplingRow(temperature=1.5, seed=77, position=p, banned_token_ids=[0, 1, 13])
            for p in range(num_draws)]
    counts = torch.bincount(_sample(logits, rows).token_ids, minlength=vocab)
    assert counts[0] == counts[1] == counts[13] == 0
    assert counts[2] > 0
    greedy = [SamplingRow(temperature=0.0, banned_token_ids=[0, 1]), SamplingRow(temperature=0.0)]
    assert _sample(logits[:2], greedy).token_ids.tolist() == [2, 0]


# --------------------------------------------------------------------------- validation and edges


@pytest.mark.parametrize(
    "field,value",
    [("temperature", -0.1), ("top_p", 0.0), ("top_p", 1.5), ("min_p", 1.1), ("seed", -1),
     ("seed", 2**63), ("presence_penalty", 2.5), ("frequency_penalty", -3.0),
     ("repetition_penalty", 0.0), ("top_k", -2), ("num_logprobs", -1)],
)
def test_invalid_values_raise_value_error_naming_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        _build([SamplingRow(**{field: value})], 10)


def test_out_of_vocab_ids_and_bad_shapes_raise():
    with pytest.raises(ValueError, match="banned_token_ids"):
        _build([SamplingRow(banned_token_ids=[10])], 10)
    with pytest.raises(ValueError, match="prompt_token_ids"):
        _build([SamplingRow(repetition_penalty=1.1, prompt_token_ids=[-1])], 10)
    with pytest.raises(ValueError, match="shape"):
        Sampler()(torch.randn(2, 11), _build([SamplingRow(), SamplingRow()], 10))


def test_empty_batch():
    out = Sampler(use_triton=False)(torch.randn(0, 10), _build([], 10))
    assert out.token_ids.shape == (0,)


# --------------------------------------------------------------------------- triton


_INTERPRETER_SCRIPT = textwrap.dedent(
    """
    import importlib.util
    import sys

    import torch

    # load the module file alone: the allmos package __init__ is not needed here
    spec = importlib.util.spec_from_file_location("sampler_under_test", sys.argv[1])
    sampler = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = sampler
    spec.loader.exec_module(sampler)
    Sampler, SamplingRow, SamplingTensors = sampler.Sampler, sampler.SamplingRow, sampler.SamplingTensors
    filter_threshold, gumbel_argmax_torch = sampler.filter_threshold, sampler.gumbel_argmax_torch
    gumbel_argmax_triton = sampler.gumbel_argmax_triton

    def build(rows, vocab):
        return SamplingTensors.build(rows, vocab, torch.device("cpu"))

    def draws(logits, t, **tiling):
        x = Sampler()._processed_logits(logits, t)
        thr = filter_threshold(x.float() * t.inv_temperature[:, None], t) if t.any_filter else None
        return gumbel_argmax_triton(x, t, thr, **tiling), gumbel_argmax_torch(x, t, thr)

    torch.manual_seed(0)
    rows = [
        SamplingRow(temperature=0.0, seed=1, position=9),
        SamplingRow(temperature=1.2, top_k=20, seed=2, position=4, num_logprobs=2),
        SamplingRow(temperature=0.6, top_p=0.5, seed=3, position=100),
        SamplingRow(temperature=1.0, seed=42, position=8),
        SamplingRow(temperature=1.0, min_p=0.2, seed=4, position=1, banned_token_ids=[0, 5]),
        SamplingRow(temperature=0.9, seed=5, position=50, presence_penalty=1.0, repetition_penalty=1.3,
                    prompt_token_ids=[1, 2, 3], output_token_ids=[4, 4, 7]),
    ]
    vocab = 2500  # three chunks of 1024
    logits = torch.randn(len(rows), vocab, dtype=torch.bfloat16)
    logits[3, 2300] = 30.0  # winners in later chunks
    logits[4, 1500] = 4.0
    logits[0, 2300] = logits[0, 100] = 50.0  # a greedy tie across chunks: the first index wins
    t = build(rows, vocab)
    fused, reference = draws(logits, t, chunk_size=1024, block_size=512)
    assert torch.equal(fused, reference), (fused, reference)
    assert fused[3] == 2300 and fused[0] == logits[0].float().argmax() == 100
    out = torch.full((len(rows),), -1, dtype=torch.int64)
    x = Sampler()._processed_logits(logits, t)
    thr = filter_threshold(x.float() * t.inv_temperature[:, None], t)
    into = sampler.triton_gumbel_argmax(x, t.inv_temperature, t.noise_scale, thr, t.noise_key_lo, t.noise_key_hi,
                                        all_random=False, chunk_size=512, block_size=256, out=out)
    assert into is out and torch.equal(out, fused), (out, fused)

    plain = [SamplingRow(temperature=0.8, seed=s, position=3 * s) for s in range(4)]
    plain_logits = torch.randn(4, vocab)
    fused, reference = draws(plain_logits, build(plain, vocab), chunk_size=1024, block_size=512)
    assert torch.equal(fused, reference), (fused, reference)
    alone, _ = draws(plain_logits[2:3], build(plain[2:3], vocab), chunk_size=1024, block_size=512)
    assert alone[0] == fused[2]

    small = torch.randn(6, 700)
    t = build([SamplingRow(temperature=0.0 if i == 0 else 1.0, top_k=5 * i, seed=i) for i in range(6)], 700)
    fused, reference = Sampler(use_triton=True)(small, t), Sampler(use_triton=False)(small, t)
    assert torch.equal(fused.token_ids, reference.token_ids)
    print("ok")
    """
)


def test_triton_kernel_matches_torch_under_interpreter():
    pytest.importorskip("triton")
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    result = subprocess.run([sys.executable, "-c", _INTERPRETER_SCRIPT, sampler_module.__file__], env=env,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and "ok" in result.stdout, result.stderr[-3000:]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_triton_matches_torch_on_gpu():
    torch.manual_seed(0)
    vocab, cuda = 151936, torch.device("cuda")
    rows = [SamplingRow(temperature=0.0 if i % 7 == 0 else 0.5 + (i % 5) * 0.3,
                        top_k=50 if i % 3 == 0 else -1, top_p=0.9 if i % 4 == 0 else 1.0,
                        min_p=0.05 if i % 5 == 0 else 0.0, seed=1000 + i, position=i * 13)
            for i in range(64)]
    logits = torch.randn(64, vocab, device=cuda, dtype=torch.bfloat16) * 3
    t = SamplingTensors.build(rows, vocab, cuda)
    fused = Sampler(use_triton=True)(logits, t).token_ids
    reference = Sampler(use_triton=False)(logits, t).token_ids
    # tl.log and torch.log may differ in the last ulp: allow one near-tie flip
    assert (fused != reference).sum().item() <= 1
    alone = SamplingTensors.build(rows[5:6], vocab, cuda)
    assert Sampler(use_triton=True)(logits[5:6], alone).token_ids[0].item() == fused[5].item()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_forward_does_not_synchronize_on_gpu():
    cuda, vocab = torch.device("cuda"), 151936
    rows = _mixed_rows(SamplingRow(temperature=0.9, top_p=0.9, seed=3, position=4))
    t = SamplingTensors.build(rows, vocab, cuda)
    logits = torch.randn(len(rows), vocab, device=cuda)
    torch.cuda.synchronize()
    previous = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for use_triton in (True, False):
            Sampler(use_triton=use_triton)(logits, t)
    finally:
        torch.cuda.set_sync_debug_mode(previous)


def test_at_positions_equals_a_fresh_build():
    """The runner reuses one step's tensors for the next when the rows repeat: only the positions (and the
    noise keys derived from them) may differ from a fresh build."""
    rng = random.Random(3)
    rows = [SamplingRow(temperature=rng.choice([0.0, 0.7, 1.3]), top_k=rng.choice([-1, 5]),
                        top_p=rng.choice([1.0, 0.9]), seed=rng.randrange(2**63), num_logprobs=rng.choice([None, 2]))
            for _ in range(7)]
    first = SamplingTensors.build(rows, 64, torch.device("cpu"), positions=[rng.randrange(1000) for _ in rows])
    later = [rng.randrange(1000) for _ in rows]
    moved, fresh = first.at_positions(later), SamplingTensors.build(rows, 64, torch.device("cpu"), positions=later)
    for field in dataclasses.fields(SamplingTensors):
        a, b = getattr(moved, field.name), getattr(fresh, field.name)
        if isinstance(a, torch.Tensor):
            assert torch.equal(a, b) and a.dtype == b.dtype, field.name
        elif isinstance(a, np.ndarray):
            assert np.array_equal(a, b), field.name
        else:
            assert a == b, field.name
    assert not torch.equal(moved.noise_key_lo, first.noise_key_lo)


# --------------------------------------------------------------------------- the draw inside the decode graphs


def _graph_draw_tokens(logits: torch.Tensor, rows: list[SamplingRow], positions: list[int]) -> torch.Tensor:
    """``graph_draw`` fed the way the decode graphs feed it: the int32 columns of ``GraphDraw.columns``, with
    ``graph_threshold`` first when a filter is on."""
    draw = GraphDraw.of(rows, logits.shape[1])
    lo, hi, inv_t, noise, top_k, top_p, min_p = (torch.from_numpy(c).to(logits.device)
                                                 for c in draw.columns(positions))
    inv_t, noise = inv_t.view(torch.float32), noise.view(torch.float32)
    threshold = None
    if draw.filtered:
        threshold = graph_threshold(logits, inv_t, top_k, top_p.view(torch.float32), min_p.view(torch.float32))
    out = torch.full((len(rows),), -1, dtype=torch.int64, device=logits.device)
    assert graph_draw(logits, inv_t, noise, lo, hi, out, threshold) is out
    return out


def _plain_rows(rng: random.Random, n: int, vocab: int) -> list[SamplingRow]:
    """Greedy and temperature-only rows; filters that are off by value (top_k >= vocab, top_k 0, top_p 1)."""
    return [SamplingRow(temperature=rng.choice([0.0, 0.6, 1.0, 1.7]), top_k=rng.choice([-1, 0, vocab, vocab + 7]),
                        top_p=1.0, seed=rng.randrange(2**63)) for _ in range(n)]


def _filtered_rows(rng: random.Random, n: int, vocab: int) -> list[SamplingRow]:
    """Rows the graphs' filtered draw takes: top-k up to GRAPH_TOP_K, top-p beside a top-k, min-p, and
    greedy and plain rows among them."""
    rows = []
    for _ in range(n):
        top_k = rng.choice([-1, 1, 2, 20, 50, sampler_module.GRAPH_TOP_K])
        top_k = top_k if top_k < vocab else -1  # a top-k at or past the vocabulary is off
        rows.append(SamplingRow(temperature=rng.choice([0.0, 0.6, 1.0, 1.7]), top_k=top_k,
                                top_p=1.0 if top_k == -1 else rng.choice([1.0, 0.95, 0.6]),
                                min_p=rng.choice([0.0, 0.0, 0.1]), seed=rng.randrange(2**63)))
    return rows


@pytest.mark.parametrize("all_random", [False, True])
def test_plain_draw_picks_the_samplers_tokens(all_random):
    rng = random.Random(11)
    rows = _plain_rows(rng, 9, 300)
    if all_random:
        rows = [dataclasses.replace(r, temperature=0.9) for r in rows]
    positions = [rng.randrange(5000) for _ in rows]
    logits = torch.randn(len(rows), 300, dtype=torch.bfloat16) * 4
    expected = Sampler(use_triton=False)(logits, SamplingTensors.build(rows, 300, CPU, positions=positions))
    assert not GraphDraw.of(rows, 300).filtered
    assert torch.equal(_graph_draw_tokens(logits, rows, positions), expected.token_ids)
    greedy = [dataclasses.replace(r, temperature=0.0) for r in rows]  # an all-greedy batch: plain argmax
    assert torch.equal(_graph_draw_tokens(logits, greedy, positions), logits.argmax(dim=-1))


@pytest.mark.parametrize("vocab", [40, 300])
def test_filtered_graph_draw_picks_the_samplers_tokens(vocab):
    """60 random batches of filtered rows (ties in every fourth): the tokens of the sampler, which ranks the
    same fixed width for such batches (``SamplingTensors.top_p_width``); a vocabulary below that width
    ranks the whole sorted row in both."""
    rng = random.Random(vocab)
    for trial in range(60):
        rows = _filtered_rows(rng, rng.randint(1, 9), vocab)
        positions = [rng.randrange(5000) for _ in rows]
        logits = torch.randn(len(rows), vocab, generator=torch.Generator().manual_seed(trial)) * 3
        if trial % 4 == 0:
            logits = logits.round()
        expected = Sampler(use_triton=False)(logits, SamplingTensors.build(rows, vocab, CPU, positions=positions))
        assert torch.equal(_graph_draw_tokens(logits, rows, positions), expected.token_ids), (trial, rows)


@pytest.mark.parametrize("change,taken", [
    (dict(top_k=5), True), (dict(top_k=5, top_p=0.9), True), (dict(min_p=0.1), True),
    (dict(top_k=sampler_module.GRAPH_TOP_K + 1), False), (dict(top_p=0.9), False), (dict(num_logprobs=0), False),
    (dict(presence_penalty=0.5), False), (dict(frequency_penalty=-0.5), False),
    (dict(repetition_penalty=1.2), False), (dict(banned_token_ids=(3,)), False),
])
def test_graph_draw_takes_filters_a_fixed_ranking_covers(change, taken):
    rows = [SamplingRow(temperature=0.7, seed=1), dataclasses.replace(SamplingRow(temperature=0.7, seed=2), **change)]
    assert not GraphDraw.of(rows[:1], 100).filtered
    draw = GraphDraw.of(rows, 100)
    assert (draw is not None) == taken and (draw is None or draw.filtered)
    greedy = dataclasses.replace(rows[1], temperature=0.0)
    filters_only = {"top_k", "top_p", "min_p"}
    # a greedy row ignores filters (the sampler does too), not penalties, banned ids or logprobs
    greedy_draw = GraphDraw.of([greedy], 100)
    assert (greedy_draw is not None) == (set(change) <= filters_only)
    assert greedy_draw is None or not greedy_draw.filtered


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("filtered", [False, True])
def test_graph_draw_matches_the_sampler_on_gpu(filtered):
    rng, cuda, vocab = random.Random(5), torch.device("cuda"), 151936
    rows = (_filtered_rows if filtered else _plain_rows)(rng, 48, vocab)
    positions = [rng.randrange(4000) for _ in rows]
    logits = torch.randn(len(rows), vocab, device=cuda, dtype=torch.bfloat16) * 3
    expected = Sampler()(logits, SamplingTensors.build(rows, vocab, cuda, positions=positions)).token_ids
    assert torch.equal(_graph_draw_tokens(logits, rows, positions), expected)
    for n in (1, 3, 16):  # small batches: other chunk sizes in the draw, other shapes in the ranking
        expected = Sampler()(logits[:n], SamplingTensors.build(rows[:n], vocab, cuda, positions=positions[:n]))
        assert torch.equal(_graph_draw_tokens(logits[:n], rows[:n], positions[:n]), expected.token_ids)


def test_sorted_descending_equals_torch_sort():
    """The CPU sort behind top-p (numpy's) gives torch's sorted values: ties, signed zeros, infinities."""
    gen = torch.Generator().manual_seed(4)
    z = torch.randn(5, 3000, generator=gen).round(decimals=1)  # many ties
    z[0, :10] = 0.0
    z[0, 10:20] = -0.0
    z[1, 5] = math.inf
    z[2, :100] = -math.inf
    ranked = sampler_module.sorted_descending(z)
    assert ranked.is_contiguous() and ranked.dtype == z.dtype
    assert torch.equal(ranked, z.sort(dim=-1, descending=True).values)


# --------------------------------------------------------------------------- top-p over a top-k selection


def test_top_p_ranks_a_top_k_selection_only_when_every_top_p_row_has_one():
    vocab = 500
    with_k = [SamplingRow(temperature=0.8, top_k=20, top_p=0.9), SamplingRow(temperature=0.8, top_k=7),
              SamplingRow(temperature=0.0, top_p=0.5), SamplingRow(temperature=1.0)]
    assert _build(with_k, vocab).top_p_width == sampler_module.GRAPH_TOP_K  # the greedy row's top-p is off
    assert _build([SamplingRow(temperature=1.0, top_k=100, top_p=0.5)], vocab).top_p_width == 128  # a power of 2
    assert _build(with_k, 40).top_p_width == 40  # no narrower than the vocabulary: the sorted row
    assert _build(with_k + [SamplingRow(temperature=1.0, top_p=0.9)], vocab).top_p_width == vocab
    big_k = [SamplingRow(temperature=1.0, top_k=sampler_module.TOP_P_TOPK_WIDTH + 1, top_p=0.9)]
    assert _build(big_k, 5000).top_p_width == 5000


def test_top_p_threshold_over_a_top_k_selection_equals_the_sorted_vocabulary():
    """The same kept tokens as ranking the whole sorted row, for mixes of top-k / top-p / min-p rows, rows with
    no filter and greedy rows (200 random batches, ties included)."""
    rng = random.Random(7)
    vocab = 300
    for trial in range(200):
        rows = []
        for _ in range(rng.randint(1, 6)):
            top_k = rng.choice([-1, 1, 5, 20, 64])
            top_p = 1.0 if top_k == -1 else rng.choice([1.0, 0.95, 0.5])  # top-p only beside a top-k
            rows.append(SamplingRow(temperature=rng.choice([0.0, 0.5, 1.0, 1.7]), top_k=top_k, top_p=top_p,
                                    min_p=rng.choice([0.0, 0.05]), seed=trial))
        t = _build(rows, vocab)
        assert t.top_p_width < vocab or not t.any_top_k
        gen = torch.Generator().manual_seed(trial)
        logits = torch.randn(len(rows), vocab, generator=gen)
        if trial % 4 == 0:
            logits = logits.round()  # many ties
        z = logits * t.inv_temperature[:, None]
        fast = sampler_module.filter_threshold(z, t)
        full = sampler_module.filter_threshold(z, dataclasses.replace(t, top_p_width=vocab))
        # a row that keeps everything may read -inf or its smallest value; the kept tokens are what counts
        assert torch.equal(z >= fast[:, None], z >= full[:, None]), (trial, rows)
