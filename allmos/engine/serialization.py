"""The step message of tensor parallelism: ``ScheduledBatch`` <-> bytes, JSON, no pickle.

Invariant: ``deserialize_batch(serialize_batch(b)) == b`` for every batch the scheduler builds (token
ids, positions and block ids are ints, sampling fields are ints / floats / int sequences; floats survive
JSON exactly because ``json`` writes the shortest repr that reads back to the same double). Sequences
come back as lists. A message is one kind byte followed by its payload, so a worker can tell a step from
a shutdown before it parses anything.

Layout of a batch (positional lists, no per-field keys, so a 256-sequence decode step stays small)::

    [FORMAT_VERSION, [[request_id, input_token_ids, start_pos, block_table, row_or_null], ...]]

where ``row`` lists the ``SamplingRow`` fields in declaration order (``ROW_FIELDS``).
"""

from __future__ import annotations

import dataclasses
import enum
import json
import operator
from dataclasses import dataclass
from typing import Any

from allmos.engine.batch import ScheduledBatch, ScheduledSeq
from allmos.engine.sampler import SamplingRow

FORMAT_VERSION = 1
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


def serialize_batch(batch: ScheduledBatch) -> bytes:
    """UTF-8 JSON of ``batch`` (see the module docstring for the layout)."""
    seqs = [(s.request_id, _as_array(s.input_token_ids), s.start_pos, _as_array(s.block_table),
             _row_to_list(s.sampling)) for s in batch.seqs]
    return json.dumps([FORMAT_VERSION, seqs], separators=(",", ":"), allow_nan=True).encode()


def deserialize_batch(data: bytes) -> ScheduledBatch:
    """Inverse of ``serialize_batch``; raises ValueError on a malformed or foreign-version payload."""
    try:
        version, seqs = json.loads(data)
    except (ValueError, TypeError) as exc:
        raise ValueError(f"step message is not a serialized ScheduledBatch: {exc}") from exc
    if version != FORMAT_VERSION:
        raise ValueError(f"step message format version {version!r}, this process reads {FORMAT_VERSION} "
                         "(driver and workers must run the same allmos)")
    try:
        return ScheduledBatch([ScheduledSeq(str(rid), ids, int(start), table, _row_from_list(row))
                               for rid, ids, start, table, row in seqs])
    except (ValueError, TypeError) as exc:
        raise ValueError(f"malformed ScheduledBatch in step message: {exc}") from exc


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


def _row_from_list(values: list[Any] | None) -> SamplingRow | None:
    if values is None:
        return None
    if len(values) != len(ROW_FIELDS):
        raise ValueError(f"sampling row has {len(values)} fields, expected {len(ROW_FIELDS)}")
    return SamplingRow(*values)


# --------------------------------------------------------------------------- messages


def encode_message(message: Message) -> bytes:
    """Kind byte, then the batch payload for STEP."""
    if message.kind is MessageKind.STEP:
        if message.batch is None:
            raise ValueError("a STEP message needs a batch")
        return bytes([MessageKind.STEP]) + serialize_batch(message.batch)
    return bytes([message.kind])


def decode_message(data: bytes) -> Message:
    if not data:
        raise ValueError("empty message")
    try:
        kind = MessageKind(data[0])
    except ValueError as exc:
        raise ValueError(f"unknown message kind {data[0]}") from exc
    if kind is MessageKind.STEP:
        return Message(kind, deserialize_batch(data[1:]))
    return Message(kind)
