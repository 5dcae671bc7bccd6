"""PromptGrid keeps Flower's send_and_receive contract (every reply, or what came by the timeout) with its own polling.

A SuperLink's replies arrive through ``pull_messages``; the Grid below hands them out on a schedule (the second pull
answers node 1, node 2 never answers), over Flower's own Message objects."""

from __future__ import annotations

import time

import pytest
from flwr.app import ConfigRecord, Message, RecordDict
from flwr.serverapp import Grid
from flwr.supercore.task_identity import TaskIdentity

from fedpeft.server.polling import PromptGrid, prompt


class ScheduledGrid(Grid):
    """Answers node 1 from the second pull on, never node 2; counts the pulls."""

    def __init__(self) -> None:
        self.pulls, self.sent = 0, {}

    def set_run(self, run):
        pass

    @property
    def run(self):
        raise NotImplementedError

    def create_message(self, *args, **kwargs):
        raise NotImplementedError

    def get_node_ids(self):
        return [1, 2]

    def push_messages(self, messages):
        for number, message in enumerate(messages):  # as Flower's in-memory grid does, an id at the push
            message.metadata.__dict__["_message_id"] = f"m{number}"
            self.sent[f"m{number}"] = message
        return list(self.sent)

    def pull_messages(self, message_ids):
        self.pulls += 1
        if self.pulls < 2:
            return []
        return [Message(RecordDict({"c": ConfigRecord({"ok": 1})}), reply_to=self.sent[message_id])
                for message_id in message_ids if self.sent[message_id].metadata.dst_node_id == 1]

    def send_and_receive(self, messages, *, timeout=None):
        raise AssertionError("PromptGrid must not fall back to the wrapped grid's own 3 s polling")


@pytest.fixture(autouse=True)
def task_identity(monkeypatch):
    """Flower stamps new messages with the run of the process; outside a run there is none."""
    monkeypatch.setattr(TaskIdentity, "_run_id", 1)
    monkeypatch.setattr(TaskIdentity, "_node_id", 1)
    monkeypatch.setattr(TaskIdentity, "_task_id", 1)


def _messages() -> list[Message]:
    return [Message(RecordDict({"c": ConfigRecord({"x": 1})}), dst_node_id=node, message_type="train")
            for node in (1, 2)]


def test_replies_come_back_at_the_next_short_poll_and_a_silent_node_ends_at_the_timeout():
    grid = ScheduledGrid()
    started = time.monotonic()
    messages = _messages()
    replies = list(PromptGrid(grid, poll_seconds=0.05).send_and_receive(messages, timeout=0.5))
    assert [r.metadata.reply_to_message_id for r in replies] == ["m0"]
    assert time.monotonic() - started >= 0.5, "node 2 never answered: the exchange lasts until the timeout"
    assert grid.pulls >= 5, "pulled every 0.05 s, not every 3 s"


def test_an_exchange_ends_when_every_message_has_its_reply():
    grid = ScheduledGrid()
    replies = list(PromptGrid(grid, poll_seconds=0.05).send_and_receive(_messages()[:1], timeout=60))
    assert len(replies) == 1 and grid.pulls == 2


def test_only_a_superlink_grid_is_wrapped():
    grid = ScheduledGrid()
    assert prompt(grid) is grid
