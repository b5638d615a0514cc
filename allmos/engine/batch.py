"""The one object that crosses from the scheduler to the model runner (and, serialized, to workers).

Torch-free: plain Python values only.

In-flight tokens: a token sampled by step N stays on the device until the engine core reads it back,
after it has launched step N + 1. A sequence scheduled in step N + 1 whose last input is that token carries
``input_from_previous_sample=True``; its ``input_token_ids`` hold only the known inputs before it, and the
runner fills the last input on the device from its previous step's samples. No placeholder token id is
ever written into a token list.
"""

from __future__ import annotations

from dataclasses import dataclass

from allmos.engine.sampling_row import SamplingRow


@dataclass(frozen=True)
class PromptLogprobsChunk:
    """Prompt logprobs asked of one scheduled chunk: the logits at position ``start_pos + i`` give the
    logprob (and rank) of ``target_token_ids[i]``, the prompt token at ``start_pos + i + 1``, and the top
    ``num_logprobs`` tokens. Only a prefix of the chunk's positions may have targets (the logits of the last
    prompt token predict no prompt token)."""

    num_logprobs: int
    target_token_ids: list[int]


@dataclass
class ScheduledSeq:
    """One sequence's share of a step: compute KV for its ``num_new_tokens`` inputs at positions
    ``start_pos ...`` (``input_token_ids``, then, when ``input_from_previous_sample``, the token the runner
    sampled for this sequence in its previous step; see the module docstring); when ``sampling`` is set,
    the step also samples the sequence's next token, whose index in the sequence is ``seq_len`` (the runner
    passes that as the sampling position, so one row per request serves every step)."""

    request_id: str
    input_token_ids: list[int]
    start_pos: int  # the sequence's num_computed_tokens before this step
    block_table: list[int]
    sampling: SamplingRow | None
    prompt_logprobs: PromptLogprobsChunk | None = None  # set only for requests with prompt_logprobs
    input_from_previous_sample: bool = False  # the last input is the previous step's sample (on the device)

    @property
    def num_new_tokens(self) -> int:
        return len(self.input_token_ids) + self.input_from_previous_sample

    @property
    def seq_len(self) -> int:
        """Context length once this step's tokens are computed."""
        return self.start_pos + self.num_new_tokens


@dataclass
class ScheduledBatch:
    """Every sequence scheduled for one forward pass, in the order the runner lays out tokens.

    ``has_prompt_logprobs`` is True exactly when some sequence carries a ``PromptLogprobsChunk``; whoever
    builds the batch sets it (the scheduler, the step decoder), so the runner's common path needs no scan."""

    seqs: list[ScheduledSeq]
    has_prompt_logprobs: bool = False

    @property
    def num_tokens(self) -> int:
        return sum(s.num_new_tokens for s in self.seqs)

    @property
    def is_empty(self) -> bool:
        return not self.seqs

    @property
    def sampled_seqs(self) -> list[ScheduledSeq]:
        return [s for s in self.seqs if s.sampling is not None]
