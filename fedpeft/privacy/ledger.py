"""A site's privacy ledger: every DP release the site made, append-only, hash-chained, never reset.

The file is JSON lines. Each line holds one ``LedgerEntry``'s fields plus ``"prev"``, the SHA-256 hex digest of the
previous line's exact bytes (without its newline; 64 zeros on the first line). Appends rewrite the whole file
atomically with the earlier lines byte-identical, so a crash leaves the old ledger or the new one, never a torn one;
anything else found on disk (a partial line, an edit, a removed or reordered line) is tampering or damage, and the
ledger refuses to load rather than silently start over from zero.

Every line also carries ``"schema_version"`` (lines written before it existed have none and are version 1). It lives
on each line, not in a header line, because the ledger outlives fedpeft upgrades: lines written by different
versions sit in one file, and each line says how it is to be read. It is part of the line's bytes, so the hash chain
covers it as it covers every other field and an old ledger's chain is untouched; an append still only hashes the
last line. A line from a newer fedpeft makes the whole ledger refuse to load (LedgerCorrupted, saying "upgrade
fedpeft"): a ledger partly understood would undercount the privacy spent.

Two line versions exist, and a line is written in the oldest one that can hold it:

* version 1, a DP-SGD (Gaussian) release: exactly the fields ``LedgerEntry`` had before distributed DP (round ..
  run), nothing else. Gaussian lines are still written this way, so a fedpeft that predates distributed DP keeps
  reading a ledger that holds only Gaussian releases.
* version 2, any release, written for a distributed-DP (Skellam) release: every ``LedgerEntry`` field, including
  ``mechanism``, ``mu``, ``l1``, ``l2``, ``cohort`` and ``scale``. An older fedpeft refuses the ledger from that line
  on ("upgrade fedpeft"), as it must: it could not account the Skellam release.

This reader reads both; a version-1 line reads as ``mechanism="gaussian"`` with the Skellam fields at their
defaults. ``history()`` hands the releases to ``accounting.history_epsilon``, which accounts a history holding a
Skellam release by RDP whatever the ledger's accountant says (see there).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from fedpeft.errors import LedgerCorrupted, PrivacyBudgetExceeded, PrivacyError
from fedpeft.io.atomic import write_bytes_atomic
from fedpeft.io.schema import SCHEMA_VERSION_KEY, UNVERSIONED, check_schema_version, is_schema_version
from fedpeft.privacy import accounting
from fedpeft.privacy.accounting import AnyRelease, SkellamRelease

KINDS = ("example",)
MECHANISMS = ("gaussian", "skellam")
GENESIS = "0" * 64
SCHEMA_VERSION = 2  # the newest line version read and written; bump when a line's fields change meaning
GAUSSIAN_SCHEMA_VERSION = 1  # the version of a Gaussian line: its fields are version 1's, so old readers read it
# A recorded epsilon below its releases' recomputed epsilon by more than this (relative) is an edit. Recomputing
# is deterministic for one accountant version; the slack absorbs an accountant's numerical drift across versions.
EPSILON_RECOMPUTE_RTOL = 1e-3
_NEVER_RESET = (
    "The ledger is never reset automatically: restore it from a backup or investigate; do not delete it "
    "(deleting it would forget the privacy this site has already spent)"
)


@dataclass(frozen=True)
class LedgerEntry:
    round: int
    steps: int
    sample_rate: float
    noise_multiplier: float
    max_grad_norm: float
    epsilon: float  # the site's cumulative epsilon after this release
    delta: float
    accountant: str
    kind: str = "example"  # "example": a DP-SGD release; a field so that later kinds can be added
    timestamp: str = ""  # UTC ISO 8601, filled by commit() when empty
    run: str = ""  # the federation run (run.name) the round belongs to; rounds are numbered per run
    # Schema version 2: distributed DP. For a "skellam" line, noise_multiplier is the Gaussian-equivalent
    # sqrt(mu) / l2, for display only; the release is accounted from sample_rate, mu, l1, l2 and steps.
    mechanism: str = "gaussian"  # "gaussian": local DP-SGD (Opacus); "skellam": one step summed under secure agg.
    mu: float = 0.0  # skellam: total noise variance of the decoded sum (integer units); gaussian: 0
    l1: float = 0.0  # skellam: L1 sensitivity after rounding (integer units); gaussian: 0
    l2: float = 0.0  # skellam: L2 sensitivity after rounding (integer units); gaussian: 0
    cohort: int = 0  # skellam: the fewest sites whose noise shares are in any decoded sum; gaussian: 0
    scale: float = 0.0  # skellam: integer units per unit of gradient (for the reader); gaussian: 0

    def release(self) -> AnyRelease:
        """The release this line records, as ``accounting.history_epsilon`` composes it."""
        if self.mechanism == "skellam":
            return SkellamRelease(self.sample_rate, self.mu, self.l1, self.l2, self.steps)
        return (self.noise_multiplier, self.sample_rate, self.steps)


_FIELDS = tuple(f.name for f in dataclasses.fields(LedgerEntry))
_SKELLAM_FIELDS = ("mechanism", "mu", "l1", "l2", "cohort", "scale")  # the fields version 2 added
_V1_FIELDS = tuple(name for name in _FIELDS if name not in _SKELLAM_FIELDS)
_INT_FIELDS = ("round", "steps", "cohort")
_FLOAT_FIELDS = ("sample_rate", "noise_multiplier", "max_grad_norm", "epsilon", "delta", "mu", "l1", "l2", "scale")
_STR_FIELDS = ("accountant", "kind", "timestamp", "run", "mechanism")
_DEFAULTS = {f.name: f.default for f in dataclasses.fields(LedgerEntry) if f.name in _SKELLAM_FIELDS}


def _field_problem(name: str, value: Any) -> str | None:
    """Why ``value`` cannot be field ``name`` of a LedgerEntry, or None when it can."""
    if name in _INT_FIELDS:
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            return f"'{name}' must be an integer >= 0, got {value!r}"
        return None
    if name in _STR_FIELDS:
        return None if isinstance(value, str) else f"'{name}' must be a string, got {value!r}"
    if not isinstance(value, (int, float)) or isinstance(value, bool) or math.isnan(value):
        return f"'{name}' must be a number, got {value!r}"
    return None


def _entry_problem(values: dict[str, Any]) -> str | None:
    """Why these field values do not form a valid LedgerEntry, or None."""
    for name in _FIELDS:
        problem = _field_problem(name, values[name])
        if problem:
            return problem
    checks = (
        (0.0 < values["sample_rate"] <= 1.0, "sample_rate", "in (0, 1]"),
        (0.0 <= values["noise_multiplier"] < math.inf, "noise_multiplier", "a finite number >= 0"),
        (values["max_grad_norm"] > 0.0, "max_grad_norm", "> 0"),
        (values["epsilon"] >= 0.0, "epsilon", ">= 0"),
        (0.0 < values["delta"] < 1.0, "delta", "in (0, 1)"),
        (values["accountant"] in accounting.registered_accountants(), "accountant",
         f"one of {tuple(accounting.registered_accountants())}"),
        (values["kind"] in KINDS, "kind", f"one of {KINDS}"),
    )
    for ok, name, expected in checks:
        if not ok:
            return f"'{name}'={values[name]!r} must be {expected}"
    if values["mechanism"] not in MECHANISMS:
        return f"'mechanism'={values['mechanism']!r} must be one of {MECHANISMS}"
    return _skellam_problem(values) if values["mechanism"] == "skellam" else _gaussian_problem(values)


def _gaussian_problem(values: dict[str, Any]) -> str | None:
    """A Gaussian line carries no Skellam fields (it is written as version 1, which has none to hold them)."""
    for name in _SKELLAM_FIELDS[1:]:
        if values[name] != _DEFAULTS[name]:
            return f"'{name}'={values[name]!r} must be {_DEFAULTS[name]!r} for a 'gaussian' release (Skellam only)"
    return None


def _skellam_problem(values: dict[str, Any]) -> str | None:
    finite = all(math.isfinite(values[name]) for name in ("mu", "l1", "l2", "scale"))
    checks = (
        (finite and values["mu"] > 0.0, "mu", "a finite number > 0 for a 'skellam' release"),
        (finite and values["l2"] > 0.0, "l2", "a finite number > 0 for a 'skellam' release"),
        (finite and values["l1"] >= values["l2"], "l1", f"a finite number >= l2={values['l2']!r}"),
        (values["cohort"] >= 1, "cohort", ">= 1 for a 'skellam' release (the sites whose shares are in the sum)"),
        (finite and values["scale"] > 0.0, "scale", "a finite number > 0 for a 'skellam' release"),
    )
    for ok, name, expected in checks:
        if not ok:
            return f"'{name}'={values[name]!r} must be {expected}"
    equivalent = math.sqrt(values["mu"]) / values["l2"]
    if not math.isclose(values["noise_multiplier"], equivalent, rel_tol=1e-9):
        return (f"'noise_multiplier'={values['noise_multiplier']!r} must be sqrt(mu)/l2={equivalent!r} for a "
                "'skellam' release (the Gaussian equivalent, for display)")
    return None


def _normalized(entry: LedgerEntry) -> LedgerEntry:
    """The entry with float fields as floats, so that what is written reads back as an equal entry."""
    values = {name: getattr(entry, name) for name in _FIELDS}
    problem = _entry_problem(values)
    if problem:
        raise PrivacyError(f"ledger entry for round {entry.round!r} is invalid: {problem}; fix the entry")
    floats: dict[str, Any] = {name: float(values[name]) for name in _FLOAT_FIELDS}
    return dataclasses.replace(entry, **floats)


def _sha256(line: bytes) -> str:
    return hashlib.sha256(line).hexdigest()


def _encode(entry: LedgerEntry, prev: str) -> bytes:
    """The line: a Gaussian entry as version 1 (its fields only), any other as version 2 (every field)."""
    gaussian = entry.mechanism == "gaussian"
    record: dict[str, Any] = {SCHEMA_VERSION_KEY: GAUSSIAN_SCHEMA_VERSION if gaussian else SCHEMA_VERSION}
    record.update({name: getattr(entry, name) for name in (_V1_FIELDS if gaussian else _FIELDS)})
    record["prev"] = prev
    # allow_nan: a noise-free release has epsilon = inf, which must be recorded honestly (as JSON 'Infinity').
    return json.dumps(record, allow_nan=True).encode("utf-8")


class PrivacyLedger:
    """The site's ledger at ``path``; a missing file is an empty ledger, anything unreadable is LedgerCorrupted.

    An empty ledger is only right for a site that never released anything: a site checks that (and that no line it
    released was cut or edited) against its signed audit log before it trains (``site_budget.SiteBudget``)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._lines: list[bytes] = []
        self._entries: list[LedgerEntry] = []
        if self.path.exists():
            self._lines, self._entries = _load(self.path)

    @property
    def entries(self) -> tuple[LedgerEntry, ...]:
        return tuple(self._entries)

    def history(self) -> list[AnyRelease]:
        """Every release in order: ``(noise_multiplier, sample_rate, steps)`` tuples and ``SkellamRelease``s."""
        return [e.release() for e in self._entries]

    def rounds(self, run: str = "") -> set[int]:
        """The rounds of ``run`` this site has released."""
        return {e.round for e in self._entries if e.run == run}

    def released(self, run: str, server_round: int) -> bool:
        return server_round in self.rounds(run)

    def last_line_sha256(self) -> str | None:
        """SHA-256 of the newest line: a site's signed audit log records it, anchoring the ledger's head."""
        return _sha256(self._lines[-1]) if self._lines else None

    def line_sha256s(self) -> list[str]:
        """SHA-256 of every line, oldest first (what a site's audit log records as ``ledger_line_sha256``)."""
        return [_sha256(line) for line in self._lines]

    def check_recorded_epsilon(self) -> float:
        """Recompute the cumulative epsilon of every recorded release and check that the newest line records at
        least that much; returns the recomputed epsilon. LedgerCorrupted when it records less: a line's noise,
        sampling rate, steps or epsilon was edited (the hash chain cannot see an edit of the last line; the
        site's audit log anchors it, this check catches an edit that lowers the recorded epsilon below what the
        recorded releases spend). A recorded epsilon may exceed the recomputed one (``cumulative_epsilon`` never
        lets it decrease), never fall below it."""
        if not self._entries:
            return 0.0
        last = self._entries[-1]
        recomputed = accounting.history_epsilon(self.history(), last.delta, last.accountant)
        if recomputed > last.epsilon * (1.0 + EPSILON_RECOMPUTE_RTOL) + 1e-12:
            raise _corrupted(
                self.path, len(self._entries),
                f"it records cumulative epsilon {last.epsilon:.6g} (run {last.run!r}, round {last.round}), but the "
                f"{len(self._entries)} release(s) the ledger records compose to epsilon {recomputed:.6g} "
                f"(delta={last.delta:g}, {last.accountant}): a line's noise multiplier, sampling rate, steps or "
                "epsilon was edited")
        return recomputed

    def epsilon_spent(self) -> float:
        """The cumulative epsilon recorded on the newest line (what ``cumulative_epsilon`` returned when it was
        committed: the history composed by ``accounting.history_epsilon``); 0.0 for an empty ledger."""
        return self._entries[-1].epsilon if self._entries else 0.0

    def cumulative_epsilon(self, release: AnyRelease, delta: float, accountant: str = "prv") -> float:
        """The cumulative epsilon to record for ``release`` after every recorded one: ``history_epsilon`` of the
        whole history, and never below the epsilon already recorded (both are upper bounds on the true epsilon of
        the longer history; the larger keeps the recorded epsilons non-decreasing even where a Skellam release
        switches the accounting from PRV to RDP, or PRV's estimate wobbles)."""
        predicted = accounting.history_epsilon([*self.history(), release], delta, accountant)
        return max(predicted, self.epsilon_spent())

    def check(self, planned: AnyRelease, delta: float, max_epsilon: float, accountant: str = "prv") -> float:
        """Predicted cumulative epsilon after ``planned`` (a Gaussian triple or a ``SkellamRelease``), as
        ``cumulative_epsilon``; PrivacyBudgetExceeded when it would pass ``max_epsilon``."""
        self._check_consistent(delta, accountant)
        if not isinstance(max_epsilon, (int, float)) or isinstance(max_epsilon, bool) or not max_epsilon > 0:
            raise PrivacyError(f"max_epsilon={max_epsilon!r} is invalid; the budget must be a number > 0")
        if isinstance(planned, SkellamRelease):
            planned = accounting.check_skellam_release(planned, where="planned release")
            what = (f"{planned.steps} Skellam release(s), total variance mu={planned.mu:g} (Gaussian-equivalent "
                    f"noise_multiplier={planned.noise_multiplier:g}), sample_rate={planned.sample_rate:g}")
            fix = "raise the noise (mu), lower the sample rate"
        else:
            planned = accounting.check_release(planned, where="planned release")
            sigma, q, steps = planned
            what = f"{steps} steps, noise_multiplier={sigma:g}, sample_rate={q:g}"
            fix = "raise the noise multiplier, plan fewer steps"
        predicted = self.cumulative_epsilon(planned, delta, accountant)
        if predicted > max_epsilon:
            spent = self.epsilon_spent()
            raise PrivacyBudgetExceeded(
                f"privacy ledger {self.path}: epsilon spent so far {spent:.4g}; this round "
                f"({what}) would raise it by "
                f"{predicted - spent:.4g} to {predicted:.4g} (delta={delta:g}, {accountant}), over the site's budget "
                f"max_epsilon={max_epsilon:g}; the site trains nothing this round. To train further, {fix}, "
                "or raise max_epsilon in the site policy"
            )
        return predicted

    def commit(self, entry: LedgerEntry) -> None:
        """Append ``entry`` (a round after every recorded one) and write the ledger atomically."""
        entry = _normalized(entry)
        self._check_appendable(entry)
        self._check_consistent(entry.delta, entry.accountant)
        if not entry.timestamp:
            entry = dataclasses.replace(entry, timestamp=datetime.now(UTC).isoformat(timespec="seconds"))
        self._check_unchanged_on_disk()
        line = _encode(entry, _sha256(self._lines[-1]) if self._lines else GENESIS)
        write_bytes_atomic(self.path, b"".join(old + b"\n" for old in self._lines) + line + b"\n")
        self._lines.append(line)
        self._entries.append(entry)

    def _check_appendable(self, entry: LedgerEntry) -> None:
        if self.released(entry.run, entry.round):
            raise PrivacyError(
                f"privacy ledger {self.path}: round {entry.round} of run {entry.run!r} is already recorded; a release "
                "is counted once. Commit each round's release exactly once"
            )
        last = self._entries[-1] if self._entries else None
        if last is not None and last.run == entry.run and entry.round <= last.round:
            raise PrivacyError(
                f"privacy ledger {self.path}: round {entry.round} is not after the last recorded round "
                f"{last.round} of run {entry.run!r}; rounds are committed in increasing order"
            )
        if entry.epsilon < self.epsilon_spent():
            raise PrivacyError(
                f"privacy ledger {self.path}: round {entry.round} records cumulative epsilon={entry.epsilon:g}, below "
                f"the {self.epsilon_spent():g} already spent; record the cumulative epsilon that check() returned"
            )

    def _check_consistent(self, delta: float, accountant: str) -> None:
        accounting.check_delta(delta)
        accounting.check_accountant(accountant)
        if not self._entries:
            return
        first = self._entries[0]
        if delta != first.delta:
            raise PrivacyError(
                f"privacy ledger {self.path}: delta={delta:g} differs from delta={first.delta:g} of the recorded "
                f"releases; epsilons at different deltas do not compose here. Use delta={first.delta:g}"
            )
        if accountant != first.accountant:
            # Recorded cumulative epsilons must stay comparable (they never decrease); a switch could lower them.
            raise PrivacyError(
                f"privacy ledger {self.path}: accountant {accountant!r} differs from {first.accountant!r} of the "
                f"recorded releases; use accountant {first.accountant!r} for this site"
            )

    def _check_unchanged_on_disk(self) -> None:
        expected = b"".join(line + b"\n" for line in self._lines)
        current = self.path.read_bytes() if self.path.exists() else b""
        if current != expected:
            raise LedgerCorrupted(
                f"privacy ledger {self.path} changed on disk since it was loaded (another process, or an edit); "
                f"nothing was appended. Make sure one process owns the ledger, then reload it. {_NEVER_RESET}"
            )


def _corrupted(path: Path, line_number: int, damage: str) -> LedgerCorrupted:
    return LedgerCorrupted(f"privacy ledger {path} is corrupted at line {line_number}: {damage}. {_NEVER_RESET}")


def _load(path: Path) -> tuple[list[bytes], list[LedgerEntry]]:
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise LedgerCorrupted(
            f"privacy ledger {path} cannot be read ({exc}); fix its permissions. {_NEVER_RESET}") from exc
    if not data:
        raise _corrupted(path, 1, "the file is empty, but a ledger file is only ever written with its entries")
    lines = data.split(b"\n")
    if lines[-1] != b"":
        raise _corrupted(
            path, len(lines), "the last line is partial (no newline at its end); atomic writes never leave one"
        )
    lines.pop()
    entries: list[LedgerEntry] = []
    prev = GENESIS
    for number, line in enumerate(lines, start=1):
        entry, line_prev = _parse_line(path, number, line)
        if line_prev != prev:
            raise _corrupted(
                path, number, "its 'prev' hash does not match the line before it (a line was edited, removed, "
                "inserted or reordered)"
            )
        _check_sequence(path, number, entries, entry)
        entries.append(entry)
        prev = _sha256(line)
    return lines, entries


def _parse_line(path: Path, number: int, line: bytes) -> tuple[LedgerEntry, str]:
    try:
        record = json.loads(line.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise _corrupted(path, number, f"not valid JSON ({exc})") from None
    if not isinstance(record, dict):
        raise _corrupted(path, number, f"expected a JSON object, found {type(record).__name__}")
    # The version first: a newer line's fields may differ, and must read as "upgrade", not as damage.
    version = record.pop(SCHEMA_VERSION_KEY, UNVERSIONED)
    if not is_schema_version(version):
        raise _corrupted(path, number, f"bad value: '{SCHEMA_VERSION_KEY}' must be an integer >= 1, got {version!r}")
    check_schema_version(version, SCHEMA_VERSION, source=f"privacy ledger {path} (line {number})",
                         error=LedgerCorrupted)
    if version == GAUSSIAN_SCHEMA_VERSION:
        expected = set(_V1_FIELDS) | {"prev"}
        record.setdefault("run", "")  # lines written before runs were recorded belong to run ""
    else:
        expected = set(_FIELDS) | {"prev"}
    if set(record) != expected:
        missing, extra = sorted(expected - set(record)), sorted(set(record) - expected)
        raise _corrupted(path, number, f"wrong fields (missing {missing}, unexpected {extra})")
    prev = record.pop("prev")
    if version == GAUSSIAN_SCHEMA_VERSION:
        record.update(_DEFAULTS)  # a version-1 line is a Gaussian release: no Skellam fields
    problem = _entry_problem(record)
    if problem:
        raise _corrupted(path, number, f"bad value: {problem}")
    if not isinstance(prev, str):
        raise _corrupted(path, number, f"'prev' must be a hex string, got {prev!r}")
    record.update({name: float(record[name]) for name in _FLOAT_FIELDS})
    return LedgerEntry(**record), prev


def _check_sequence(path: Path, number: int, entries: list[LedgerEntry], entry: LedgerEntry) -> None:
    if not entries:
        return
    last = entries[-1]
    if entry.run == last.run and entry.round <= last.round:
        raise _corrupted(path, number, f"round {entry.round} does not come after round {last.round} of run "
                                       f"{entry.run!r}")
    if entry.epsilon < last.epsilon:
        raise _corrupted(path, number, f"epsilon {entry.epsilon:g} is below the previous line's {last.epsilon:g}")
    if entry.delta != last.delta or entry.accountant != last.accountant:
        raise _corrupted(path, number, "delta or accountant differs from the earlier lines")
