"""Quality of a weight format against the float32 oracle on the same model.

Three measures, all through the engine's own forward (the same kernels a request runs):

* ``token_logprobs``: log-probability of every token of a text given the tokens before it (teacher
  forcing); ``perplexity`` is ``exp(-mean)`` of these over non-overlapping windows.
* ``greedy_agreement``: how much of each greedy continuation two engines share.
* per-token logprob differences: ``token_logprobs`` of one engine's greedy continuation under both engines.

Works on a single-process engine (``tensor_parallel_size=1``); the text is scored in a scratch KV cache,
so the engine's own cache and prefix cache are untouched.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from allmos.attention.context import ForwardContext, forward_context
from allmos.engine.batch import ScheduledBatch, ScheduledSeq

_LOGITS_ROWS = 256  # rows of logits materialized at once


def token_logprobs(llm, token_ids: list[int]) -> torch.Tensor:
    """``[len(token_ids) - 1]`` float64: log p(token_ids[i + 1] | token_ids[: i + 1]) under ``llm``'s model.

    One prefill of the whole list (keep it within the model's context; see ``perplexity`` for long texts).
    """
    runner = llm.engine.runner
    if not hasattr(runner, "_prepare"):
        raise ValueError("token_logprobs needs a single-process engine (tensor_parallel_size=1)")
    if len(token_ids) < 2:
        raise ValueError(f"token_logprobs needs at least 2 tokens, got {len(token_ids)}")
    num_blocks = -(-len(token_ids) // runner.block_size)
    caches = runner._allocate_kv_cache(num_blocks)
    batch = ScheduledBatch([ScheduledSeq("score", list(token_ids), 0, list(range(num_blocks)), None)])
    input_ids, positions, metadata, rope_seq_lens = runner._prepare(batch)
    forward = runner.compiled or runner.model
    targets = input_ids[1:]  # [n - 1]
    out = torch.empty(len(token_ids) - 1, dtype=torch.float64)
    with torch.inference_mode():
        with forward_context(ForwardContext(runner.backend.prepare(metadata), caches, runner.backend, rope_seq_lens)):
            hidden = forward(input_ids, positions)  # [n, hidden]
        for start in range(0, len(token_ids) - 1, _LOGITS_ROWS):
            end = min(start + _LOGITS_ROWS, len(token_ids) - 1)
            logp = torch.log_softmax(runner.model.compute_logits(hidden[start:end]).float(), dim=-1)  # [rows, V]
            out[start:end] = logp.gather(1, targets[start:end, None]).squeeze(1).double().cpu()
    return out


def perplexity(llm, token_ids: list[int], window: int = 1024) -> float:
    """exp(mean negative log-likelihood) over non-overlapping windows of ``window`` tokens (each window is
    scored from its own start, as the usual fixed-window evaluation)."""
    logprobs = [token_logprobs(llm, token_ids[i:i + window]) for i in range(0, len(token_ids) - 1, window)
                if len(token_ids[i:i + window]) >= 2]
    return math.exp(-float(torch.cat(logprobs).mean()))


@dataclass(frozen=True)
class GreedyAgreement:
    """Greedy continuations of the same prompts by two engines."""

    identical: int  # prompts whose continuations are equal
    total: int
    mean_shared_prefix: float  # mean fraction of each continuation before the first different token


def greedy_agreement(candidate: list[list[int]], reference: list[list[int]]) -> GreedyAgreement:
    """Compare token lists prompt by prompt (same order, same lengths expected)."""
    if len(candidate) != len(reference):
        raise ValueError(f"{len(candidate)} candidate continuations for {len(reference)} references")
    shared = []
    for a, b in zip(candidate, reference):
        n = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
        shared.append(n / max(len(b), 1))
    identical = sum(a == b for a, b in zip(candidate, reference))
    return GreedyAgreement(identical, len(reference), sum(shared) / max(len(shared), 1))
