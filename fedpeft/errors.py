"""Domain exceptions: every error fedpeft raises on purpose derives from FedpeftError.

Each message names the offending file/key/value and the fix, so a user can act on it without reading code.
"""

from __future__ import annotations


class FedpeftError(Exception):
    """Base class of all fedpeft errors."""


class ConfigError(FedpeftError):
    """A configuration key is unknown, has the wrong type, or an invalid value."""


class DataError(FedpeftError):
    """A data file is missing/unreadable, a column is absent, or a partition is empty."""


class ModelError(FedpeftError):
    """A base model cannot be loaded or does not fit the configured task/method."""


class AdapterMismatchError(FedpeftError):
    """Adapter tensors received over the wire do not match the local model's keys or shapes."""


class FederationError(FedpeftError):
    """The federation cannot proceed (too few sites, every site failed, ...)."""


class PrivacyError(FedpeftError):
    """A differential-privacy setting is invalid or cannot be honoured.

    A site that raises one refuses the round; what leaves the site is a typed refusal (``fedpeft.messaging.Refusal``)
    with ``rule`` and ``public`` -- the reason in values, never the site's file paths (the full message stays in
    the site's own log)."""

    default_rule = "privacy"

    def __init__(self, message: str, *, rule: str | None = None, public: str | None = None) -> None:
        super().__init__(message)
        self.rule = rule or self.default_rule
        self.public = public  # None: the message is sent with any file path in it replaced


class PrivacyBudgetExceeded(PrivacyError):
    """Training this round would take a site past its privacy budget; the site refuses and trains nothing."""

    default_rule = "privacy_budget"


class PolicyViolation(PrivacyError):
    """The run config asks for something the site's own privacy policy forbids (``rule`` names the policy key)."""

    default_rule = "policy"


class LedgerCorrupted(PrivacyError):
    """A site's privacy ledger cannot be read or fails its integrity check; it is never silently reset."""


class SecAggError(FedpeftError):
    """Secure aggregation input or message is invalid (malformed, tampered, would overflow the ring)."""


class SecAggAbort(SecAggError):
    """A secure-aggregation round cannot decode (fewer than the threshold survived); nothing partial is released."""


class SecAggRefused(SecAggError):
    """A site will not take a secure-aggregation step (no keys for the epoch, a replayed round, too few sites, a
    request that could reveal both secrets of one site); it answers with a typed refusal (rule ``rule``)."""

    rule = "secure_aggregation"


class PkiError(FedpeftError):
    """The PKI directory is missing, incomplete, or would be overwritten."""


class DeployError(FedpeftError):
    """A coordinator or site agent cannot start: a missing or invalid file, certificate, key or address."""


class CoordinatorUnreachable(DeployError):
    """Nothing answers at the coordinator's address (yet): a site's agent waits and tries again."""


class AuditError(FedpeftError):
    """An audit log or key cannot be read or written."""
