"""Key epochs: keys set up once, then two exchanges a round; each round's secrets are its own (in-process, fast)."""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import ConfigRecord, Message, MessageType, RecordDict

from fedpeft import wire
from fedpeft.config import SecAggConfig
from fedpeft.errors import SecAggAbort, SecAggRefused
from fedpeft.messaging import Refusal
from fedpeft.privacy.skellam import unwrap
from fedpeft.secagg.client import handle_unmask
from fedpeft.secagg.derive import MASK_KEY, SELF_SEED, round_public_keys, round_secret
from fedpeft.secagg.encoding import ring_encoding
from fedpeft.secagg.session import SecAggSession
from tests.secagg.harness import InProcessGrid, float_input, integer_input, train_content

CLIP = 4.0
LENGTH = 40


@pytest.fixture(autouse=True)
def task_identity(monkeypatch):
    """Messages are made outside a Flower run here: give them the identity a run would."""
    from flwr.supercore.task_identity import TaskIdentity

    for name in ("_run_id", "_node_id", "_task_id"):
        monkeypatch.setattr(TaskIdentity, name, 1)


SETUP = [wire.SECAGG_KEYS, wire.SECAGG_SHARES, MessageType.TRAIN, wire.SECAGG_UNMASK]
STEADY = [MessageType.TRAIN, wire.SECAGG_UNMASK]


def _session(grid: InProcessGrid, last_round: int, **settings) -> SecAggSession:
    return SecAggSession(grid, SecAggConfig(clip_range=CLIP, **settings), timeout=5, last_round=last_round)


def _float_sum_ok(result, grid: InProcessGrid, server_round: int, n: int) -> None:
    inputs = [grid.inputs(node, server_round) for node in result.survivors]
    expected = sum(w * np.clip(x, -CLIP, CLIP) for x, w in inputs)
    bound = ring_encoding(CLIP, n).sum_error_bound(len(inputs))
    assert np.max(np.abs(result.values - expected)) <= bound
    assert abs(result.weight_sum - sum(w for _, w in inputs)) <= bound


def test_a_steady_state_round_is_two_exchanges_and_the_sum_stays_within_the_bound():
    grid = InProcessGrid(5, float_input(LENGTH))
    session = _session(grid, last_round=6)
    for server_round in range(1, 7):
        result = session.run(grid.nodes, server_round, train_content(server_round), LENGTH)
        assert result.survivors == grid.nodes
        _float_sum_ok(result, grid, server_round, 5)
    assert grid.kinds(1) == SETUP, "the first round sets up the keys"
    assert all(grid.kinds(r) == STEADY for r in range(2, 7)), "later rounds: masked input, then unmasking"
    assert [session.exchanges(r) for r in range(1, 7)] == [4, 2, 2, 2, 2, 2]
    sent = [(r, kind) for r, kind, _ in grid.messages]
    assert len(sent) == 5 * (4 + 5 * 2), "one message per site per exchange"


def test_a_dropout_is_recovered_in_its_round_exactly_and_the_next_round_re_keys():
    bits = 20
    grid = InProcessGrid(6, integer_input(LENGTH), integer_bits=bits)
    session = _session(grid, last_round=5)
    vanished = grid.nodes[2]
    grid.vanish[(3, MessageType.TRAIN)] = {vanished}
    results = {r: session.run(grid.nodes, r, train_content(r), LENGTH, integer_bits=bits) for r in range(1, 6)}
    for server_round, result in results.items():
        expected = sum(grid.inputs(node, server_round) for node in result.survivors)
        assert np.array_equal(unwrap(result.ring, bits), expected), f"round {server_round} is exact"
    assert vanished not in results[3].survivors and len(results[3].survivors) == 5
    assert "masked input" in results[3].failures[vanished]
    assert [session.exchanges(r) for r in range(1, 6)] == [4, 2, 2, 4, 2], "re-keyed after the dropout round"
    assert vanished in results[4].survivors, "the site that dropped is back with new keys"


def test_rekey_every_sets_keys_up_again_after_that_many_rounds():
    grid = InProcessGrid(4, float_input(LENGTH))
    session = _session(grid, last_round=7, rekey_every=3)
    for server_round in range(1, 8):
        _float_sum_ok(session.run(grid.nodes, server_round, train_content(server_round), LENGTH), grid,
                      server_round, 4)
    assert [session.exchanges(r) for r in range(1, 8)] == [4, 2, 2, 4, 2, 2, 4]


def test_a_site_that_lost_its_keys_refuses_before_training_and_the_next_round_re_keys():
    grid = InProcessGrid(4, float_input(LENGTH))
    session = _session(grid, last_round=4)
    session.run(grid.nodes, 1, train_content(1), LENGTH)
    restarted = grid.nodes[1]
    del grid.contexts[restarted].state[wire.SA_STATE]  # e.g. the site's process restarted
    result = session.run(grid.nodes, 2, train_content(2), LENGTH)
    assert restarted not in result.survivors and session.refusals[restarted].rule == SecAggRefused.rule
    _float_sum_ok(result, grid, 2, 4)
    result = session.run(grid.nodes, 3, train_content(3), LENGTH)
    assert session.exchanges(3) == 4 and result.survivors == grid.nodes


def test_a_new_site_in_the_sample_starts_a_new_epoch():
    grid = InProcessGrid(5, float_input(LENGTH))
    session = _session(grid, last_round=3)
    session.run(grid.nodes[:4], 1, train_content(1), LENGTH)
    session.run(grid.nodes[:4], 2, train_content(2), LENGTH)
    session.run(grid.nodes, 3, train_content(3), LENGTH)
    assert [session.exchanges(r) for r in (1, 2, 3)] == [4, 2, 4]


def _unmask_again(grid: InProcessGrid, server_round: int, holder: int, *, survivors, dropped) -> Message:
    """The holder's answer to a second unmasking request for a round, naming sites differently."""
    first = grid.requests[(server_round, wire.SECAGG_UNMASK, holder)]
    config = ConfigRecord(dict(first.content[wire.CONFIG]))
    config[wire.SA_SURVIVORS], config[wire.SA_DROPPED] = sorted(survivors), sorted(dropped)
    again = Message(content=RecordDict({wire.CONFIG: config}), dst_node_id=holder,
                    message_type=wire.SECAGG_UNMASK, group_id=str(server_round))
    return handle_unmask(again, grid.contexts[holder])


def test_a_holder_never_reveals_both_secrets_of_a_site_for_a_round():
    grid = InProcessGrid(5, float_input(LENGTH))
    session = _session(grid, last_round=3)
    session.run(grid.nodes, 1, train_content(1), LENGTH)
    session.run(grid.nodes, 2, train_content(2), LENGTH)  # every holder revealed every site's round-2 self seed
    holder, victim = grid.nodes[0], 2  # index 2 is grid.nodes[1]
    everyone = set(range(1, 6))
    reply = _unmask_again(grid, 2, holder, survivors=everyone - {victim}, dropped={victim})
    refusal = Refusal.in_reply(reply)
    assert refusal is not None and refusal.rule == SecAggRefused.rule and "once" in refusal.reason
    assert wire.SA_KEY_SHARES not in reply.content.get(wire.CONFIG, {}), "no masking-key share left the site"
    # one request naming a site both ways is refused as well, before anything is revealed
    grid.vanish[(3, wire.SECAGG_UNMASK)] = set(grid.nodes)  # the round's own unmasking is never answered
    with pytest.raises(SecAggAbort):
        session.run(grid.nodes, 3, train_content(3), LENGTH)
    del grid.vanish[(3, wire.SECAGG_UNMASK)]
    both = Refusal.in_reply(_unmask_again(grid, 3, holder, survivors=everyone, dropped={victim}))
    assert both is not None and "both" in both.reason
    # a refused request revealed nothing, so the round's one answer is still to give; after it, nothing more
    answer = _unmask_again(grid, 3, holder, survivors=everyone - {victim}, dropped={victim})
    assert Refusal.in_reply(answer) is None and list(answer.content[wire.CONFIG][wire.SA_KEY_FROM]) == [victim]
    assert victim not in answer.content[wire.CONFIG][wire.SA_SELF_MASK_FROM]
    other_way = Refusal.in_reply(_unmask_again(grid, 3, holder, survivors=everyone, dropped=set()))
    assert other_way is not None, "the victim's round-3 self-mask share stays with the holder"


def test_a_site_masks_one_input_per_round_only():
    grid = InProcessGrid(4, float_input(LENGTH))
    session = _session(grid, last_round=2)
    session.run(grid.nodes, 1, train_content(1), LENGTH)
    node = grid.nodes[0]
    again = grid.requests[(1, MessageType.TRAIN, node)]
    refusal = Refusal.in_reply(grid.train(again, grid.contexts[node]))
    assert refusal is not None and "already masked" in refusal.reason


def test_round_secrets_differ_per_round_purpose_and_epoch_and_so_do_the_masks():
    master, epoch, other_epoch = bytes(range(32)), b"e" * 16, b"f" * 16
    seeds = {round_secret(master, purpose, e, r) for purpose in (MASK_KEY, SELF_SEED) for e in (epoch, other_epoch)
             for r in range(1, 51)}
    assert len(seeds) == 2 * 2 * 50
    assert round_secret(master, SELF_SEED, epoch, 7) == round_secret(master, SELF_SEED, epoch, 7)
    keys = round_public_keys(master, epoch, 1, 50)
    assert len({keys[i: i + 32] for i in range(0, len(keys), 32)}) == 50
    # the same input masked in two rounds of one epoch gives unrelated vectors
    grid = InProcessGrid(3, lambda node, r: (np.zeros(LENGTH), 0.5))
    session = _session(grid, last_round=2)
    uploads = []
    for server_round in (1, 2):
        result = session.run(grid.nodes, server_round, train_content(server_round), LENGTH)
        uploads.append(result.train_replies[0].content[wire.SA_MASKED][wire.SA_MASKED].numpy())
    assert np.mean(uploads[0] == uploads[1]) < 0.01


def test_rekey_every_is_checked_when_the_run_is_built():
    from fedpeft.composition import from_mapping
    from fedpeft.errors import ConfigError

    assert from_mapping({"secagg": {"rekey_every": 5}}).secagg.rekey_every == 5
    with pytest.raises(ConfigError, match="secagg.rekey_every"):
        from_mapping({"secagg": {"rekey_every": -1}})
