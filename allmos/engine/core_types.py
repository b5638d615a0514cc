"""The typed messages between the engine core and its driver: requests in, outputs and stats out.

Plain dataclasses of plain values (strings, ints, floats, lists, ``SamplingParams``), free of torch and of
text, so the core can run in its own process behind a message channel. ``EngineCoreRequest`` is made by
``allmos.engine.input_processor``; ``CoreOutput`` is read by ``allmos.engine.output_processor``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from allmos.sampling_params import SamplingParams

# (token id, logprob, rank): the sampled / prompt token first (its rank in the vocabulary), then the top-k
LogprobEntries = list[tuple[int, float, int]]


@dataclass
class EngineCoreRequest:
    """One validated request: a prompt as token ids, its sampling settings and one seed per sequence.

    ``seeds[i]`` is the seed of completion ``i`` (``len(seeds) == sampling_params.n``)."""

    request_id: str
    prompt_token_ids: list[int]
    sampling_params: SamplingParams
    seeds: list[int]
    arrival_time: float

    @property
    def n(self) -> int:
        return self.sampling_params.n

    @property
    def prompt_logprobs(self) -> int | None:
        return self.sampling_params.prompt_logprobs


@dataclass
class PromptLogprobsResult:
    """One chunk's prompt logprobs: ``entries[i]`` belongs to the prompt token at ``start_pos + i + 1``.
    ``request_id`` names the sequence that computed it (from the runner) or the request (in a
    ``CoreOutput``)."""

    request_id: str
    start_pos: int
    entries: list[LogprobEntries]


@dataclass(slots=True)
class CoreOutput:
    """What one step read back for one sequence (completion ``index`` of request ``request_id``).

    ``new_token_ids``: the tokens read back since this sequence's last output (at most one per step);
    ``new_logprobs``: one ``LogprobEntries`` per new token, when the request asked for logprobs;
    ``prompt_logprobs``: a chunk of prompt logprobs (completion 0 only; a chunk recomputed after a
    preemption comes again and replaces what it covers). A step reports a sequence's prompt-logprob chunk
    in an output of its own, before its token outputs.
    ``finish_reason``: "stop" (EOS or a stop token id, then ``stop_reason`` is that id or None for EOS),
    "length", or "abort"; None while the sequence runs. Stop strings are not the core's business: the
    output processor finds them and has the core abort the sequence.
    ``num_cached_tokens``: prompt tokens found in the prefix cache when the sequence was first admitted."""

    request_id: str
    index: int
    new_token_ids: list[int] = field(default_factory=list)
    new_logprobs: list[LogprobEntries] | None = None
    prompt_logprobs: PromptLogprobsResult | None = None
    finish_reason: str | None = None
    stop_reason: int | None = None
    num_cached_tokens: int = 0


@dataclass(frozen=True)
class EngineCoreStats:
    """A snapshot for monitoring (counters are totals since start)."""

    num_running: int
    num_waiting: int
    num_prefilling: int  # requests whose prompt is not fully computed yet
    num_free_blocks: int
    num_blocks: int
    prefix_cache_queries: int  # prompt tokens looked up in the prefix cache at admission
    prefix_cache_hits: int  # of those, tokens found cached
    num_preemptions: int
    num_generated_tokens: int

    @property
    def kv_cache_usage(self) -> float:
        """Fraction of KV blocks in use."""
        return 1.0 - self.num_free_blocks / self.num_blocks if self.num_blocks else 0.0
