"""SecAgg+ through Flower's simulation engine: real ClientApp/ServerApp, real Ray, real cryptography.

Each site's input is a known vector (so the plaintext sum is known); one simulation runs several scenarios as
rounds: different n, weights and sizes, a sparse neighbour graph, dropouts at each stage, and too few survivors; then
rounds of one run's SecAggSession (keys set up once, two exchanges a round, a dropout, a re-key), counting the
messages the server sends through Flower.
"""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp
from flwr.simulation import run_simulation

from fedpeft import wire
from fedpeft.config import SecAggConfig
from fedpeft.errors import SecAggAbort
from fedpeft.privacy.skellam import unwrap
from fedpeft.secagg.client import handle_keys, handle_shares, handle_unmask, masked_integers, masked_upload
from fedpeft.secagg.encoding import ring_encoding
from fedpeft.secagg.server import SecAggRound
from fedpeft.secagg.session import SecAggSession

pytestmark = pytest.mark.slow
CLIP = 4.0
NUM_NODES = 10
# round -> (number of sites taking part, vector length, secagg settings, {message type: partition ids that vanish})
SCENARIOS = {
    1: (10, 1000, SecAggConfig(clip_range=CLIP), {}),
    2: (5, 17, SecAggConfig(clip_range=CLIP), {}),
    3: (10, 200, SecAggConfig(clip_range=CLIP), {"train": {0, 4, 7}}),  # vanish after sharing keys
    4: (10, 200, SecAggConfig(clip_range=CLIP), {"query.secagg_unmask": {1, 2, 3}}),  # vanish while unmasking
    5: (10, 50, SecAggConfig(clip_range=CLIP, degree=4), {"train": {5, 8}}),  # sparse graph + dropouts
    6: (10, 50, SecAggConfig(clip_range=CLIP), {"query.secagg_shares": {9}, "train": {1}}),
    7: (10, 50, SecAggConfig(clip_range=CLIP), {"train": {0, 1, 2, 3, 4, 5}}),  # 4 left < threshold 6
    8: (10, 300, SecAggConfig(clip_range=CLIP), {"train": {2}}),  # integer uploads (distributed DP), packed
    9: (10, 30, SecAggConfig(clip_range=CLIP), {"train": {3}}),  # 9 left < every site's cohort 10
}
# round -> (bits of the integer ring, the cohort each site asks of a sum before it unmasks)
INTEGER_ROUNDS = {8: (20, 8), 9: (20, 10)}
# rounds of one SecAggSession over all sites: round -> {message type: partition ids that vanish}
SESSION = {10: {}, 11: {}, 12: {"train": {6}}, 13: {}, 14: {}}
SESSION_LENGTH = 64


def _length(server_round: int) -> int:
    return SCENARIOS[server_round][1] if server_round in SCENARIOS else SESSION_LENGTH


def site_integers(pid: int, server_round: int, length: int) -> np.ndarray:
    return np.random.default_rng(77 * server_round + pid).integers(-3000, 3000, length + 1)


def site_input(pid: int, server_round: int, length: int) -> tuple[np.ndarray, float]:
    rng = np.random.default_rng(1000 * server_round + pid)
    return rng.normal(0, 1.5, length), float(rng.uniform(0.05, 1.0))


def dropout_mod(msg: Message, context: Context, call_next):
    server_round = int(msg.content[wire.CONFIG][wire.SERVER_ROUND])
    vanish = (SCENARIOS[server_round][3] if server_round in SCENARIOS else SESSION[server_round]).get(
        msg.metadata.message_type, set())
    if int(context.node_config["partition-id"]) in vanish:
        raise ConnectionError("simulated dropout")
    return call_next(msg, context)


def _client_app() -> ClientApp:
    app = ClientApp(mods=[dropout_mod])

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        config = msg.content[wire.CONFIG]
        pid = int(context.node_config["partition-id"])
        server_round = int(config[wire.SERVER_ROUND])
        if server_round in INTEGER_ROUNDS:
            bits, cohort = INTEGER_ROUNDS[server_round]
            masked = masked_integers(config, context, site_integers(pid, server_round, SCENARIOS[server_round][1]),
                                     bits=bits, min_cohort=cohort)
        else:
            values, weight = site_input(pid, server_round, _length(server_round))
            masked = masked_upload(config, context, values, weight, clip_range=CLIP, bits=32)
        metrics = MetricRecord({wire.PARTITION_ID: pid, wire.TRAIN_LOSS: 0.0})
        return Message(RecordDict({wire.SA_MASKED: masked, wire.METRICS: metrics}), reply_to=msg)

    app.query("secagg_keys")(handle_keys)
    app.query("secagg_shares")(handle_shares)
    app.query("secagg_unmask")(handle_unmask)
    return app


def _server_app(results: dict) -> ServerApp:
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        import time

        while len(list(grid.get_node_ids())) < NUM_NODES:
            time.sleep(0.2)
        nodes = sorted(grid.get_node_ids())
        for server_round, (n, length, settings, _) in SCENARIOS.items():
            content = RecordDict({wire.ADAPTER: ArrayRecord([np.zeros(1, dtype=np.float32)]),
                                  wire.CONFIG: ConfigRecord({wire.SERVER_ROUND: server_round})})
            try:
                secagg = SecAggRound(grid, nodes[:n], server_round, settings, timeout=60,
                                     integer_bits=INTEGER_ROUNDS.get(server_round, (None,))[0])
                results[server_round] = secagg.run(content, length)
            except SecAggAbort as abort:
                results[server_round] = abort
        counting = CountingGrid(grid)
        session = SecAggSession(counting, SecAggConfig(clip_range=CLIP), timeout=60, last_round=max(SESSION))
        for server_round in SESSION:
            content = RecordDict({wire.ADAPTER: ArrayRecord([np.zeros(1, dtype=np.float32)]),
                                  wire.CONFIG: ConfigRecord({wire.SERVER_ROUND: server_round})})
            results[server_round] = session.run(nodes, server_round, content, SESSION_LENGTH)
        results["sent"] = counting.sent

    return app


class CountingGrid:
    """The real Grid, with every message the server sends recorded as (round, message type)."""

    def __init__(self, grid: Grid) -> None:
        self.grid, self.sent = grid, []

    def send_and_receive(self, messages, *, timeout=None):
        messages = list(messages)
        self.sent.extend((int(m.content[wire.CONFIG][wire.SERVER_ROUND]), m.metadata.message_type) for m in messages)
        return self.grid.send_and_receive(messages, timeout=timeout)


@pytest.fixture(scope="module")
def results() -> dict:
    out: dict = {}
    run_simulation(server_app=_server_app(out), client_app=_client_app(), num_supernodes=NUM_NODES,
                   backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0.0}})
    return out


def _expected(result, server_round: int) -> tuple[np.ndarray, float, set[int]]:
    length = _length(server_round)
    pids = {int(r.content[wire.METRICS][wire.PARTITION_ID]) for r in result.train_replies}
    inputs = [site_input(pid, server_round, length) for pid in sorted(pids)]
    total = sum(w * np.clip(x, -CLIP, CLIP) for x, w in inputs)
    return total, sum(w for _, w in inputs), pids


@pytest.mark.parametrize("server_round", [1, 2, 3, 4, 5, 6])
def test_decoded_sum_equals_the_plaintext_weighted_sum(results, server_round):
    n, length, _, vanish = SCENARIOS[server_round]
    result = results[server_round]
    assert not isinstance(result, Exception), result
    expected, weight_sum, pids = _expected(result, server_round)
    if n == NUM_NODES:  # every site takes part, so the vanished ones are known by partition id
        in_sum = set(range(n)) - vanish.get("train", set()) - vanish.get("query.secagg_shares", set())
        assert pids == in_sum, "exactly the sites that delivered a masked input are in the sum"
    else:
        assert len(pids) == n
    bound = ring_encoding(CLIP, n).sum_error_bound(len(pids))  # stochastic rounding: < 1/scale per site
    assert np.max(np.abs(result.values - expected)) <= bound
    assert abs(result.weight_sum - weight_sum) <= bound
    weighted_mean = result.values / result.weight_sum
    assert np.allclose(weighted_mean, expected / weight_sum, atol=1e-5)


def test_fewer_survivors_than_the_threshold_fail_cleanly(results):
    assert isinstance(results[7], SecAggAbort)
    assert "below the threshold" in str(results[7])


def test_masked_upload_is_one_uint32_vector_within_5_percent_of_the_fp32_payload(results):
    result = results[1]
    fp32_bytes = 4 * SCENARIOS[1][1]
    assert all(size <= 1.05 * fp32_bytes for size in result.upload_bytes)
    masked = result.train_replies[0].content[wire.SA_MASKED][wire.SA_MASKED]
    assert masked.dtype == "uint32" and tuple(masked.shape) == (SCENARIOS[1][1] + 1,)


def test_integer_uploads_sum_exactly_in_their_packed_sub_ring(results):
    result, (bits, _) = results[8], INTEGER_ROUNDS[8]
    assert not isinstance(result, Exception), result
    pids = {int(r.content[wire.METRICS][wire.PARTITION_ID]) for r in result.train_replies}
    assert pids == set(range(NUM_NODES)) - {2}
    expected = sum(site_integers(pid, 8, SCENARIOS[8][1]) for pid in pids)
    assert np.array_equal(unwrap(result.ring, bits), expected)
    packed = result.train_replies[0].content[wire.SA_MASKED][wire.SA_MASKED]
    assert packed.dtype == "uint8" and packed.shape == (-(-(SCENARIOS[8][1] + 1) * bits // 8),)


def test_a_site_refuses_to_unmask_a_sum_with_fewer_sites_than_its_cohort(results):
    assert isinstance(results[9], SecAggAbort), "9 survivors, every site asks for 10: no share is revealed"
    assert "shares of site" in str(results[9]), "the masked inputs arrived; the unmasking shares did not"


def test_a_run_sets_keys_up_once_and_then_sends_two_messages_per_site_a_round_through_flower(results):
    from flwr.app import MessageType

    sent = results["sent"]
    kinds = {r: sorted({kind for rr, kind in sent if rr == r}) for r in SESSION}
    counts = {r: sum(1 for rr, _ in sent if rr == r) for r in SESSION}
    setup = sorted([wire.SECAGG_KEYS, wire.SECAGG_SHARES, MessageType.TRAIN, wire.SECAGG_UNMASK])
    steady = sorted([MessageType.TRAIN, wire.SECAGG_UNMASK])
    assert kinds == {10: setup, 11: steady, 12: steady, 13: setup, 14: steady}, "re-keyed after round 12's dropout"
    assert counts[10] == 4 * NUM_NODES and counts[11] == 2 * NUM_NODES and counts[14] == 2 * NUM_NODES
    assert counts[12] == NUM_NODES + (NUM_NODES - 1), "unmasking goes to the 9 sites that sent a masked input"
    for server_round in SESSION:
        result = results[server_round]
        expected, weight_sum, pids = _expected(result, server_round)
        assert pids == (set(range(NUM_NODES)) - {6} if server_round == 12 else set(range(NUM_NODES)))
        bound = ring_encoding(CLIP, NUM_NODES).sum_error_bound(len(pids))
        assert np.max(np.abs(result.values - expected)) <= bound and abs(result.weight_sum - weight_sum) <= bound
