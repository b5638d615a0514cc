"""The one object that crosses from the scheduler to the model runner (and, serialized, to workers)."""

from __future__ import annotations

from dataclasses import dataclass

from allmos.engine.sampler import SamplingRow


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
    """One sequence's share of a step: compute KV for ``input_token_ids`` at positions
    ``start_pos ...``; when ``sampling`` is set, the step also samples the sequence's next token, whose
    index in the sequence is ``seq_len`` (the runner uses that as the sampling position; the row's own
    ``position`` field is not read, so one row per request serves every step)."""

    request_id: str
    input_token_ids: list[int]
    start_pos: int  # the sequence's num_computed_tokens before this step
    block_table: list[int]
    sampling: SamplingRow | None
    prompt_logprobs: PromptLogprobsChunk | None = None  # set only for requests with prompt_logprobs

    @property
    def num_new_tokens(self) -> int:
        return len(self.input_token_ids)

    @property
    def seq_len(self) -> int:
        """Context length once this step's tokens are computed."""
        return self.start_pos + len(self.input_token_ids)


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
