"""The typed messages between the engine core and its driver: requests in, outputs and stats out.

Plain dataclasses of plain values (strings, ints, floats, lists, ``SamplingParams``), free of torch and of
text, so the core can run in its own process behind a message channel. ``EngineCoreRequest`` is made by
``allmos.engine.input_processor``; ``CoreStepOutput`` (one per step, columnar) and ``AbortedSequence`` are
read by ``allmos.engine.output_processor`` and by the server's engine-core process.
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
    ``CoreStepOutput``, which also sets ``num_cached_tokens``: the request's prompt tokens found in the
    prefix cache; the runner leaves it 0)."""

    request_id: str
    start_pos: int
    entries: list[LogprobEntries]
    num_cached_tokens: int = 0


@dataclass(slots=True)
class CoreStepOutput:
    """What one ``EngineCore.step`` read back, column by column (one object per step, not per sequence).

    Row ``i`` is one new token: ``token_ids[i]`` of completion ``indices[i]`` of request ``request_ids[i]``.
    Rows are in sampling order; a sequence has at most one row per step. Per row, always:
    ``num_cached_tokens[i]``: prompt tokens of that sequence found in the prefix cache when it was first
    admitted (constant from then on).
    Sparse, keyed by row, only for the rows that have them:
    ``finished``: row -> (finish_reason, stop_reason) for a sequence that this row's token ended: "stop"
    (EOS or a stop token id; ``stop_reason`` is that id, or None for EOS) or "length". Stop strings are not
    the core's business: the output processor finds them and has the core abort the sequence.
    ``logprobs``: row -> ``LogprobEntries`` of the row's token, for requests that asked for logprobs.
    ``prompt_logprobs``: chunks of prompt logprobs by request (completion 0 computes them); a consumer files
    them before the rows. A chunk recomputed after a preemption comes again and replaces what it covers.

    The columns are plain lists, so the message crosses a process boundary as it is (see
    ``allmos.server.protocol``). A consumer may keep the lists: the core never touches them again.
    """

    request_ids: list[str] = field(default_factory=list)
    indices: list[int] = field(default_factory=list)
    token_ids: list[int] = field(default_factory=list)
    num_cached_tokens: list[int] = field(default_factory=list)
    finished: dict[int, tuple[str, int | None]] = field(default_factory=dict)
    logprobs: dict[int, LogprobEntries] = field(default_factory=dict)
    prompt_logprobs: list[PromptLogprobsResult] = field(default_factory=list)

    @property
    def is_empty(self) -> bool:
        """No new token and no prompt logprobs."""
        return not self.token_ids and not self.prompt_logprobs


@dataclass(frozen=True, slots=True)
class AbortedSequence:
    """A sequence that ``EngineCore.abort_requests`` ended (finish reason "abort", no new token)."""

    request_id: str
    index: int
    num_cached_tokens: int  # as in ``CoreStepOutput``; 0 if it was never admitted


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
