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


class StateError(CloudexitError):
    """The state database is missing, foreign or belongs to another migration."""


class Interrupted(CloudexitError):
    """The user interrupted the run; committed work is kept (exit code 130)."""

    exit_code = 130
