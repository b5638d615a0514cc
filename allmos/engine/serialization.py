"""The step message of tensor parallelism: ``ScheduledBatch`` <-> bytes, JSON, no pickle.

Invariant: a ``BatchDecoder`` fed the messages of a ``BatchEncoder`` in order returns batches equal to
the ones encoded (token ids, positions and block ids are ints, sampling fields are ints / floats / int
sequences; floats survive JSON exactly because ``json`` writes the shortest repr that reads back to the
same double). Sequences come back as lists. A message is one kind byte followed by its payload, so a
worker can tell a step from a shutdown before it parses anything.

Most of a decode step repeats the previous one, so the pair is stateful: both sides remember, for the
requests of the previous message only, the block table and the sampling row last sent. A request missing
from a message is forgotten by both and sent in full if it comes back. Layout of a batch (positional
lists, no per-field keys)::

    [FORMAT_VERSION, [[request_id, input_token_ids, start_pos, from_sample, [kept, *new_block_ids], row(, prompt)],
     ...]]

``from_sample`` is 1 when the sequence's last input is the previous step's sample
(``ScheduledSeq.input_from_previous_sample``), else 0. The block table is the first ``kept`` ids of the
remembered table followed by the new ids; ``row`` is ``null`` (nothing sampled), ``0`` (the same row
object as last time) or the ``SamplingRow`` fields in declaration order (``ROW_FIELDS``). ``prompt``,
present only when the sequence carries a ``PromptLogprobsChunk``, is ``[num_logprobs, target_token_ids]``;
the decoder sets the batch's ``has_prompt_logprobs`` from it. ``serialize_batch`` / ``deserialize_batch``
are the stateless case (everything sent in full).
"""

from __future__ import annotations

import dataclasses
import enum
import json
import operator
from dataclasses import dataclass
from typing import Any

from allmos.engine.batch import PromptLogprobsChunk, ScheduledBatch, ScheduledSeq
from allmos.engine.sampler import SamplingRow

FORMAT_VERSION = 4
ROW_FIELDS: tuple[str, ...] = tuple(f.name for f in dataclasses.fields(SamplingRow))
_LIST_FIELDS = ("prompt_token_ids", "output_token_ids", "banned_token_ids")
_LIST_INDEX = tuple(ROW_FIELDS.index(name) for name in _LIST_FIELDS)
_row_values = operator.attrgetter(*ROW_FIELDS)


class MessageKind(enum.IntEnum):
    """First byte of every message broadcast from the driver to the workers."""

    STEP = 1  # payload: serialize_batch(batch)
    SHUTDOWN = 2  # no payload


@dataclass(frozen=True)
class Message:
    kind: MessageKind
    batch: ScheduledBatch | None = None  # set for STEP


# --------------------------------------------------------------------------- batch


class BatchEncoder:
    """Driver side of the step channel: encodes each batch against what the workers hold (see module)."""

    def __init__(self) -> None:
        self._sent: dict[str, tuple[list[int], SamplingRow | None]] = {}

    def encode(self, batch: ScheduledBatch) -> bytes:
        sent: dict[str, tuple[list[int], SamplingRow | None]] = {}
        seqs = []
        for s in batch.seqs:
            table, row = _as_list(s.block_table), s.sampling
            old = self._sent.get(s.request_id)
            kept = len(old[0]) if old is not None and table[:len(old[0])] == old[0] else 0
            same_row = row is not None and old is not None and old[1] is row
            entry = (s.request_id, _as_array(s.input_token_ids), s.start_pos, int(s.input_from_previous_sample),
                     [kept, *table[kept:]],
                     0 if same_row else _row_to_list(row))
            if s.prompt_logprobs is not None:
                entry += ([s.prompt_logprobs.num_logprobs, _as_array(s.prompt_logprobs.target_token_ids)],)
            seqs.append(entry)
            sent[s.request_id] = (table, row)  # the scheduler builds every step's tables afresh
        data = json.dumps([FORMAT_VERSION, seqs], separators=(",", ":"), allow_nan=True).encode()
        self._sent = sent  # only once the message exists: a failed encode changes nothing
        return data


class BatchDecoder:
    """Worker side of the step channel: the inverse of ``BatchEncoder`` over the same message sequence."""

    def __init__(self) -> None:
        self._held: dict[str, tuple[list[int], SamplingRow | None]] = {}

    def decode(self, data: bytes) -> ScheduledBatch:
        """Raises ValueError on a malformed or foreign-version payload, or one that refers to state this
        decoder does not hold."""
        try:
            version, seqs = json.loads(data)
        except (ValueError, TypeError) as exc:
            raise ValueError(f"step message is not a serialized ScheduledBatch: {exc}") from exc
        if version != FORMAT_VERSION:
            raise ValueError(f"step message format version {version!r}, this process reads {FORMAT_VERSION} "
                             "(driver and workers must run the same allmos)")
        held: dict[str, tuple[list[int], SamplingRow | None]] = {}
        out = []
        has_prompt_logprobs = False
        try:
            for rid, ids, start, from_sample, table_op, row_op, *prompt_op in seqs:
                old = self._held.get(rid)
                table, row = self._table(rid, old, table_op), self._row(rid, old, row_op)
                held[rid] = (table, row)
                prompt = _prompt_chunk(prompt_op)
                has_prompt_logprobs |= prompt is not None
                out.append(ScheduledSeq(str(rid), ids, int(start), table, row, prompt, bool(from_sample)))
        except (ValueError, TypeError, IndexError) as exc:
            raise ValueError(f"malformed ScheduledBatch in step message: {exc}") from exc
        self._held = held
        return ScheduledBatch(out, has_prompt_logprobs)

    @staticmethod
    def _table(rid: str, old: tuple | None, table_op: list[int]) -> list[int]:
        kept = table_op[0]
        if not kept:
            return table_op[1:]
        if old is None or kept > len(old[0]):
            raise ValueError(f"request {rid!r} keeps {kept} block ids this process does not hold")
        if kept == len(old[0]) and len(table_op) == 1:
            return old[0]  # unchanged: the very list decoded before (nobody mutates it)
        return old[0][:kept] + table_op[1:]

    @staticmethod
    def _row(rid: str, old: tuple | None, row_op: Any) -> SamplingRow | None:
        if type(row_op) is not int:
            return _row_from_list(row_op)
        if row_op != 0 or old is None or old[1] is None:
            raise ValueError(f"request {rid!r} reuses a sampling row this process does not hold")
        return old[1]


def serialize_batch(batch: ScheduledBatch) -> bytes:
    """Stateless encoding of ``batch``: everything in full."""
    return BatchEncoder().encode(batch)


def deserialize_batch(data: bytes) -> ScheduledBatch:
    """Inverse of ``serialize_batch``; raises ValueError on a malformed or foreign-version payload."""
    return BatchDecoder().decode(data)


def _as_list(values: Any) -> list:
    return values if type(values) is list else list(values)


def _as_array(values: Any) -> list | tuple:
    """Lists and tuples go to JSON as they are; any other sequence is copied into a list."""
    return values if type(values) in (list, tuple) else list(values)


def _row_to_list(row: SamplingRow | None) -> tuple | list | None:
    """The row's fields in declaration order (a tuple, which JSON writes as an array)."""
    if row is None:
        return None
    values = _row_values(row)
    if all(type(values[i]) in (list, tuple) for i in _LIST_INDEX):
        return values
    values = list(values)
    for i in _LIST_INDEX:
        values[i] = list(values[i])
    return values


def _prompt_chunk(prompt_op: list[Any]) -> PromptLogprobsChunk | None:
    """The optional seventh element of a sequence entry: ``[num_logprobs, target_token_ids]``."""
    if not prompt_op:
        return None
    if len(prompt_op) != 1 or len(prompt_op[0]) != 2:
        raise ValueError(f"prompt logprobs entry {prompt_op!r} is not [num_logprobs, target_token_ids]")
    num_logprobs, targets = prompt_op[0]
    return PromptLogprobsChunk(int(num_logprobs), targets)


def _row_from_list(values: list[Any] | None) -> SamplingRow | None:
    if values is None:
        return None
    if len(values) != len(ROW_FIELDS):
        raise ValueError(f"sampling row has {len(values)} fields, expected {len(ROW_FIELDS)}")
    return SamplingRow(*values)


# --------------------------------------------------------------------------- messages


def encode_message(message: Message, encoder: BatchEncoder | None = None) -> bytes:
    """Kind byte, then the batch payload for STEP (against ``encoder``'s state, else in full)."""
    if message.kind is MessageKind.STEP:
        if message.batch is None:
            raise ValueError("a STEP message needs a batch")
        return bytes([MessageKind.STEP]) + (encoder or BatchEncoder()).encode(message.batch)
    return bytes([message.kind])


def decode_message(data: bytes, decoder: BatchDecoder | None = None) -> Message:
    if not data:
        raise ValueError("empty message")
    try:
        kind = MessageKind(data[0])
    except ValueError as exc:
        raise ValueError(f"unknown message kind {data[0]}") from exc
    if kind is MessageKind.STEP:
        return Message(kind, (decoder or BatchDecoder()).decode(data[1:]))
    return Message(kind)
