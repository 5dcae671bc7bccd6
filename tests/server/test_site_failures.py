"""One site's bad update, weight or identity is that site's failure, named; never the round's or the run's
(issue #18 §2). Fast: replies are built by hand, no federation runs here (tests/server/test_malicious_sites.py
runs real ones)."""

from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, MetricRecord, RecordDict

from fedpeft import wire
from fedpeft.composition import from_mapping
from fedpeft.errors import ConfigError, FederationError
from fedpeft.messaging import Replies
from fedpeft.methods import build_method
from fedpeft.server.client_dp import ServerClientDp
from fedpeft.server.collect import (
    SITE_NODES_FILE,
    SiteIdentities,
    UpdateLimits,
    collect_secure,
    collect_updates,
    registered_sites,
    weight_sum_integrity,
)
from fedpeft.server.pipeline import AggregationPipeline
from fedpeft.strategies import WeightedSum, build_rule

GLOBAL = {"a": torch.zeros(4), "b": torch.zeros(2, 3)}
LIMITS = UpdateLimits(max_examples=1000, max_update_norm=100.0)


def _reply(node: int, partition: object, update: dict[str, torch.Tensor] | None = None,
           examples: object = 100, loss: float = 1.0) -> SimpleNamespace:
    update = update if update is not None else {name: torch.full_like(t, 0.1) for name, t in GLOBAL.items()}
    metrics = {wire.TRAIN_LOSS: loss, wire.PARTITION_ID: partition, wire.NUM_EXAMPLES: examples}
    content = RecordDict({wire.ADAPTER: ArrayRecord(update), wire.METRICS: MetricRecord(metrics)})
    return SimpleNamespace(metadata=SimpleNamespace(src_node_id=node), content=content)


def _collect(*replies: SimpleNamespace, identities: SiteIdentities | None = None, limits: UpdateLimits = LIMITS):
    return collect_updates(Replies(ok=list(replies)), GLOBAL, "num-examples", limits=limits, identities=identities)


def _fedavg(total: WeightedSum):
    cfg = from_mapping({"model": {"name": "tiny-llama"}})
    pipeline = AggregationPipeline(method=build_method(cfg), rule=build_rule("fedavg"), client_dp=ServerClientDp(cfg))
    return pipeline(GLOBAL, total, server_round=1, sampled_fraction=1.0)


# ---- update norms --------------------------------------------------------------------------------------------

def test_a_huge_finite_update_is_clipped_on_the_server_and_the_site_named():
    huge = {name: torch.full_like(t, 1e20) for name, t in GLOBAL.items()}  # finite: what ruined the adapter
    got = _collect(_reply(11, 0), _reply(12, 1), _reply(13, 2, update=huge))
    assert set(got.clipped_norms) == {"2"} and got.clipped_norms["2"] == pytest.approx(1e20 * math.sqrt(10))
    assert got.total.count == 3 and not got.failures  # clipped, not dropped: its bounded effect stays
    state = _fedavg(got.total).state
    assert state is not None
    change = math.sqrt(sum(float((state[k] - GLOBAL[k]).pow(2).sum()) for k in GLOBAL))
    assert change <= 100.0 / 3 + 1  # at most a third of max_update_norm, plus the honest sites' share


def test_honest_updates_are_not_touched_by_the_default_bound():
    got = _collect(_reply(11, 0), _reply(12, 1), identities=None,
                   limits=UpdateLimits(max_update_norm=from_mapping({}).federation.max_update_norm))
    assert not got.clipped_norms
    assert torch.equal(got.total.update_sum["a"], torch.full((4,), 0.1) * 200)


def test_clipping_leaves_bookkeeping_tensors_alone_and_can_be_switched_off():
    update = {"a": torch.full((4,), 1e6), "b": torch.ones(2, 3)}
    got = _collect(_reply(11, 0, update=update), limits=UpdateLimits(max_update_norm=1.0, bookkeeping=("b",)))
    assert torch.equal(got.total.update_sum["b"], torch.ones(2, 3) * 100)  # the weight times the untouched vector
    assert float(got.total.update_sum["a"].norm()) == pytest.approx(100.0, rel=1e-5)
    off = _collect(_reply(11, 0, update=update), limits=UpdateLimits(max_update_norm=0.0))
    assert not off.clipped_norms and float(off.total.update_sum["a"].max()) == pytest.approx(1e8)


def test_a_non_finite_update_drops_only_its_site():
    bad = {"a": torch.tensor([1.0, math.nan, 0, 0]), "b": torch.zeros(2, 3)}
    got = _collect(_reply(11, 0), _reply(12, 1, update=bad))
    assert got.total.count == 1 and "site 1" in got.failures["12"] and "NaN" in got.failures["12"]


# ---- example counts ------------------------------------------------------------------------------------------

def test_a_site_claiming_a_billion_examples_is_clipped_to_max_examples():
    got = _collect(_reply(11, 0, examples=100), _reply(12, 1, examples=1e9))
    assert got.clipped_examples == {"1": 1e9}
    assert got.total.weight_sum == 100 + 1000


@pytest.mark.parametrize("claim", [math.inf, -math.inf, math.nan, 0, -5, [1.0, 2.0]])
def test_a_site_claiming_an_impossible_example_count_is_dropped_and_named(claim):
    got = _collect(_reply(11, 0), _reply(12, 1), _reply(13, 2, examples=claim))
    assert got.total.count == 2 and got.total.weight_sum == 200
    assert set(got.failures) == {"13"} and got.failures["13"].startswith("rejected:")
    assert "site 2" in got.failures["13"] or "number" in got.failures["13"]
    assert "2" not in got.payload_sha256  # nothing of it is filed as a contribution
    assert _fedavg(got.total).state is not None  # the round goes on without it


def test_the_pipeline_refuses_a_weight_sum_that_is_not_positive_instead_of_crashing():
    total = WeightedSum()
    total.update_sum, total.weight_sum, total.count = {k: torch.ones_like(t) for k, t in GLOBAL.items()}, 0.0, 1
    result = _fedavg(total)
    assert result.state is None and "weight sum" in result.rejected
    total.weight_sum = math.inf
    assert _fedavg(total).state is None


# ---- identities -----------------------------------------------------------------------------------------------

def test_a_site_cannot_file_its_update_under_another_sites_partition():
    identities = SiteIdentities()
    sites, refused = identities.resolve({11: 0, 12: 1, 13: 2})  # the first contact binds each node
    assert sites == {11: "0", 12: "1", 13: "2"} and not refused
    epsilon = {wire.EPSILON: 0.1}
    spoof = _reply(13, 0)
    spoof.content[wire.METRICS] = MetricRecord({**dict(spoof.content[wire.METRICS]), **epsilon})
    got = _collect(_reply(11, 0), _reply(12, 1), spoof, identities=identities)
    assert got.total.count == 2
    assert "node 13 is site 2" in got.failures["13"] and "partition 0" in got.failures["13"]
    assert got.site_epsilon == {} and set(got.payload_sha256) == {"0", "1"}


def test_contested_or_malformed_claims_at_first_contact_bind_nobody():
    identities = SiteIdentities()
    sites, refused = identities.resolve({11: 0, 12: 0, 13: 2, 14: -1, 15: 1.5, 16: None})
    assert sites == {13: "2"}
    assert set(refused) == {11, 12, 14, 15, 16} and "contested" in refused[11]
    sites, refused = identities.resolve({17: 2})  # a partition already held cannot be taken later
    assert not sites and "nodes [13, 17]" in refused[17]


def test_the_deployments_registered_nodes_are_the_whole_truth(tmp_path):
    (tmp_path / SITE_NODES_FILE).write_text('{"11": 4, "12": 7}')
    identities = SiteIdentities(registered_sites(tmp_path))
    sites, refused = identities.resolve({11: 4, 12: 4, 99: 5})
    assert sites == {11: "4"} and "node 12 is site 7" in refused[12] and "not a registered site" in refused[99]
    assert identities.name(12) == "7" and identities.name(99) == "node-99"
    assert registered_sites(tmp_path / "nowhere") is None
    (tmp_path / SITE_NODES_FILE).write_text('["not", "a", "map"]')
    with pytest.raises(FederationError, match="not a map of node ids"):
        registered_sites(tmp_path)


# ---- secure aggregation: the decoded weight sum ----------------------------------------------------------------

def _secure(weight_sum: float, survivors: int = 3) -> SimpleNamespace:
    replies = [_reply(10 + i, i) for i in range(survivors)]
    for reply in replies:
        reply.content[wire.SA_MASKED] = ArrayRecord([np.zeros(3, dtype=np.uint32)])
    return SimpleNamespace(values=np.ones(10) * 0.5, weight_sum=weight_sum, survivors=list(range(survivors)),
                           train_replies=replies, upload_bytes=[12] * survivors, failures={}, refusals={})


@pytest.mark.parametrize("weight_sum", [0.0, -0.5, 3.5, 2.9e-4, math.nan, math.inf])
def test_an_impossible_decoded_weight_sum_fails_the_round_as_an_integrity_failure(weight_sum):
    got = collect_secure(_secure(weight_sum), GLOBAL, weight_scale=10000.0)  # 3 sites, 1..10000 examples each
    assert got.integrity.startswith("integrity failure") and not got.failures  # no site is named: none can be
    assert got.total.count == 0 and not got.total.update_sum  # nothing of the sum reaches the pipeline
    assert set(got.payload_sha256) == {"0", "1", "2"}  # the sites' records stay


def test_a_possible_decoded_weight_sum_passes_and_uniform_weights_must_sum_to_the_sites():
    got = collect_secure(_secure(0.05), GLOBAL, weight_scale=10000.0)
    assert not got.integrity and got.total.weight_sum == pytest.approx(500.0) and got.total.count == 3
    assert not collect_secure(_secure(3.0), GLOBAL, weight_scale=1.0).integrity
    assert collect_secure(_secure(2.0), GLOBAL, weight_scale=1.0).integrity  # uniform: one site pulled it down
    assert weight_sum_integrity(3.0, sites=3, least_each=1.0, most_each=math.inf) == ""
    assert "decoded weight sum is 0" in weight_sum_integrity(0.0, sites=3, least_each=1.0, most_each=math.inf)


# ---- configuration ----------------------------------------------------------------------------------------------

def test_the_bounds_are_configured_and_checked():
    cfg = from_mapping({})
    assert cfg.federation.max_examples == 10000 and cfg.federation.max_update_norm == 100.0
    with pytest.raises(ConfigError, match="federation.max_update_norm"):
        from_mapping({"federation": {"max_update_norm": -1.0}})
    with pytest.raises(ConfigError, match="federation.max_examples"):
        from_mapping({"federation": {"max_examples": 0}})
    assert from_mapping({"federation": {"max_update_norm": 0.0}}).federation.max_update_norm == 0.0


def test_the_coordinator_writes_the_node_map_from_its_pki(tmp_path):
    from fedpeft.deploy.coordinator import Coordinator, CoordinatorSettings
    from fedpeft.errors import DeployError

    for name, index in (("clinic-a", 4), ("clinic-b", 7)):
        (tmp_path / "pki" / "sites" / name).mkdir(parents=True)
        (tmp_path / "pki" / "sites" / name / "site.toml").write_text(f'[site]\nname = "{name}"\nindex = {index}\n')
    cfg = from_mapping({"run": {"name": "r", "out_dir": str(tmp_path / "runs")}})
    coordinator = Coordinator(CoordinatorSettings(pki_dir=tmp_path / "pki", config=cfg, state_dir=tmp_path / "s"))
    coordinator.write_site_nodes({"clinic-a": "123", "clinic-b": "456"})
    assert registered_sites(tmp_path / "runs" / "r") == {123: "4", 456: "7"}
    from fedpeft.runs.site_names import read_site_names

    assert read_site_names(tmp_path / "runs" / "r") == {"4": "clinic-a", "7": "clinic-b"}, "names for the console"
    (tmp_path / "pki" / "sites" / "clinic-b" / "site.toml").write_text('[site]\nname = "clinic-b"\nindex = 4\n')
    with pytest.raises(DeployError, match="share an index"):
        coordinator.write_site_nodes({"clinic-a": "123", "clinic-b": "456"})
