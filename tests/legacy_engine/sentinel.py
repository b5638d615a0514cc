"""The old ``PENDING_TOKEN`` contract where the reference engine meets current shared code."""

from __future__ import annotations

import dataclasses

from allmos.engine.batch import ScheduledBatch, ScheduledSeq
from allmos.memory.block_manager import BlockManager, hash_block
from legacy_engine.request import PENDING_TOKEN


class SentinelBlockManager(BlockManager):
    """The block manager with its old hashing rule: a block holding a negative (pending) id is not hashed."""

    def update_block_hashes(self, seq) -> None:
        num_full = len(seq.token_ids) // self.block_size
        for i in range(len(seq.block_hashes), num_full):
            parent = seq.block_hashes[i - 1] if i else None
            tokens = seq.token_ids[i * self.block_size:(i + 1) * self.block_size]
            if min(tokens) < 0:
                return
            seq.block_hashes.append(hash_block(parent, tokens))


class SentinelRunner:
    """Runs batches whose last input may be ``PENDING_TOKEN`` on a current runner."""

    def __init__(self, runner) -> None:
        self.runner = runner
        self.num_kv_blocks = runner.num_kv_blocks

    def execute(self, batch: ScheduledBatch):
        return self.runner.execute(ScheduledBatch([_translate(s) for s in batch.seqs], batch.has_prompt_logprobs))

    def shutdown(self) -> None:
        self.runner.shutdown()


def _translate(seq: ScheduledSeq) -> ScheduledSeq:
    ids = list(seq.input_token_ids)
    if PENDING_TOKEN in ids[:-1]:
        raise AssertionError(f"{seq.request_id}: a pending input that is not the last one")
    if ids and ids[-1] == PENDING_TOKEN:
        return dataclasses.replace(seq, input_token_ids=ids[:-1], input_from_previous_sample=True)
    return seq
