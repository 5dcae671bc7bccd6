"""Typed reads of what a message carries: the type the wire protocol fixes, else the TypeError of a bad value."""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Error, Message, MetricRecord, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from fedpeft import wire
from fedpeft.messaging import (
    Replies,
    array_record,
    as_bytes,
    as_float,
    as_int,
    as_list,
    config_record,
    exchange,
    metric_record,
)
from fedpeft.secagg.server import _malformed
from fedpeft.server.collect import collect_updates


def test_values_convert_as_int_and_float_do_and_bytes_and_lists_pass_through():
    assert as_int(3) == 3 and as_int(2.0) == 2 and as_int("7") == 7 and as_int(True) == 1
    assert as_float(3) == 3.0 and as_float("0.5") == 0.5
    assert as_bytes(b"key") == b"key"
    assert as_list([1, 2]) == [1, 2]


@pytest.mark.parametrize(("read", "value"), [(as_int, [1]), (as_float, [1.0]), (as_bytes, "text"), (as_bytes, 5),
                                             (as_list, "12"), (as_list, 3), (as_int, Array(np.zeros(2)))])
def test_a_value_of_another_type_is_a_type_error(read, value):
    with pytest.raises(TypeError, match="in the message, got"):
        read(value)


def test_records_are_read_by_kind():
    content = RecordDict({wire.CONFIG: ConfigRecord({wire.SERVER_ROUND: 2}), wire.METRICS: MetricRecord({"a": 1}),
                          wire.ADAPTER: ArrayRecord([np.zeros(1, dtype=np.float32)])})
    assert as_int(config_record(content)[wire.SERVER_ROUND]) == 2
    assert metric_record(content)["a"] == 1
    assert len(array_record(content)) == 1
    with pytest.raises(TypeError, match="'metrics' is a MetricRecord, expected a ConfigRecord"):
        config_record(content, wire.METRICS)
    with pytest.raises(KeyError):
        array_record(RecordDict({}))


@pytest.fixture
def task_identity(monkeypatch):
    """Flower stamps new messages with the run of the process; outside a run there is none."""
    monkeypatch.setattr(TaskIdentity, "_run_id", 1)
    monkeypatch.setattr(TaskIdentity, "_node_id", 1)
    monkeypatch.setattr(TaskIdentity, "_task_id", 1)


class _Grid:
    def __init__(self, reply):
        self.reply = reply

    def send_and_receive(self, messages, *, timeout=None):
        return [self.reply(msg) for msg in messages]


def test_a_site_error_without_a_reason_is_a_failure_with_its_code(task_identity):
    grid = _Grid(lambda msg: Message(Error(code=7), reply_to=msg))
    replies = exchange(grid, {5: RecordDict({})}, "train", "1", timeout=1.0)
    assert replies.failed == {5: "error code 7"} and not replies.ok


def test_an_error_the_superlink_writes_is_filed_under_the_lost_site_not_the_superlink(task_identity):
    """For a node whose heartbeats stopped the SuperLink writes the error reply itself (Flower's own function),
    from its own node id; it is the lost site's failure, and the site is not also reported silent."""
    from flwr.server.superlink.linkstate.utils import create_message_error_unavailable_res_message

    def reply(msg):
        msg.metadata.__dict__["_message_id"] = f"m{msg.metadata.dst_node_id}"  # what Grid.push_messages sets
        if msg.metadata.dst_node_id == 7:
            return create_message_error_unavailable_res_message(msg.metadata, "node_unavail")
        return Message(RecordDict({}), reply_to=msg)

    replies = exchange(_Grid(reply), {7: RecordDict({}), 8: RecordDict({})}, "query.x", "1", timeout=5)
    assert [r.metadata.src_node_id for r in replies.ok] == [8]
    assert list(replies.failed) == [7] and "heartbeat" in replies.failed[7], replies.failed


def test_an_update_in_the_wrong_kind_of_record_is_rejected_not_a_crash(task_identity):
    sent = Message(content=RecordDict({}), dst_node_id=5, message_type="train", group_id="1")
    reply = Message(RecordDict({wire.ADAPTER: ConfigRecord({"w": 1.0}),
                                wire.METRICS: MetricRecord({wire.NUM_EXAMPLES: 3, wire.TRAIN_LOSS: 0.1,
                                                            wire.PARTITION_ID: 0})}),
                    reply_to=sent)
    got = collect_updates(Replies(ok=[reply]), {}, "num-examples")
    assert got.total.count == 0 and got.failures["5"].startswith("rejected: message record 'adapter' is a ConfigRecord")


def test_a_masked_upload_in_the_wrong_kind_of_record_is_malformed(task_identity):
    sent = Message(content=RecordDict({}), dst_node_id=5, message_type="train", group_id="1")
    reply = Message(RecordDict({wire.SA_MASKED: ConfigRecord({wire.SA_MASKED: 1})}), reply_to=sent)
    assert _malformed(reply, 4, bits=32) == "no masked vector in the reply"
