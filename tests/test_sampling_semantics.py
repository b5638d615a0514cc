"""Per-request seeds with n > 1, and which tokens each penalty counts, through the whole engine.

Penalties follow vLLM: ``repetition_penalty`` applies to every token of the prompt and of the output so far
(logit > 0 -> logit / r, else logit * r); ``presence_penalty`` and ``frequency_penalty`` apply to output
tokens only (logit -= presence * [count > 0] + frequency * count). The reference recomputes each greedy
step from transformers' logits with those formulas on the right token sets, and the cases are chosen so that
the wrong token sets would pick another token at some step.
"""

from __future__ import annotations

import random
from collections import Counter

import pytest
import torch
from hf_reference import hf_greedy, hf_logits

from allmos import LLM, SamplingParams

VOCAB = 512


@pytest.fixture(scope="module")
def llm(qwen3_dir):
    return LLM(str(qwen3_dir), kvcache_block_size=16, num_kvcache_blocks=128)


def random_prompt(seed: int, length: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(3, VOCAB) for _ in range(length)]


# ---------------------------------------------------------------- seeds of n > 1 completions


def test_seeded_n_completions_ignore_engine_seed_and_batch(qwen3_dir):
    """Every one of the n completions of a seeded request is a function of that request alone: another engine
    seed, other requests in the batch (seeded or not) and earlier requests change none of them."""
    prompt = random_prompt(1, 20)
    target = SamplingParams(n=3, temperature=1.0, seed=1234, max_tokens=12, ignore_eos=True)
    alone = LLM(str(qwen3_dir), seed=0, kvcache_block_size=16, num_kvcache_blocks=64).generate(
        [prompt], target, use_tqdm=False)[0]
    want = [c.token_ids for c in alone.outputs]
    assert len({tuple(t) for t in want}) == 3, "the n completions must differ from each other"

    other = LLM(str(qwen3_dir), seed=99, kvcache_block_size=16, num_kvcache_blocks=64)
    companions = [SamplingParams(n=2, temperature=1.0, max_tokens=7, ignore_eos=True),
                  SamplingParams(temperature=0.8, max_tokens=15, ignore_eos=True),
                  SamplingParams(n=2, temperature=1.0, seed=5, max_tokens=9, ignore_eos=True)]
    mixed = other.generate([random_prompt(2, 9), random_prompt(3, 33), prompt, random_prompt(4, 3)],
                           [companions[0], companions[1], target, companions[2]], use_tqdm=False)
    assert [c.token_ids for c in mixed[2].outputs] == want
    again = other.generate([prompt], target, use_tqdm=False)[0]  # the engine's RNG has moved on
    assert [c.token_ids for c in again.outputs] == want


# ---------------------------------------------------------------- penalties: which tokens count


def penalize(logits: torch.Tensor, repetition_tokens: set[int], counts: Counter, *, repetition: float = 1.0,
             presence: float = 0.0, frequency: float = 0.0) -> torch.Tensor:
    """vLLM's penalties on one row of float32 logits [vocab]: repetition over ``repetition_tokens``, then
    frequency and presence from ``counts``."""
    x = logits.clone()
    for token in repetition_tokens:
        x[token] = x[token] / repetition if x[token] > 0 else x[token] * repetition
    for token, count in counts.items():
        x[token] -= frequency * count + presence
    return x


def correct_sets(prompt, output):
    return set(prompt) | set(output), Counter(output)


WRONG_SETS = {
    "output penalties counting the prompt": lambda prompt, output: (set(prompt) | set(output),
                                                                    Counter(prompt + output)),
    "repetition over the output only": lambda prompt, output: (set(output), Counter(output)),
    "repetition over the prompt only": lambda prompt, output: (set(prompt), Counter(output)),
}

MAX_NEW = 16
CASES = [
    # (penalties, wrong token sets that must pick another token at some step)
    (dict(presence=1.5, frequency=1.0), ["output penalties counting the prompt"]),
    (dict(repetition=3.0), ["repetition over the output only", "repetition over the prompt only"]),
    (dict(repetition=1.5, presence=0.5, frequency=0.7), []),
]


def params_of(penalties: dict) -> SamplingParams:
    return SamplingParams(temperature=0, max_tokens=MAX_NEW, ignore_eos=True, logprobs=0,
                          repetition_penalty=penalties.get("repetition", 1.0),
                          presence_penalty=penalties.get("presence", 0.0),
                          frequency_penalty=penalties.get("frequency", 0.0))


def penalty_prompt(qwen3_dir, seed: int) -> list[int]:
    """Random tokens followed by their own unpenalized greedy continuation: the model keeps wanting tokens
    that are already in the prompt, so counting (or not counting) the prompt changes its choices."""
    start = random_prompt(seed, 12)
    return start + hf_greedy(qwen3_dir, [start], 12)[0]


def test_penalties_count_the_right_tokens(llm, qwen3_dir):
    prompts = [penalty_prompt(qwen3_dir, 20 + i) for i in range(len(CASES))]
    plain = random_prompt(30, 25)  # an unpenalized row in the same batch
    outs = llm.generate(prompts + [plain], [params_of(p) for p, _ in CASES] + [params_of({})], use_tqdm=False)
    for (penalties, must_differ), prompt, out in zip(CASES, prompts, outs):
        completion = out.outputs[0]
        output = completion.token_ids
        logits = hf_logits(qwen3_dir, prompt + output[:-1])[len(prompt) - 1:]  # [MAX_NEW, vocab], raw
        raw_logprobs = torch.log_softmax(logits, dim=-1)
        differed = set()
        for step, token in enumerate(output):
            expected = penalize(logits[step], *correct_sets(prompt, output[:step]), **penalties)
            top2 = expected.topk(2).values
            assert top2[0] - top2[1] > 2e-4, f"near tie at step {step} of {penalties}: the reference is ambiguous"
            assert token == int(expected.argmax()), (penalties, step)
            # logprobs are the raw model's (before penalties), as vLLM returns them by default
            assert abs(completion.logprobs[step][token].logprob - raw_logprobs[step, token].item()) < 1e-4
            for name in must_differ:
                wrong = penalize(logits[step], *WRONG_SETS[name](prompt, output[:step]), **penalties)
                if int(wrong.argmax()) != token:
                    differed.add(name)
        assert differed == set(must_differ), f"case {penalties} does not tell {set(must_differ) - differed} apart"
    assert outs[-1].token_ids == hf_greedy(qwen3_dir, [plain], MAX_NEW)[0]
