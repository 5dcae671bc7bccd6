"""A run's secure rounds: keys set up once per key epoch, then two exchanges a round (masked input, unmasking).

The server re-keys (runs the two set-up exchanges again, in the round that needs it) when

- there is no epoch yet (the first secure round, or the coordinator restarted),
- the round is past the epoch's last round (``secagg.rekey_every`` rounds, 0: the rest of the run, at most
  ``derive.MAX_EPOCH_ROUNDS``),
- the sampled sites are not exactly the epoch's members (a new site, or one that missed the set-up), or
- the previous round saw a failure (a site that vanished may come back without its keys), a site's refusal of a
  protocol step, or an abort.

A dropout inside a round is recovered in that round, as in single-round SecAgg+: the server reconstructs only that
round's masking key of the dropped site, which opens no other round.
"""

from __future__ import annotations

from flwr.app import RecordDict
from flwr.serverapp import Grid

from fedpeft.config import SecAggConfig
from fedpeft.errors import SecAggRefused
from fedpeft.messaging import Refusal
from fedpeft.secagg.derive import MAX_EPOCH_ROUNDS
from fedpeft.secagg.epoch import Epoch
from fedpeft.secagg.server import SecAggRound, SecureSum


class SecAggSession:
    """The secure rounds of one run (one per coordinator process): the current key epoch and what each round sent.

    ``refusals``: the last round's refusals of the masked-input stage (node -> refusal); ``sent``: (round, message
    type) of every exchange so far -- two per steady-state round, four in a round that sets up keys.
    """

    def __init__(self, grid: Grid, settings: SecAggConfig, *, timeout: float, last_round: int) -> None:
        self.grid, self.settings, self.timeout, self.last_round = grid, settings, timeout, last_round
        self.epoch: Epoch | None = None
        self.refusals: dict[int, Refusal] = {}
        self.sent: list[tuple[int, str]] = []

    def epoch_end(self, server_round: int) -> int:
        """The last round a key epoch set up in ``server_round`` serves."""
        every = self.settings.rekey_every
        end = server_round + every - 1 if every > 0 else max(self.last_round, server_round)
        return min(end, server_round + MAX_EPOCH_ROUNDS - 1)

    def run(self, nodes: list[int], server_round: int, train_content: RecordDict, length: int, *,
            integer_bits: int | None = None) -> SecureSum:
        """The decoded sum of the round among ``nodes``, or SecAggAbort (``refusals`` still says who refused)."""
        epoch = self.epoch if self.epoch is not None and self.epoch.covers(nodes, server_round) else None
        secure_round = SecAggRound(self.grid, nodes, server_round, self.settings, timeout=self.timeout,
                                   integer_bits=integer_bits, epoch=epoch, last_round=self.epoch_end(server_round))
        self.epoch, healthy = None, False  # kept only if the round shows the keys are still good everywhere
        try:
            result = secure_round.run(train_content, length)
            healthy = not secure_round.failures and not any(
                r.rule == SecAggRefused.rule for r in secure_round.refusals.values())
            return result
        finally:
            self.refusals = dict(secure_round.refusals)
            self.sent.extend((server_round, message_type) for message_type in secure_round.stages.sent)
            if healthy:
                self.epoch = secure_round.epoch

    def exchanges(self, server_round: int) -> int:
        """How many exchanges (one message to each site, then the replies) ``server_round`` took."""
        return sum(1 for r, _ in self.sent if r == server_round)
