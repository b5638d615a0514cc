"""The tensor-parallel step channel: frames through a pipe, in order, delta-encoded steps decoded against
what the receiver holds; end-of-file reads as SHUTDOWN; a large step crosses the pipe in pieces."""

from __future__ import annotations

import os
import threading

from allmos.engine.batch import ScheduledBatch, ScheduledSeq
from allmos.engine.serialization import Message, MessageKind
from allmos.engine.worker import StepChannel, make_step_pipe


def _batch(step: int, num_seqs: int, tokens_per_seq: int = 1) -> ScheduledBatch:
    seqs = [ScheduledSeq(f"r{i}", [step + i] * tokens_per_seq, step, [i, i + 1], None) for i in range(num_seqs)]
    return ScheduledBatch(seqs)


def test_steps_arrive_in_order_and_eof_is_shutdown():
    read_fd, write_fd = make_step_pipe()
    sender, receiver = StepChannel(send_fds=[write_fd]), StepChannel(receive_fd=read_fd)
    sent = [_batch(step, num_seqs=3) for step in range(5)]
    for batch in sent:
        sender.send(Message(MessageKind.STEP, batch))
    os.close(write_fd)
    for batch in sent:
        message = receiver.receive()
        assert message.kind is MessageKind.STEP
        assert [s.input_token_ids for s in message.batch.seqs] == [s.input_token_ids for s in batch.seqs]
        assert [s.block_table for s in message.batch.seqs] == [s.block_table for s in batch.seqs]
    assert receiver.receive().kind is MessageKind.SHUTDOWN
    os.close(read_fd)


def test_a_step_larger_than_the_pipe_crosses_while_the_receiver_reads():
    read_fd, write_fd = make_step_pipe()
    sender, receiver = StepChannel(send_fds=[write_fd]), StepChannel(receive_fd=read_fd)
    big = _batch(0, num_seqs=64, tokens_per_seq=8192)  # several MiB encoded: more than the pipe holds
    received = []
    reader = threading.Thread(target=lambda: received.append(receiver.receive()))
    reader.start()
    sender.send(Message(MessageKind.STEP, big))
    reader.join(60)
    assert not reader.is_alive()
    assert [len(s.input_token_ids) for s in received[0].batch.seqs] == [8192] * 64
    os.close(write_fd)
    os.close(read_fd)
