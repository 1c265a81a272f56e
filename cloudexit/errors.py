"""Errors the library raises, named for the condition.

Each carries the exit code the CLI should use and, where we can give one, a hint that says
what the user should do next. The CLI maps them to messages in one place.
"""

from __future__ import annotations


class CloudexitError(Exception):
    """Base class: a condition the user can act on (exit code 1)."""

    exit_code = 1

    def __init__(self, message: str, hint: str | None = None) -> None:
        super().__init__(message)
        self.hint = hint

    def __str__(self) -> str:
        text = super().__str__()
        return f"{text}\n  hint: {self.hint}" if self.hint else text


class UsageError(CloudexitError):
    """The command line or an input file is wrong (exit code 2)."""

    exit_code = 2


class SourceError(CloudexitError):
    """The object store refused or could not be reached."""


class CredentialsError(SourceError):
    """Credentials are missing, wrong or expired."""


class BucketNotFound(SourceError):
    """The bucket does not exist (or is not visible to these credentials)."""


class EndpointUnreachable(SourceError):
    """The endpoint did not answer after retries."""


class TLSError(SourceError):
    """The endpoint's TLS certificate is not trusted, or it does not speak TLS where it should.

    At the start of a command it is configuration (a private CA, http/https), not an outage:
    the command stops at once with a hint. Mid-run, `migrate` waits and probes instead (a
    firewall may block the domain with its own certificate for a while) and says why."""


class StateError(CloudexitError):
    """The state database is missing, foreign or belongs to another migration."""


class Interrupted(CloudexitError):
    """The user interrupted the run; committed work is kept (exit code 130)."""

    exit_code = 130


class PlaybookError(UsageError):
    """A playbook file is wrong: unknown key, wrong type, missing field (named, with its line)."""


class GateNotMet(CloudexitError):
    """A playbook gate stopped the run (pilot not clean, verify found differences, awaiting a
    confirmation): exit code 3, the message says what to do."""

    exit_code = 3


class NothingMigrated(UsageError):
    """Decommission was asked before anything was delivered anywhere."""


class ConfirmationMismatch(UsageError):
    """`decommission --execute --confirm TOKEN`: the token does not match what would be deleted now."""


class StateDiskFull(StateError):
    """The disk under the state DB is full: the message names its filesystem and free space."""


class StateReadOnly(StateError):
    """The state DB is read-only and the command must write to it."""


class StateCorrupt(StateError):
    """SQLite found damaged pages in the state DB: the message has `PRAGMA quick_check`'s
    findings and the hint names the backup to restore."""


class SigningError(CloudexitError):
    """An audit cannot be signed, or its signature checked (no ssh-keygen, a key that needs a
    passphrase, an unreadable key or signer file)."""
