"""The ClientApp: wiring only. Flower delivers a message; the site trains or evaluates; a reply goes back."""

from __future__ import annotations

from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fedpeft import wire
from fedpeft.audit.payload import payload_bytes, payload_digest
from fedpeft.client.mods import Mod, errors_without_paths
from fedpeft.client.proxy import forward_to_worker
from fedpeft.messaging import Refusal, array_record, as_int, config_record


def _site(context: Context):  # imported lazily so that loading the app stays cheap
    from fedpeft.client.site import Site
    from fedpeft.composition import run_config

    cfg = run_config(context.run_config)
    node = context.node_config
    partition_id = int(node[wire.NODE_PARTITION_ID])
    data_partition = (partition_id, int(node.get(wire.NODE_NUM_PARTITIONS, cfg.federation.num_sites)))
    cfg, local_data = _with_local_files(cfg, node)
    if local_data:
        data_partition = (0, 1)  # a deployed site reads its whole file; nothing is partitioned
    policy, ledger = node.get(wire.NODE_POLICY_FILE), node.get(wire.NODE_LEDGER_PATH)
    audit_log, audit_key = node.get(wire.NODE_AUDIT_LOG), node.get(wire.NODE_AUDIT_KEY)
    audit_files = (str(audit_log), str(audit_key)) if audit_log and audit_key else None
    return Site(cfg, partition_id, data_partition, policy_file=str(policy) if policy else None,
                ledger_path=str(ledger) if ledger else None, audit_files=audit_files)


def _with_local_files(cfg, node: dict):
    """The run config with the site's own data file and base-model copy, where its node config names them."""
    from dataclasses import replace

    data_path, base_model = node.get(wire.NODE_DATA_PATH), node.get(wire.NODE_BASE_MODEL)
    if data_path:
        cfg = replace(cfg, data=replace(cfg.data, source=str(data_path), partitioner="iid"))
    if base_model:
        cfg = replace(cfg, model=replace(cfg.model, name=str(base_model)))
    return cfg, bool(data_path)


def _received_adapter(msg: Message) -> dict:
    import torch  # noqa: F401  (Ray workers must import torch before ArrayRecord.to_torch_state_dict)

    return array_record(msg.content).to_torch_state_dict()


def train(msg: Message, context: Context) -> Message:
    from fedpeft.errors import PrivacyError, SecAggError

    site = _site(context)
    config = config_record(msg.content)
    server_round = as_int(config[wire.SERVER_ROUND])
    audit = site.audit()
    secure = site.cfg.federation.secure_aggregation  # one source: the run config the site's policy was checked on
    try:
        if (wire.SA_SURVIVORS in config) != secure:
            raise SecAggError(f"round {server_round}: the message {'lacks' if secure else 'carries'} secure-"
                              "aggregation stages, which the run's federation.secure_aggregation = "
                              f"{str(secure).lower()} does not; the site sends nothing this round")
        if secure:  # this site's keys serve the round (else it refuses before training: nothing is spent)
            from fedpeft.secagg.client import ready

            ready(config, context)
        local = site.train_round(_received_adapter(msg), server_round, dict(config))
    except (PrivacyError, SecAggError) as err:  # policy, budget, a mismatched mode: an answer, not a crash
        audit.refusal(site.cfg.run.name, server_round, str(err))
        return Message(Refusal.of(err).content(site.partition_id), reply_to=msg)
    metrics = {wire.TRAIN_LOSS: local.train.mean_loss, wire.TRAIN_STEPS: local.train.steps,
               wire.PARTITION_ID: site.partition_id, **local.privacy}
    if secure:
        key, upload = wire.SA_MASKED, _masked_upload(msg, context, site, local)
    else:
        metrics[wire.NUM_EXAMPLES] = local.train.num_examples
        key, upload = wire.ADAPTER, ArrayRecord(local.update)
    audit.release(site.cfg.run.name, server_round, payload_digest(upload), payload_bytes(upload), secure=secure,
                  privacy=local.privacy, ledger_line_sha256=local.ledger_line_sha256)
    return Message(RecordDict({key: upload, wire.METRICS: MetricRecord(metrics)}), reply_to=msg)


def _masked_upload(msg: Message, context: Context, site, local) -> ArrayRecord:
    """Only the masked ring vector leaves the site; its weight travels inside it, not as a metric."""
    from fedpeft.secagg.client import masked_integers, masked_upload
    from fedpeft.secagg.vector import flatten, upload_weight

    if local.ring_values is not None:  # distributed DP: the noisy integer sum, its row count inside it
        return masked_integers(config_record(msg.content), context, local.ring_values, bits=local.ring_bits,
                               min_cohort=local.min_cohort)
    cfg = site.cfg
    weight = upload_weight(local.train.num_examples, weighting=cfg.federation.weighting,
                           max_weight=cfg.secagg.max_weight)
    return masked_upload(config_record(msg.content), context, flatten(local.update), weight,
                         clip_range=cfg.secagg.clip_range, bits=cfg.secagg.bits)


def evaluate(msg: Message, context: Context) -> Message:
    site = _site(context)
    result = site.evaluate(_received_adapter(msg))
    metrics = {wire.NUM_EXAMPLES: result.num_examples, wire.EVAL_LOSS: result.loss,
               wire.EVAL_ACCURACY: result.accuracy, wire.PARTITION_ID: site.partition_id}
    site.audit().evaluation(site.cfg.run.name, as_int(config_record(msg.content)[wire.SERVER_ROUND]), metrics)
    return Message(RecordDict({wire.METRICS: MetricRecord(metrics)}), reply_to=msg)


def release_site_metrics(msg: Message, context: Context, call_next) -> Message:
    """Client mod: the reply's metrics leave the site only as ``privacy.site_metrics`` and its policy allow
    (fedpeft.privacy.release); the site's own audit log keeps them exact."""
    from fedpeft.privacy.release import release_metrics

    reply = call_next(msg, context)
    if reply.has_error() or wire.METRICS not in reply.content.metric_records:
        return reply
    mode = _site(context).metrics_mode()
    if mode != "exact":
        released = release_metrics(dict(reply.content.metric_records[wire.METRICS]), mode)
        reply.content.metric_records[wire.METRICS] = MetricRecord(released)
    return reply


def build_client_app(mods: list[Mod] | None = None) -> ClientApp:
    from fedpeft.secagg.client import handle_keys, handle_shares, handle_unmask

    # innermost: every reply's metrics pass through the release rule, whatever mods the caller adds; just outside
    # it, an exception becomes an error reply whose reason names no file path
    client_app = ClientApp(mods=[*(mods or []), errors_without_paths, release_site_metrics])
    client_app.train()(train)
    client_app.evaluate()(evaluate)
    for stage, handler in ((wire.SECAGG_KEYS, handle_keys), (wire.SECAGG_SHARES, handle_shares),
                           (wire.SECAGG_UNMASK, handle_unmask)):
        client_app.query(stage.split(".", 1)[1])(handler)
    return client_app


# The component that `flwr run` loads ([tool.flwr.app.components] clientapp). Outermost, it forwards each message to
# the site's warm worker when the node config names one (a deployed site: fedpeft.client.proxy); without one it
# passes the message on to the handlers below, unchanged.
app = build_client_app([forward_to_worker])
