"""A scheduled batch as model inputs: host arrays first (``host_step``), then one upload (``upload``, or the
decode graphs' ``load`` into their persistent buffers).

Inputs that are the previous step's samples (``ScheduledSeq.input_from_previous_sample``) are not known on
the host when the step is prepared: they travel as 0 with their flat index (``pending``) and the row of the
previous step's sampled tokens that holds them (``pending_rows``), and are filled on the device.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np
import torch

from allmos.attention import cascade as cascade_planning
from allmos.attention.cascade import MIN_GROUP_SIZE, CascadeArrays, plan_cascade
from allmos.attention.metadata import AttentionMetadata
from allmos.engine.batch import ScheduledBatch
from allmos.utils.transfer import pack_aligned, split_packed, to_device

# the previous step's sampled tokens on the device ([num_sampled] int64) and request id -> row
LastSampled = tuple[torch.Tensor, dict[str, int]]


@dataclass
class HostStep:
    """One step's inputs on the host, before upload."""

    input_ids: np.ndarray  # [num_tokens] int64, 0 where the input is the previous step's sample
    positions: np.ndarray  # [num_tokens] int64
    slot_mapping: np.ndarray  # [num_tokens] int64
    q_lens: np.ndarray  # [num_seqs] int64, new tokens per sequence
    seq_lens: np.ndarray  # [num_seqs] int64, context length after this step
    query_start_loc: np.ndarray  # [num_seqs + 1] int64
    seq_of_token: np.ndarray  # [num_tokens] int64
    block_tables: np.ndarray  # [num_seqs, longest] int32
    pending: np.ndarray  # [p] int64: flat indices of inputs that are the previous step's samples
    pending_rows: np.ndarray  # [p] int64: their rows in the previous step's sampled tokens
    cascade: CascadeArrays | None = None  # a decode step's shared-prefix groups, when they pay

    @property
    def num_seqs(self) -> int:
        return self.seq_lens.shape[0]

    @property
    def is_decode(self) -> bool:
        return bool((self.q_lens == 1).all())

    @classmethod
    def for_decode(cls, input_ids: np.ndarray, positions: np.ndarray, slot_mapping: np.ndarray, seq_lens: np.ndarray,
                   block_tables: np.ndarray, pending: np.ndarray, pending_rows: np.ndarray,
                   cascade: CascadeArrays | None = None) -> HostStep:
        """A decode step (one new token per sequence) from its per-sequence arrays."""
        n = input_ids.shape[0]
        rows = np.arange(n, dtype=np.int64)
        return cls(input_ids, positions, slot_mapping, np.ones(n, dtype=np.int64), seq_lens,
                   np.arange(n + 1, dtype=np.int64), rows, block_tables, pending, pending_rows, cascade)


def host_step(batch: ScheduledBatch, block_size: int, last_sampled: LastSampled | None,
              cascade_tile_members: int | None = None) -> HostStep:
    """The step's inputs as host arrays (no device work); with ``cascade_tile_members`` (the backend runs
    cascade attention) a decode step also gets its shared-prefix groups."""
    seqs = batch.seqs
    n = len(seqs)
    q_lens = np.fromiter((s.num_new_tokens for s in seqs), dtype=np.int64, count=n)
    seq_lens = np.fromiter((s.start_pos + s.num_new_tokens for s in seqs), dtype=np.int64, count=n)
    query_start_loc = np.zeros(n + 1, dtype=np.int64)
    np.cumsum(q_lens, out=query_start_loc[1:])
    num_tokens = int(query_start_loc[-1])
    input_ids = np.fromiter(itertools.chain.from_iterable(_known_inputs(s) for s in seqs), dtype=np.int64,
                            count=num_tokens)  # a previous step's sample is a 0 here, filled on the device
    # absolute position of every new token: start_pos of its sequence + index within the step
    seq_of_token = np.repeat(np.arange(n), q_lens)
    positions = np.arange(num_tokens) - query_start_loc[seq_of_token] + (seq_lens - q_lens)[seq_of_token]
    block_tables = _pad_block_tables([s.block_table for s in seqs])  # [n, max_blocks] int32
    slot_mapping = (block_tables[seq_of_token, positions // block_size].astype(np.int64) * block_size
                    + positions % block_size)
    pending, pending_rows = _pending_sources(last_sampled, query_start_loc, seqs)
    step = HostStep(input_ids, positions, slot_mapping, q_lens, seq_lens, query_start_loc, seq_of_token,
                    block_tables, pending, pending_rows)
    if step.is_decode:
        step.cascade = _cascade_groups(block_tables, seq_lens, block_size, cascade_tile_members)
    return step


def _cascade_groups(block_tables: np.ndarray, seq_lens: np.ndarray, block_size: int,
                    tile_members: int | None) -> CascadeArrays | None:
    """A decode step's shared-prefix groups (``allmos.attention.cascade``) when the backend runs cascade
    attention (``tile_members``) and sharing pays; else None."""
    if tile_members is None or len(seq_lens) < MIN_GROUP_SIZE:
        return None
    return plan_cascade(block_tables, seq_lens, block_size, tile_members, cascade_planning.DEFAULT_CASCADE_POLICY)


def upload(host: HostStep, device: torch.device, last_sampled: LastSampled | None):
    """``host`` -> (input_ids, positions, metadata, rope_seq_lens) on ``device`` in two packed copies; the
    inputs that are the previous step's samples are filled on the device from ``last_sampled``."""
    i64_parts = [host.input_ids, host.positions, host.slot_mapping, host.seq_lens[host.seq_of_token],
                 host.pending, host.pending_rows]
    i32_parts = [host.query_start_loc, host.seq_lens, host.block_tables.ravel()]
    if host.cascade is not None:
        i32_parts += [host.cascade.prefix_blocks, host.cascade.members, host.cascade.tiles.ravel()]
    i64, i64_starts = pack_aligned(i64_parts, np.int64)
    i32, i32_starts = pack_aligned(i32_parts, np.int32)
    input_ids_dev, positions_dev, slots_dev, rope_seq_lens, pending_dev, rows_dev = split_packed(
        to_device(i64, device), i64_starts, [p.size for p in i64_parts])
    qsl_dev, seq_lens_dev, tables_dev, *cascade_dev = split_packed(to_device(i32, device), i32_starts,
                                                                   [p.size for p in i32_parts])
    if len(host.pending):
        input_ids_dev[pending_dev] = last_sampled[0][rows_dev]
    metadata = AttentionMetadata(
        slot_mapping=slots_dev, query_start_loc=qsl_dev, seq_lens=seq_lens_dev,
        block_tables=tables_dev.view(host.block_tables.shape), max_query_len=int(host.q_lens.max()),
        max_seq_len=int(host.seq_lens.max()), is_decode=host.is_decode,
        query_start_loc_cpu=host.query_start_loc.tolist(), seq_lens_cpu=host.seq_lens.tolist(),
        **_cascade_fields(cascade_dev, host.cascade),
    )
    return input_ids_dev, positions_dev, metadata, rope_seq_lens


def _cascade_fields(parts: list[torch.Tensor], arrays: CascadeArrays | None) -> dict:
    """``AttentionMetadata``'s cascade fields from the device copies of (prefix_blocks, members, tiles)."""
    if arrays is None:
        return {}
    prefix_blocks, members, tiles = parts
    return dict(cascade_prefix_blocks=prefix_blocks, cascade_members=members,
                cascade_tiles=tiles.view(arrays.tiles.shape))


def _pending_sources(last_sampled: LastSampled | None, query_start_loc: np.ndarray,
                     seqs) -> tuple[np.ndarray, np.ndarray]:
    """The flat index of every input that is the previous step's sample (the last input of a sequence with
    ``input_from_previous_sample``), and the row of the previous step's sampled tokens that holds it."""
    from_sample = [i for i, s in enumerate(seqs) if s.input_from_previous_sample]
    if not from_sample:
        empty = np.zeros(0, dtype=np.int64)
        return empty, empty
    if last_sampled is None:
        raise RuntimeError("a scheduled input is the previous step's sample but that step sampled nothing")
    row_of = last_sampled[1]
    try:
        rows = np.fromiter((row_of[seqs[i].request_id] for i in from_sample), dtype=np.int64, count=len(from_sample))
    except KeyError as exc:
        raise RuntimeError(f"request {exc} takes an input it did not sample in the previous step") from exc
    return query_start_loc[1:][from_sample] - 1, rows


def _known_inputs(seq) -> list[int]:
    """``seq``'s input ids with a 0 standing for an input taken from the previous step's sample."""
    return [*seq.input_token_ids, 0] if seq.input_from_previous_sample else seq.input_token_ids


def _pad_block_tables(tables: list[list[int]]) -> np.ndarray:
    """Rows of different lengths -> [len(tables), longest] int32, zero-padded (padding is never read)."""
    lengths = np.fromiter((len(t) for t in tables), dtype=np.int64, count=len(tables))
    out = np.zeros((len(tables), max(1, int(lengths.max()))), dtype=np.int32)
    flat = np.fromiter(itertools.chain.from_iterable(tables), dtype=np.int32, count=int(lengths.sum()))
    rows = np.repeat(np.arange(len(tables)), lengths)
    cols = np.arange(flat.size) - np.repeat(np.cumsum(lengths) - lengths, lengths)
    out[rows, cols] = flat
    return out
