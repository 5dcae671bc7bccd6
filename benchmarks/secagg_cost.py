"""SecAgg+ protocol cost alone, secure vs plain, one round: client and server CPU time and upload bytes.

The real site handlers (fedpeft/secagg/client.py) and the real, unchanged SecAggRound (fedpeft/secagg/server.py) run
in one process: a minimal stand-in for Flower's Grid delivers each request Message to the handler of its stage with
the node's own Context, so no transport, serialization or training is timed. Times are process CPU time
(time.process_time); the server's time is its total minus the time spent inside the site handlers.
    python benchmarks/secagg_cost.py      # n = 5, 20, 100 sites, 1M values; and an n = 20 round where 30 % vanish
    python benchmarks/secagg_cost.py --clients 5 --values 1000 --dropout-clients 5   # smoke size
Prints a table and ends with a one-line summary; exits non-zero, printing no numbers, if a decoded sum is wrong.
"""

from __future__ import annotations

import argparse
import gc
import resource
import sys
import time
from dataclasses import dataclass, field

import numpy as np
from flwr.app import (
    Array,
    ArrayRecord,
    ConfigRecord,
    Context,
    Message,
    MessageType,
    MetricRecord,
    RecordDict,
)
from flwr.common.constant import SUPERLINK_NODE_ID
from flwr.supercore.task_identity import TaskIdentity

from fedpeft import wire
from fedpeft.audit.payload import payload_bytes
from fedpeft.config import SecAggConfig
from fedpeft.secagg.client import (
    handle_keys,
    handle_shares,
    handle_unmask,
    masked_upload,
)
from fedpeft.secagg.encoding import ring_encoding
from fedpeft.secagg.server import SecAggRound

STAGES = {wire.SECAGG_KEYS: 1, wire.SECAGG_SHARES: 2, MessageType.TRAIN: 3, wire.SECAGG_UNMASK: 4}
HANDLERS = {wire.SECAGG_KEYS: handle_keys, wire.SECAGG_SHARES: handle_shares, wire.SECAGG_UNMASK: handle_unmask}
NODE_BASE = 7_000_000  # node ids are arbitrary integers in Flower; partition i runs on node NODE_BASE + i


class InProcessGrid:
    """What SecAggRound needs of a Grid: ``send_and_receive``, answered by calling the site handlers directly.

    A node in ``vanish`` does not reply to the TRAIN message (it drops after sharing its keys). Every handler call
    is timed per node and stage; ``client_total`` is the sum over all calls so far.
    """

    def __init__(self, contexts: dict[int, Context], inputs: dict[int, tuple[np.ndarray, float]],
                 settings: SecAggConfig, vanish: set[int]) -> None:
        self.contexts, self.inputs, self.settings, self.vanish = contexts, inputs, settings, vanish
        self.client_ms: dict[int, dict[int, float]] = {node: {s: 0.0 for s in range(1, 5)} for node in contexts}
        self.client_total = 0.0
        self.marks: dict[int, tuple[float, float, resource.struct_rusage]] = {}  # stage -> when it returned:
        # (process time, client_total, resource usage)

    def _train(self, msg: Message, context: Context) -> Message:
        """Like fedpeft/client/app.py's _secure_reply, with the site's update given instead of trained."""
        values, weight = self.inputs[msg.metadata.dst_node_id]
        masked = masked_upload(msg.content[wire.CONFIG], context, values, weight,
                               clip_range=self.settings.clip_range, bits=self.settings.bits)
        metrics = MetricRecord({wire.TRAIN_LOSS: 0.0, wire.TRAIN_STEPS: 0,
                                wire.PARTITION_ID: int(context.node_config[wire.NODE_PARTITION_ID])})
        return Message(RecordDict({wire.SA_MASKED: masked, wire.METRICS: metrics}), reply_to=msg)

    def send_and_receive(self, messages, *, timeout: float | None = None) -> list[Message]:
        replies = []
        stage = 0
        for msg in messages:
            node, message_type = msg.metadata.dst_node_id, msg.metadata.message_type
            stage = STAGES[message_type]
            if stage == 3 and node in self.vanish:
                continue
            handler = self._train if stage == 3 else HANDLERS[message_type]
            start = time.process_time()
            reply = handler(msg, self.contexts[node])
            spent = time.process_time() - start
            self.client_ms[node][stage] += 1000 * spent
            self.client_total += spent
            if reply.metadata.src_node_id != node:  # Message(reply_to=msg) swaps src/dst; SecAggRound relies on it
                raise RuntimeError(f"reply from node {node} carries src_node_id {reply.metadata.src_node_id}")
            replies.append(reply)
        self.marks[stage] = (time.process_time(), self.client_total, resource.getrusage(resource.RUSAGE_SELF))
        return replies


@dataclass
class Case:
    n: int
    dropped: int
    degree: int = 0
    threshold: int = 0
    client_ms: float = 0.0  # mean per site that completed the round, stages 1-4
    stage_ms: list[float] = field(default_factory=list)  # the same mean, per stage
    server_ms: float = 0.0  # the server's own time over the whole round
    after_train_ms: float = 0.0  # of which after stage 3: unmask requests, shares, ring sum, mask removal, decode
    self_masks_ms: float = 0.0  # of which: reconstruct survivors' self-mask seeds and remove their masks
    dropped_pairwise_ms: float = 0.0  # of which: reconstruct dropped sites' keys and remove their pairwise masks
    after_train_faults: int = 0  # minor page faults after stage 3 (first touch of newly allocated memory)
    after_train_sys_ms: float = 0.0  # kernel CPU time after stage 3 (mostly those page faults)
    plain_ms: float = 0.0  # plain server: deserialize the fp32 uploads and sum w * x
    secure_bytes: int = 0
    plain_bytes: int = 0
    max_error: float = 0.0
    error_bound: float = 0.0


def timed_method(instance, name: str, sink: dict[str, float]) -> None:
    """Time one method of this instance only (SecAggRound itself stays unchanged)."""
    original = getattr(instance, name)

    def wrapper(*args, **kwargs):
        start = time.process_time()
        try:
            return original(*args, **kwargs)
        finally:
            sink[name] = sink.get(name, 0.0) + time.process_time() - start

    setattr(instance, name, wrapper)


def run_case(n: int, num_dropped: int, length: int, settings: SecAggConfig, seed: int) -> Case:
    rng = np.random.default_rng(seed + n)
    nodes = [NODE_BASE + i for i in range(n)]
    inputs = {node: (rng.normal(0.0, 1.0, length).astype(np.float32), float(rng.uniform(0.05, 1.0)))
              for node in nodes}
    vanish = {int(v) for v in rng.choice(nodes, size=num_dropped, replace=False)} if num_dropped else set()
    contexts = {node: Context(run_id=1, node_id=node, node_config={wire.NODE_PARTITION_ID: i}, state=RecordDict(),
                              run_config={}) for i, node in enumerate(nodes)}
    grid = InProcessGrid(contexts, inputs, settings, vanish)
    content = RecordDict({wire.ADAPTER: ArrayRecord([np.zeros(1, dtype=np.float32)]),
                          wire.CONFIG: ConfigRecord({wire.SERVER_ROUND: 1})})
    secagg = SecAggRound(grid, nodes, 1, settings, timeout=60.0)
    parts: dict[str, float] = {}
    timed_method(secagg, "_remove_self_masks", parts)
    timed_method(secagg, "_remove_dropped_pairwise", parts)
    gc.collect()
    start = time.process_time()
    result = secagg.run(content, length)
    end, usage = time.process_time(), resource.getrusage(resource.RUSAGE_SELF)

    case = Case(n, num_dropped, secagg.degree, secagg.threshold)
    survivors = sorted(set(nodes) - vanish)
    if result.survivors != survivors:
        sys.exit(f"secagg_cost: n={n}: the sum holds sites {result.survivors}, expected {survivors}")
    expected = np.zeros(length)
    for node in survivors:
        values, weight = inputs[node]
        expected += weight * np.clip(values.astype(np.float64), -settings.clip_range, settings.clip_range)
    weight_sum = sum(inputs[node][1] for node in survivors)
    case.error_bound = ring_encoding(settings.clip_range, n, settings.bits).sum_error_bound(len(survivors))
    case.max_error = max(float(np.max(np.abs(result.values - expected))), abs(result.weight_sum - weight_sum))
    if not case.max_error <= case.error_bound:
        sys.exit(f"secagg_cost: n={n}, {num_dropped} dropped: the decoded sum is off by {case.max_error:.3g}, above "
                 f"the encoding's bound {case.error_bound:.3g}; no numbers are reported")

    complete = [grid.client_ms[node] for node in survivors]
    case.stage_ms = [float(np.mean([c[s] for c in complete])) for s in range(1, 5)]
    case.client_ms = sum(case.stage_ms)
    case.server_ms = 1000 * ((end - start) - grid.client_total)
    train_done, clients_then, usage_then = grid.marks[3]
    case.after_train_ms = 1000 * ((end - train_done) - (grid.client_total - clients_then))
    case.after_train_faults = usage.ru_minflt - usage_then.ru_minflt
    case.after_train_sys_ms = 1000 * (usage.ru_stime - usage_then.ru_stime)
    case.self_masks_ms = 1000 * parts.get("_remove_self_masks", 0.0)
    case.dropped_pairwise_ms = 1000 * parts.get("_remove_dropped_pairwise", 0.0)
    case.secure_bytes = int(np.mean(result.upload_bytes))
    del result, secagg, grid, contexts
    gc.collect()

    # Plain FedAvg server for the same uploads: each site sends its update as one fp32 Array; the server
    # deserializes it and adds w * x (weights travel as metrics there).
    plain = {node: ArrayRecord({wire.ADAPTER: Array(inputs[node][0])}) for node in survivors}
    case.plain_bytes = int(np.mean([payload_bytes(record) for record in plain.values()]))
    gc.collect()
    start = time.process_time()
    total, total_weight = np.zeros(length), 0.0
    for node, record in plain.items():
        weight = inputs[node][1]
        total += weight * record[wire.ADAPTER].numpy()
        total_weight += weight
    case.plain_ms = 1000 * (time.process_time() - start)
    if not np.allclose(total, expected, atol=1e-4):
        sys.exit(f"secagg_cost: n={n}: the plain weighted sum differs from the expected sum")
    return case


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--clients", default="5,20,100", help="comma-separated numbers of sites, one round each")
    parser.add_argument("--values", type=int, default=1_000_000, help="adapter values each site uploads")
    parser.add_argument("--dropout", type=float, default=0.3, help="fraction of sites that vanish at stage 3")
    parser.add_argument("--dropout-clients", type=int, default=20, help="n of the extra round with dropouts")
    parser.add_argument("--clip", type=float, default=SecAggConfig.clip_range)
    parser.add_argument("--bits", type=int, default=SecAggConfig.bits)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    # What Flower's ServerApp runtime sets before main() runs: instruction messages need a run and a source node.
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, SUPERLINK_NODE_ID
    settings = SecAggConfig(clip_range=args.clip, bits=args.bits)
    plan = [(int(n), 0) for n in args.clients.split(",")]
    if args.dropout > 0:
        plan.append((args.dropout_clients, int(round(args.dropout * args.dropout_clients))))
    run_case(3, 0, 64, settings, args.seed)  # warm-up: first-call costs of the libraries are not measured
    cases = [run_case(n, dropped, args.values, settings, args.seed) for n, dropped in plan]

    print(f"{args.values:,} values a site, ring Z_2^{args.bits}, clip ±{args.clip}, one round each, process CPU time; "
          "client = mean per site that completed the round, server = its own time (site handlers excluded), "
          "plain = server deserializing n fp32 uploads and summing w * x")
    print(f"{'n':>4} {'dropped':>7} {'deg':>4} {'t':>3} {'client ms':>10} {'server ms':>10} {'plain ms':>9} "
          f"{'srv/plain':>9} {'secure B':>11} {'plain B':>11} {'ratio':>9}")
    for c in cases:
        print(f"{c.n:>4} {c.dropped:>7} {c.degree:>4} {c.threshold:>3} {c.client_ms:>10.1f} {c.server_ms:>10.1f} "
              f"{c.plain_ms:>9.1f} {c.server_ms / c.plain_ms:>8.1f}x {c.secure_bytes:>11,} {c.plain_bytes:>11,} "
              f"{c.secure_bytes / c.plain_bytes:>9.6f}")
    print("breakdown (ms): client stages 1 keys, 2 shares, 3 encode+mask, 4 unmask; server after stage 3 = self masks "
          "+ dropped sites' pairwise masks + other (deserializing the uploads, ring sum, shares, decode), with its "
          "minor page faults and kernel time")
    print(f"{'n':>4} {'dropped':>7} {'c1':>6} {'c2':>6} {'c3':>7} {'c4':>6} {'srv after 3':>11} {'self':>7} "
          f"{'pairwise':>8} {'other':>7} {'faults':>8} {'sys ms':>7} {'max |err|':>9} {'bound':>8}")
    for c in cases:
        s1, s2, s3, s4 = c.stage_ms
        other = c.after_train_ms - c.self_masks_ms - c.dropped_pairwise_ms
        print(f"{c.n:>4} {c.dropped:>7} {s1:>6.2f} {s2:>6.2f} {s3:>7.1f} {s4:>6.2f} {c.after_train_ms:>11.1f} "
              f"{c.self_masks_ms:>7.1f} {c.dropped_pairwise_ms:>8.1f} {other:>7.1f} {c.after_train_faults:>8,} "
              f"{c.after_train_sys_ms:>7.0f} {c.max_error:>9.1e} {c.error_bound:>8.1e}")
    largest = max((c for c in cases if c.dropped == 0), key=lambda c: c.n, default=cases[-1])
    per_million = 1e6 / args.values
    ratio = max(c.secure_bytes / c.plain_bytes for c in cases)
    print(f"summary: upload secure/plain {ratio:.6f}x ({largest.secure_bytes:,} vs {largest.plain_bytes:,} B); at "
          f"n={largest.n} client {largest.client_ms * per_million:.0f} ms CPU per 1M values (stage 3 "
          f"{largest.stage_ms[2] * per_million:.0f} ms), server {largest.server_ms:.0f} ms = "
          f"{largest.server_ms / largest.plain_ms:.1f}x the plain weighted sum")


if __name__ == "__main__":
    main()
