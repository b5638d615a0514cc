"""Objects returned to users (the vLLM shapes, described in docs/api.md)."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class Logprob:
    """One token's log probability at one position (vLLM's ``Logprob``).

    ``logprob`` is log_softmax of the model's raw logits (float32; before penalties, temperature and
    filtering). ``rank`` is the token's 1-based rank in the whole vocabulary by that logprob: for the
    sampled (or prompt) token the count of tokens with a strictly greater logprob plus one, for the top-k
    entries 1..k. ``decoded_token`` is the token's text (None when the model has no tokenizer).
    """

    logprob: float
    rank: int | None = None
    decoded_token: str | None = None


# Per generated position: token id -> Logprob (the sampled token and the top-k).
SampleLogprobs = list[dict[int, Logprob]]
# Per prompt position: the same, None for the first position (nothing predicts it).
PromptLogprobs = list[dict[int, Logprob] | None]


def logprob_values(logprobs: SampleLogprobs | PromptLogprobs | None) -> list[dict[int, float] | None] | None:
    """The float view of ``logprobs``: every ``Logprob`` replaced by its ``.logprob``."""
    if logprobs is None:
        return None
    return [None if d is None else {t: lp.logprob for t, lp in d.items()} for d in logprobs]


@dataclass
class RequestMetrics:
    """Wall-clock times (``time.time()``) of a request's life."""

    arrival_time: float
    first_token_time: float | None = None
    finished_time: float | None = None


@dataclass
class CompletionOutput:
    """One generated sequence of a request (``n`` of them per request)."""

    index: int
    text: str
    token_ids: list[int]
    cumulative_logprob: float | None = None
    logprobs: SampleLogprobs | None = None
    finish_reason: str | None = None  # "stop" | "length" | "abort" | None while running
    stop_reason: int | str | None = None  # matched stop string or stop token id; None for EOS

    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class RequestOutput:
    """A request's prompt and its completions; ``out.text`` / ``out["text"]`` read ``outputs[0]``.

    ``prompt_logprobs`` (when the request asked for them) has one entry per prompt token, None for the
    first; a request aborted before its prompt was computed holds the positions computed so far."""

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool
    num_cached_tokens: int = 0
    metrics: RequestMetrics | None = None
    prompt_logprobs: PromptLogprobs | None = None
    extra: dict = field(default_factory=dict, repr=False)

    @property
    def text(self) -> str:
        return self.outputs[0].text

    @property
    def token_ids(self) -> list[int]:
        return self.outputs[0].token_ids

    def __getitem__(self, key: str):
        if key in ("text", "token_ids"):
            return getattr(self, key)
        raise KeyError(key)
