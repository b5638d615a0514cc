"""A request as the scheduler sees it: token ids plus one token-accounting model.

Invariant: ``num_computed_tokens <= num_tokens``. ``num_tokens = len(token_ids) + num_pending_tokens``:
``token_ids`` holds only known tokens (prompt, then outputs read back); ``num_pending_tokens`` counts the
tokens sampled on the device and not yet read back, which follow them (the engine core owns that count).
Tokens ``[0, num_computed_tokens)`` have KV in the
cache (through ``block_table``); the scheduler computes the rest. Prefill, chunked prefill, prefix hits,
decode and recompute after preemption all follow from that difference.
"""

from __future__ import annotations

import enum
import time

from allmos.sampling_params import SamplingParams


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


class Request:
    """One sequence being generated (a request with ``n > 1`` becomes ``n`` of these)."""

    def __init__(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams,
                 seed: int, arrival_time: float | None = None, group_id: str | None = None, index: int = 0) -> None:
        self.request_id = request_id
        self.group_id = request_id if group_id is None else group_id  # the user request it belongs to
        self.index = index  # completion index within that request
        self.prompt_token_ids = list(prompt_token_ids)
        self.token_ids: list[int] = list(prompt_token_ids)  # known tokens only
        self.num_pending_tokens = 0  # sampled on the device, not read back yet (they follow token_ids)
        self.num_prompt_tokens = len(prompt_token_ids)
        self.params = params
        self.seed = seed  # the request's seed, or one drawn from the engine's RNG
        self.banned_token_ids: tuple[int, ...] = ()  # EOS / stop ids, banned until min_tokens is reached
        self.num_prompt_logprobs: int | None = None  # top-k of prompt logprobs still to compute (None: none)
        self.status = RequestStatus.WAITING
        self.num_computed_tokens = 0
        self.num_cached_tokens = -1  # prefix-cache hits at first admission; -1 until admitted
        self.block_table: list[int] = []
        self.block_hashes: list[int] = []  # chained hashes of the full blocks of token_ids
        self.num_published_blocks = 0  # leading blocks of block_table already offered to the prefix cache
        self.sampling_row = None  # cached SamplingRow, reused while it does not change between steps
        self.arrival_time = arrival_time if arrival_time is not None else time.time()
        self.first_token_time: float | None = None
        self.finish_reason: str | None = None
        self.stop_reason: int | str | None = None

    @property
    def num_tokens(self) -> int:
        """Known plus pending tokens: the length the scheduler computes KV for."""
        return len(self.token_ids) + self.num_pending_tokens

    @property
    def num_output_tokens(self) -> int:
        """Output tokens, pending ones included."""
        return self.num_tokens - self.num_prompt_tokens

    @property
    def num_known_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def output_token_ids(self) -> list[int]:
        """The output tokens read back so far."""
        return self.token_ids[self.num_prompt_tokens:]

    def append_token(self, token_id: int) -> None:
        """Append a known token (nothing may be pending)."""
        if self.num_pending_tokens:
            raise RuntimeError(f"{self.request_id}: append_token while tokens are pending")
        self.token_ids.append(token_id)

    def reserve_pending_token(self) -> None:
        """Count one token sampled on the device whose value is not known yet."""
        self.num_pending_tokens += 1

    def resolve_pending_token(self, token_id: int) -> None:
        """The oldest pending token was read back: it becomes a known token."""
        if self.num_pending_tokens <= 0:
            raise RuntimeError(f"{self.request_id}: a token was read back but none is pending")
        self.num_pending_tokens -= 1
        self.token_ids.append(token_id)

    def drop_pending_tokens(self) -> None:
        """Forget the pending tokens (the request finished before they were read back)."""
        self.num_pending_tokens = 0

    def __repr__(self) -> str:
        return (f"Request({self.request_id!r}, tokens={self.num_tokens}, computed={self.num_computed_tokens}, "
                f"blocks={len(self.block_table)}, {self.status.value})")
