"""``SamplingRow``: one sequence's sampling settings as the scheduler hands them to the runner.

Torch-free on purpose: the scheduler and ``batch.py`` import it, and neither may import torch or Triton.
The row is derived from an already validated ``SamplingParams`` (``allmos.sampling_params``, the one place
the engine validates sampling settings) plus the sequence's seed and per-step token lists; the runner turns
a batch of rows into tensors with ``SamplingTensors.build(validate=False)``. ``validate`` is for rows built
by hand (direct use of the sampler), which no ``SamplingParams`` has checked.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

# Temperatures below this are greedy (vLLM's _SAMPLING_EPS).
GREEDY_TEMPERATURE_EPS = 1e-5


@dataclass(frozen=True)
class SamplingRow:
    """One request's sampling state at this step (plain Python, built by the engine). Immutable: the
    engine reuses one row per request across steps, and the tensor-parallel channel sends a row again only
    when it is a different object.

    Penalties follow vLLM: presence/frequency count OUTPUT tokens only; repetition
    covers prompt + output tokens (logit > 0 -> logit / r, else logit * r).
    `banned_token_ids` get -inf (the engine bans EOS/stop ids until min_tokens).
    """

    temperature: float = 1.0  # < 1e-5 = greedy
    top_k: int = -1  # -1 or 0 = off
    top_p: float = 1.0  # (0, 1]; 1 = off
    min_p: float = 0.0  # [0, 1]; 0 = off
    seed: int = 0  # 0 <= seed < 2**63
    # index of the token being sampled in prompt + output; read only when SamplingTensors.build gets no
    # ``positions`` (direct use of the sampler). The engine's rows leave it 0: the runner passes each step's
    # positions (the sequences' lengths), so one row per request serves every step.
    position: int = 0
    presence_penalty: float = 0.0  # [-2, 2]
    frequency_penalty: float = 0.0  # [-2, 2]
    repetition_penalty: float = 1.0  # > 0
    num_logprobs: int | None = None  # None = none; k >= 0 -> sampled + top-k logprobs
    prompt_token_ids: Sequence[int] = ()  # read only when repetition_penalty != 1
    output_token_ids: Sequence[int] = ()  # read only when a penalty is active
    banned_token_ids: Sequence[int] = ()

    @property
    def is_greedy(self) -> bool:
        return self.temperature < GREEDY_TEMPERATURE_EPS

    @property
    def has_output_penalty(self) -> bool:
        return self.presence_penalty != 0.0 or self.frequency_penalty != 0.0

    @property
    def has_repetition_penalty(self) -> bool:
        return self.repetition_penalty != 1.0

    def validate(self, vocab_size: int) -> None:
        """Raise ValueError naming the first field that is out of range."""
        checks = (
            ("temperature", math.isfinite(self.temperature) and self.temperature >= 0.0),
            ("top_p", 0.0 < self.top_p <= 1.0),
            ("min_p", 0.0 <= self.min_p <= 1.0),
            ("seed", 0 <= self.seed < 2**63),
            ("position", 0 <= self.position < 2**63),
            ("presence_penalty", -2.0 <= self.presence_penalty <= 2.0),
            ("frequency_penalty", -2.0 <= self.frequency_penalty <= 2.0),
            ("repetition_penalty", 0.0 < self.repetition_penalty < math.inf),
            ("top_k", self.top_k >= -1),
            ("num_logprobs", self.num_logprobs is None or 0 <= self.num_logprobs <= vocab_size),
        )
        for field, ok in checks:
            if not ok:
                raise ValueError(f"SamplingRow.{field} is out of range: {getattr(self, field)!r}")
