"""Start-up warm-up: a few tiny requests through the whole engine, so that the Triton kernel variants
ordinary traffic meets are compiled inside ``LLM(...)`` instead of inside the first user requests (on a
fresh machine that compilation took about 3 s of the standard benchmark's timed run on an H100).

What the requests cover: a prefill batch of several prompt lengths (1, odd, multiples of 16, longer than
a KV block), greedy and random rows in one batch and an all-random batch, decode steps, a prefix-cache
hit (a prefill that starts after cached context), and a batch of one. Every request carries its own
seed, so the engine's RNG (which seeds unseeded user requests) is not advanced; nothing of the warm-up
stays behind except KV blocks in the prefix cache, which hold correct values for their tokens.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING

from allmos.sampling_params import SamplingParams

if TYPE_CHECKING:
    from allmos.engine.batch import ScheduledBatch
    from allmos.engine.llm_engine import LLMEngine

logger = logging.getLogger("allmos")

# (prompt length, temperature) per request; the second wave repeats the first wave's long prompt; the
# third is one request alone (a batch of one, as in an interactive first call)
FIRST_WAVE = ((1, 0.0), (16, 0.6), (37, 1.0), (64, 0.6), (300, 0.0))
SECOND_WAVE = ((300, 0.6), (33, 0.6), (48, 0.6))
THIRD_WAVE = ((4, 1.0),)
MAX_TOKENS = 4
REQUEST_PREFIX = "allmos-warmup-"


def warm_up(engine: LLMEngine) -> None:
    """Run the warm-up requests to completion; requests that do not fit this engine are skipped."""
    start = time.perf_counter()
    for wave, plan in enumerate((FIRST_WAVE, SECOND_WAVE, THIRD_WAVE)):
        for index, (length, temperature) in enumerate(plan):
            _add(engine, f"{REQUEST_PREFIX}{wave}-{index}", length, temperature)
        while engine.has_unfinished():
            engine.step()
    engine.num_generated_tokens = 0
    logger.info("warm-up (kernel compilation) took %.1f s", time.perf_counter() - start)


def is_warmup_batch(batch: ScheduledBatch | None) -> bool:
    """Whether every sequence of ``batch`` belongs to the warm-up (such steps are not user steps)."""
    return batch is not None and all(seq.request_id.startswith(REQUEST_PREFIX) for seq in batch.seqs)


def _add(engine: LLMEngine, request_id: str, length: int, temperature: float) -> None:
    length = min(length, engine.info.max_model_len - MAX_TOKENS - 1)
    if length < 1:
        return
    prompt = [(7919 * i + 13) % engine.info.vocab_size for i in range(length)]  # same prefix in every wave
    params = SamplingParams(temperature=temperature, max_tokens=MAX_TOKENS, ignore_eos=True, seed=length)
    try:
        engine.add_request(request_id, prompt, params)
    except ValueError:  # e.g. a KV cache too small for this prompt: warm up with the others
        pass
