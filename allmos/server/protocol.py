"""Messages between the HTTP front end and the engine-core process, and how they travel.

Transport: the core process's stdin (front end -> core) and stdout (core -> front end) pipes. Each message
is one frame: a 4-byte big-endian length, then that many bytes of msgpack (msgspec ``Struct`` values,
tagged unions; never pickle). The core redirects its own ``sys.stdout`` to stderr at start-up so that a
stray ``print`` cannot corrupt the stream.

Conversation:

- core -> front end, once: ``CoreReady`` (what the front end needs to tokenize and validate) or
  ``CoreFailed`` (the engine could not be built; the core then exits).
- front end -> core: ``AddRequest`` (token ids and sampling settings; stop *strings* are not sent: the
  front end detokenizes and matches them, then aborts the request), ``AbortRequests``, ``Shutdown``.
- core -> front end, once per engine step that produced anything (and after commands while idle):
  ``StepOutputs`` with every sequence's new token of that step (``NewTokens``: column by column, the
  engine core's ``CoreStepOutput`` as it is, so a step costs no message object per sequence), the
  requests rejected at admission, the requests scheduled for the first time, and a ``CoreStats`` snapshot
  for the metrics.

End of file on either pipe means the other side is gone: the core exits, the front end fails every
open request and reports itself unhealthy.
"""

from __future__ import annotations

import struct

import msgspec

FRAME_HEADER = struct.Struct(">I")
MAX_FRAME_BYTES = 1 << 30


class SamplingSettings(msgspec.Struct, frozen=True, omit_defaults=True):
    """``SamplingParams`` minus what the front end handles (stop strings, detokenization)."""

    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    min_p: float = 0.0
    seed: int | None = None
    max_tokens: int | None = None
    min_tokens: int = 0
    ignore_eos: bool = False
    stop_token_ids: list[int] = []
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logprobs: int | None = None


# ---------------------------------------------------------------------- front end -> core
class AddRequest(msgspec.Struct, tag="add", frozen=True):
    request_id: str
    prompt_token_ids: list[int]
    sampling: SamplingSettings
    arrival_time: float


class AbortRequests(msgspec.Struct, tag="abort", frozen=True):
    request_ids: list[str]


class Shutdown(msgspec.Struct, tag="shutdown", frozen=True):
    pass


FrontendMessage = AddRequest | AbortRequests | Shutdown


# ---------------------------------------------------------------------- core -> front end
class CoreReady(msgspec.Struct, tag="ready", frozen=True):
    model_folder: str
    has_tokenizer: bool
    max_model_len: int
    vocab_size: int
    eos_token_ids: list[int]
    num_kv_blocks: int
    block_size: int
    default_sampling: dict  # the model's generation_config defaults (SamplingParams field names)


class CoreFailed(msgspec.Struct, tag="failed", frozen=True):
    message: str


class NewTokens(msgspec.Struct, array_like=True, frozen=True):
    """New tokens, column by column: row ``i`` is token ``token_ids[i]`` of completion ``indices[i]`` of
    request ``request_ids[i]``. The core sends at most one row per sequence per step; a receiver takes
    several rows of one sequence in row order.

    Sparse, keyed by row, only for the rows that have them: ``finished``: row -> (finish_reason,
    stop_reason) when that row's token ended its sequence ("stop" with the stop token id, or None for EOS;
    "length"); ``logprobs``: row -> (token id, logprob) pairs, the sampled token first, then the top-k
    not already listed (only for requests that asked for logprobs)."""

    request_ids: list[str] = []
    indices: list[int] = []
    token_ids: list[int] = []
    finished: dict[int, tuple[str, int | None]] = {}
    logprobs: dict[int, list[tuple[int, float]]] = {}


class Rejected(msgspec.Struct, array_like=True, frozen=True):
    request_id: str
    message: str


class Scheduled(msgspec.Struct, array_like=True, frozen=True):
    """A request's first scheduling: when, and how many prompt tokens the prefix cache supplied."""

    request_id: str
    time: float
    num_cached_tokens: int


class CoreStats(msgspec.Struct, frozen=True):
    num_running_reqs: int = 0
    num_waiting_reqs: int = 0
    kv_cache_usage: float = 0.0
    num_free_blocks: int = 0
    num_kv_blocks: int = 0
    num_preemptions: int = 0  # cumulative
    prefix_cache_queries: int = 0  # cumulative prompt tokens looked up
    prefix_cache_hits: int = 0  # cumulative prompt tokens found


class StepOutputs(msgspec.Struct, tag="step", frozen=True):
    outputs: NewTokens
    rejected: list[Rejected]
    scheduled: list[Scheduled]
    stats: CoreStats
    time: float


CoreMessage = CoreReady | CoreFailed | StepOutputs


# ---------------------------------------------------------------------- framing
class Codec:
    """Encodes one side's outgoing messages and decodes the other side's."""

    def __init__(self, incoming_type) -> None:
        self._encoder = msgspec.msgpack.Encoder()
        self._decoder = msgspec.msgpack.Decoder(incoming_type)

    def frame(self, message) -> bytes:
        payload = self._encoder.encode(message)
        return FRAME_HEADER.pack(len(payload)) + payload

    def decode(self, payload: bytes):
        return self._decoder.decode(payload)


def frame_length(header: bytes) -> int:
    (length,) = FRAME_HEADER.unpack(header)
    if length > MAX_FRAME_BYTES:
        raise ValueError(f"frame of {length} bytes exceeds the limit of {MAX_FRAME_BYTES}")
    return length
