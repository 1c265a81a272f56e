"""Errors the library raises, named for the condition.

Each carries the exit code the CLI should use and, where we can give one, a hint that says
what the user should do next. The CLI maps them to messages in one place.
"""

from __future__ import annotations

import errno
import os


class CloudexitError(Exception):
    """Base class: a condition the user can act on (exit code 1)."""

    exit_code = 1

    def __init__(self, message: str, hint: str | None = None) -> None:
        super().__init__(message)
        self.hint = hint

    @property
    def message(self) -> str:
        """The message without its hint."""
        return super().__str__()

    def __str__(self) -> str:
        text = self.message
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


class ObjectArchived(SourceError):
    """The object is in an archive storage class (GLACIER, DEEP_ARCHIVE...): it cannot be read
    until restored, which `migrate` does."""


class CustomerKeyRequired(SourceError):
    """The object is encrypted with a customer-provided key (SSE-C): the store serves it only to
    a request carrying that key, which cloudexit does not have. No retry helps."""


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


class FileSystemError(CloudexitError):
    """A file or folder the command reads or writes cannot be used: read-only file system, no
    permission, a file where a folder should be, disk full. Made from the OSError by
    `from_os_error`, in the CLI, so every command says it the same way."""

    @classmethod
    def from_os_error(cls, exc: OSError) -> "FileSystemError":
        where = exc.filename if exc.filename is not None else None
        what = exc.strerror or str(exc)
        hints = {
            errno.EROFS: "the file system is mounted read-only: choose a folder on a writable one",
            errno.EACCES: "no permission there: choose a folder you can write, or fix its owner or mode",
            errno.EPERM: "no permission there: choose a folder you can write, or fix its owner or mode",
            errno.ENOTDIR: "a part of the path is a file, not a folder: check the path",
            errno.EEXIST: "a file of that name is in the way: choose another name",
            errno.EISDIR: "that is a folder: give a file name",
            errno.ENOSPC: "the disk is full: free space or choose another disk",
            errno.EDQUOT: "the disk quota is used up: free space or choose another disk",
            errno.ENOENT: "check the path",
            errno.ENAMETOOLONG: "use a shorter path",
        }
        message = f"cannot use {os.fsdecode(where)}: {what}" if where is not None else what
        return cls(message, hint=hints.get(exc.errno or 0, "check the path and try again"))
