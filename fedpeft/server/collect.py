"""Sort one round's train replies: usable updates into the weighted sum, refusals and failures on the record.

A bad reply is its site's failure, never the round's: a site whose update or example count cannot be used is
dropped from the round with a reason (on the console and in the round's metrics), and the others go on. Which site
a reply comes from is the server's record (``SiteIdentities``, keyed by the Flower node that delivered it), not the
partition index the reply names.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedpeft import wire
from fedpeft.audit.payload import payload_bytes, payload_digest
from fedpeft.errors import FederationError, FedpeftError
from fedpeft.messaging import Refusal, Replies, array_record, as_float
from fedpeft.models.adapter_state import check_adapter_state
from fedpeft.strategies import WeightedSum

SITE_NODES_FILE = "site_nodes.json"  # in the run directory: {"<Flower node id>": <site index>} (deployment)

@dataclass
class RoundCollection:
    total: WeightedSum = field(default_factory=WeightedSum)
    losses: list[tuple[float, float]] = field(default_factory=list)  # (train loss, examples) per usable update
    sizes: list[int] = field(default_factory=list)  # upload bytes per usable update
    failures: dict[str, str] = field(default_factory=dict)  # node id -> reason
    refusals: dict[str, Refusal] = field(default_factory=dict)  # site -> its refusal (policy or budget)
    site_epsilon: dict[str, float] = field(default_factory=dict)  # site -> cumulative example-level epsilon
    payload_sha256: dict[str, str] = field(default_factory=dict)  # site -> digest of what it sent (audit)
    payload_bytes: dict[str, int] = field(default_factory=dict)  # site -> bytes of what it sent
    whole_batch_sites: list[str] = field(default_factory=list)  # DP sites that sampled every row at every step
    first_record: Any = None  # one upload's ArrayRecord, for the upload manifest
    clipped_norms: dict[str, float] = field(default_factory=dict)  # site -> its update's L2 norm before clipping
    clipped_examples: dict[str, float] = field(default_factory=dict)  # site -> the example count it claimed
    integrity: str = ""  # why a decoded secure sum was refused (nothing of it is used); empty when it was sound


@dataclass(frozen=True)
class UpdateLimits:
    """What the server accepts of one site's plain update (``federation.max_examples``, ``max_update_norm``)."""

    max_examples: float = math.inf  # a larger claimed example count is clipped to this
    max_update_norm: float = 0.0  # an update of a larger L2 norm is scaled down to it; 0: no clipping
    bookkeeping: tuple[str, ...] = ()  # upload tensors that are public bookkeeping, not the update (never scaled)


class SiteIdentities:
    """Which site each Flower node is: the server's record, never what a reply says of itself.

    A Flower message's source node id is set by the SuperLink, not by the site (in a deployment the node
    authenticated with its registered key). ``registered`` (node id -> site), where the deployment supplies it from
    its PKI, is the whole truth: a node outside it is no site. Without it (simulation), a node is bound to the
    partition it names the first time it speaks, if no other node holds or claims that partition at the same time,
    and stays bound for the run. Either way a reply that names another partition than its node's is refused.
    """

    def __init__(self, registered: Mapping[int, str] | None = None) -> None:
        self.registered = dict(registered) if registered else None
        self.known: dict[int, str] = dict(self.registered or {})

    def name(self, node: int) -> str:
        return self.known.get(node, f"node-{node}")

    def resolve(self, claims: Mapping[int, object]) -> tuple[dict[int, str], dict[int, str]]:
        """``claims`` (node -> the partition its reply names) as (node -> site, node -> why it is refused)."""
        sites: dict[int, str] = {}
        refused: dict[int, str] = {}
        fresh: dict[str, list[int]] = {}
        for node, claim in claims.items():
            claimed, problem = self._claimed(claim)
            if node in self.known:
                site = self.known[node]
                if claimed == site:
                    sites[node] = site
                else:
                    refused[node] = (f"node {node} is site {site}, but its reply names partition {claim!r}; a site "
                                     "cannot speak for another")
            elif self.registered is not None:
                refused[node] = f"node {node} is not a registered site of this federation"
            elif claimed is None:
                refused[node] = f"node {node}: {problem}"
            else:
                fresh.setdefault(claimed, []).append(node)
        held = {site: node for node, site in self.known.items()}
        for site, nodes in fresh.items():
            if len(nodes) == 1 and site not in held:
                self.known[nodes[0]] = sites[nodes[0]] = site
                continue
            others = sorted({*nodes, *([held[site]] if site in held else [])})
            for node in nodes:
                refused[node] = (f"node {node} names partition {site}, which nodes {others} claim; a contested "
                                 "partition is filed under none of them")
        return sites, refused

    @staticmethod
    def _claimed(claim: object) -> tuple[str | None, str]:
        try:
            value = as_float(claim)
        except (TypeError, ValueError):
            return None, f"its reply names no partition index ({claim!r})"
        if not value.is_integer() or value < 0:
            return None, f"partition index {claim!r} is not a site index (a whole number, 0 or more)"
        return str(int(value)), ""


def claimed_partitions(replies: list[Any]) -> dict[int, object]:
    """Node -> the partition index its reply names (None where it names none)."""
    claims: dict[int, object] = {}
    for reply in replies:
        try:
            claims[reply.metadata.src_node_id] = reply.content[wire.METRICS].get(wire.PARTITION_ID)
        except (KeyError, AttributeError, TypeError):
            claims[reply.metadata.src_node_id] = None
    return claims


def registered_sites(run_dir: Path) -> dict[int, str] | None:
    """The deployment's node id -> site index map (``SITE_NODES_FILE`` in the run directory, written by
    `fedpeft server` from the SuperLink's registration of each site's key and the site's index in its PKI bundle),
    or None where there is none (simulation, or a run submitted by hand)."""
    path = run_dir / SITE_NODES_FILE
    if not path.is_file():
        return None
    try:
        table = json.loads(path.read_text(encoding="utf-8"))
        return {int(node): str(int(site)) for node, site in table.items()}
    except (ValueError, TypeError, AttributeError) as err:
        raise FederationError(f"{path} is not a map of node ids to site indices ({err}); restart `fedpeft server`, "
                              "which writes it from the registered sites") from None


def checked_examples(value: object, site: str, limits: UpdateLimits, out: RoundCollection) -> float:
    """A site's claimed example count: a positive finite number, clipped to ``limits.max_examples``."""
    examples = as_float(value)
    if not (math.isfinite(examples) and examples > 0):
        raise ValueError(f"site {site} claims {value!r} training examples; its weight must be a positive, finite "
                         "count")
    if examples > limits.max_examples:
        out.clipped_examples[site] = examples
        return limits.max_examples
    return examples


def clipped_update(update: dict[str, Any], site: str, limits: UpdateLimits, out: RoundCollection) -> dict[str, Any]:
    """``update`` scaled down to ``limits.max_update_norm`` when its L2 norm (bookkeeping tensors aside) is larger."""
    if not limits.max_update_norm:
        return update
    norm = update_norm(update, limits.bookkeeping)
    if norm <= limits.max_update_norm:
        return update
    out.clipped_norms[site] = norm
    factor = limits.max_update_norm / norm
    return {name: tensor if name in limits.bookkeeping else tensor * factor for name, tensor in update.items()}


def update_norm(update: Mapping[str, Any], bookkeeping: tuple[str, ...] = ()) -> float:
    """The L2 norm in float64 (an fp32 update of 1e20 values squares without overflow there)."""
    squares = sum(float((tensor.double() ** 2).sum()) for name, tensor in update.items() if name not in bookkeeping)
    return math.sqrt(squares)


def collect_updates(replies: Replies, global_state: dict[str, Any], weighting: str, *,
                    keep_updates: bool = False, limits: UpdateLimits | None = None,
                    identities: SiteIdentities | None = None) -> RoundCollection:
    """``keep_updates``: also keep each (update, weight) pair, for a rule that cannot work on a sum (plain
    aggregation only: a secure sum never has them). ``limits``: what one site's update and weight may be (none
    by default); ``identities``: the server's node -> site record (by default, for this round only)."""
    import torch  # noqa: F401  (needed by ArrayRecord.to_torch_state_dict)

    limits = limits or UpdateLimits()
    out = RoundCollection(total=WeightedSum(keep_updates=keep_updates),
                          failures={str(node): reason for node, reason in replies.failed.items()})
    sites, refused = (identities or SiteIdentities()).resolve(claimed_partitions(replies.ok))
    for node, reason in refused.items():
        out.failures[str(node)] = f"rejected: {reason}"
    for reply in replies.ok:
        node = reply.metadata.src_node_id
        if node not in sites:
            continue
        site = sites[node]
        try:
            metrics = reply.content[wire.METRICS]
            refusal = Refusal.in_reply(reply)
            if refusal is not None:
                out.refusals[site] = refusal
                continue
            record = array_record(reply.content)
            update: dict[str, Any] = dict(record.to_torch_state_dict())
            check_adapter_state(global_state, update, source=f"update from site {site} (node {node})")
            examples = checked_examples(metrics[wire.NUM_EXAMPLES], site, limits, out)
            # a site whose policy says site_metrics = "none" releases no loss: nan is "not reported"
            loss = as_float(metrics.get(wire.TRAIN_LOSS, math.nan))
        except (FedpeftError, KeyError, TypeError, ValueError) as err:
            out.failures[str(node)] = f"rejected: {err}"
            continue
        update = clipped_update(update, site, limits, out)
        out.total.add(update, examples if weighting == "num-examples" else 1.0)
        out.losses.append((loss if math.isfinite(loss) else math.nan, examples))
        out.sizes.append(payload_bytes(record))
        _note_payload(out, metrics, record, site)
        out.first_record = out.first_record or record
    return out


def collect_secure(secure: Any, global_state: dict[str, Any], weight_scale: float, *,
                   identities: SiteIdentities | None = None) -> RoundCollection:
    """The decoded secure sum as a RoundCollection; per-site metrics come from the replies' metric records only.

    ``weight_scale`` undoes the weight normalisation (weights travel as w / max_weight); the rule only ever sees
    the sum, and a mean is unchanged by the scale. A decoded weight sum that honest sites cannot produce (a site
    controls its masked weight coordinate) fails the round as an integrity failure: nothing of the sum is used.
    """
    from fedpeft.secagg.vector import unflatten

    out = secure_metrics(secure, identities=identities)
    sites = len(secure.survivors)
    # Each honest normalised weight is in [1 / weight_scale, 1] (at least one example, at most max_weight; exactly 1
    # under uniform weighting, where weight_scale is 1).
    out.integrity = weight_sum_integrity(float(secure.weight_sum), sites=sites, least_each=1.0 / weight_scale,
                                         most_each=1.0, unit=weight_scale)
    if out.integrity:
        return out
    out.total.update_sum = unflatten(secure.values * weight_scale, global_state)
    out.total.weight_sum = secure.weight_sum * weight_scale
    out.total.count = sites
    return out


def weight_sum_integrity(weight_sum: float, *, sites: int, least_each: float, most_each: float,
                         unit: float = 1.0) -> str:
    """Why a decoded weight sum is impossible for ``sites`` honest sites of weight in [least_each, most_each] (within
    the fixed-point error), or "" when it is possible. ``unit`` converts the weights to example counts for the
    message."""
    tolerance = sites * 1e-6 + sites * sites * 1e-8  # far above the ring encoding's error, far below one example
    low, high = sites * least_each - tolerance, sites * most_each + tolerance
    if sites and math.isfinite(weight_sum) and low <= weight_sum <= high:
        return ""
    return (f"integrity failure: the decoded weight sum is {weight_sum * unit:.6g}, which {sites} honest sites "
            f"cannot produce (each weighs {least_each * unit:.6g} to {most_each * unit:.6g}); a site tampered with "
            "its masked weight, so no part of this round's secure sum is used and the global adapter is unchanged")


def secure_metrics(secure: Any, *, identities: SiteIdentities | None = None) -> RoundCollection:
    """What a secure round tells besides the sum: each site's metrics, upload size and digest, refusals, failures.

    Every survivor's input is in the sum whatever its reply says of itself; a reply whose node is not the site it
    names (``identities``) has its metrics left off the record, and is named among the failures."""
    out = RoundCollection(failures={str(node): reason for node, reason in secure.failures.items()})
    sites, refused = (identities or SiteIdentities()).resolve(claimed_partitions(secure.train_replies))
    for node, reason in refused.items():
        out.failures[str(node)] = f"metrics not filed (its input is in the secure sum): {reason}"
    for reply, size in zip(secure.train_replies, secure.upload_bytes, strict=True):
        node = reply.metadata.src_node_id
        if node not in sites:
            continue
        metrics = reply.content[wire.METRICS]
        out.losses.append((float(metrics.get(wire.TRAIN_LOSS, math.nan)), 1.0))
        out.sizes.append(size)
        _note_payload(out, metrics, reply.content[wire.SA_MASKED], sites[node])
        out.first_record = out.first_record or reply.content[wire.SA_MASKED]
    name = identities.name if identities is not None else str
    out.refusals = {name(node): refusal for node, refusal in secure.refusals.items()}
    return out


def _note_payload(out: RoundCollection, metrics: Any, record: Any, site: str) -> None:
    """File what ``site`` (the server's name for the node that sent it) sent, and its privacy metrics."""
    out.payload_sha256[site] = payload_digest(record)
    out.payload_bytes[site] = payload_bytes(record)
    if wire.EPSILON in metrics:
        out.site_epsilon[site] = float(metrics[wire.EPSILON])
    if float(metrics.get(wire.SAMPLE_RATE, 0.0)) >= 1.0:
        out.whole_batch_sites.append(site)
