"""Sort one round's train replies: usable updates into the weighted sum, refusals and failures on the record."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from fedpeft import wire
from fedpeft.audit.payload import payload_bytes, payload_digest
from fedpeft.errors import FedpeftError
from fedpeft.messaging import Refusal, Replies, array_record, as_float, as_int
from fedpeft.models.adapter_state import check_adapter_state
from fedpeft.strategies import WeightedSum


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


def collect_updates(replies: Replies, global_state: dict[str, Any], weighting: str, *,
                    keep_updates: bool = False) -> RoundCollection:
    """``keep_updates``: also keep each (update, weight) pair, for a rule that cannot work on a sum (plain
    aggregation only: a secure sum never has them)."""
    import torch  # noqa: F401  (needed by ArrayRecord.to_torch_state_dict)

    out = RoundCollection(total=WeightedSum(keep_updates=keep_updates),
                          failures={str(node): reason for node, reason in replies.failed.items()})
    for reply in replies.ok:
        node = reply.metadata.src_node_id
        try:
            metrics = reply.content[wire.METRICS]
            refusal = Refusal.in_reply(reply)
            if refusal is not None:
                out.refusals[str(as_int(metrics[wire.PARTITION_ID]))] = refusal
                continue
            record = array_record(reply.content)
            update = record.to_torch_state_dict()
            check_adapter_state(global_state, update, source=f"update from node {node}")
            examples = as_float(metrics[wire.NUM_EXAMPLES])
        except (FedpeftError, KeyError, TypeError, ValueError) as err:
            out.failures[str(node)] = f"rejected: {err}"
            continue
        out.total.add(update, examples if weighting == "num-examples" else 1.0)
        out.losses.append((as_float(metrics[wire.TRAIN_LOSS]), examples))
        out.sizes.append(payload_bytes(record))
        _note_payload(out, metrics, record)
        out.first_record = out.first_record or record
    return out


def collect_secure(secure: Any, global_state: dict[str, Any], weight_scale: float) -> RoundCollection:
    """The decoded secure sum as a RoundCollection; per-site metrics come from the replies' metric records only.

    ``weight_scale`` undoes the weight normalisation (weights travel as w / max_weight); the rule only ever sees
    the sum, and a mean is unchanged by the scale.
    """
    from fedpeft.secagg.vector import unflatten

    out = secure_metrics(secure)
    out.total.update_sum = unflatten(secure.values * weight_scale, global_state)
    out.total.weight_sum = secure.weight_sum * weight_scale
    out.total.count = len(secure.survivors)
    return out


def secure_metrics(secure: Any) -> RoundCollection:
    """What a secure round tells besides the sum: each site's metrics, upload size and digest, refusals, failures."""
    out = RoundCollection(failures={str(node): reason for node, reason in secure.failures.items()})
    for reply, size in zip(secure.train_replies, secure.upload_bytes, strict=True):
        metrics = reply.content[wire.METRICS]
        out.losses.append((float(metrics[wire.TRAIN_LOSS]), 1.0))
        out.sizes.append(size)
        _note_payload(out, metrics, reply.content[wire.SA_MASKED])
        out.first_record = out.first_record or reply.content[wire.SA_MASKED]
    out.refusals = {str(node): refusal for node, refusal in secure.refusals.items()}
    return out


def _note_payload(out: RoundCollection, metrics: Any, record: Any) -> None:
    site = str(int(metrics[wire.PARTITION_ID]))
    out.payload_sha256[site] = payload_digest(record)
    out.payload_bytes[site] = payload_bytes(record)
    if wire.EPSILON in metrics:
        out.site_epsilon[site] = float(metrics[wire.EPSILON])
    if float(metrics.get(wire.SAMPLE_RATE, 0.0)) >= 1.0:
        out.whole_batch_sites.append(site)
