"""The states and kinds the state DB records, as `StrEnum`s: each member IS its DB string, so a
member compares equal to the column's text and binds as a query parameter unchanged (no schema
change). The groups below are the only lists of states: code asks "is it GOOD", not "is it one
of these four strings" (three overlapping hand-written lists drifted before).
"""

from __future__ import annotations

from collections.abc import Iterable
from enum import StrEnum


class TransferState(StrEnum):
    """`transfers.state`: one object at one destination (an archive folder or a PACS)."""

    QUEUED = "queued"
    FETCHING = "fetching"
    INSPECT = "inspect"  # the source changed under the copy: looked at again
    RESTORING = "restoring"  # waiting for an archive-class restore
    VERIFIED = "verified"  # in an archive folder, checked against the source
    DUPLICATE = "duplicate"  # the same SOP Instance is kept under another key
    STORED = "stored"  # a PACS accepted it
    WARNING = "warning"  # a PACS accepted it with a warning status
    QUARANTINED = "quarantined"  # damaged or unreadable: kept aside for a person
    CONFLICT = "conflict"  # same SOP Instance UID, other content: kept aside for a person
    FAILED = "failed"
    MISSING = "missing"  # gone from the source before it was copied
    SKIPPED = "skipped"  # left out by choice (filters)


class ObjectStatus(StrEnum):
    """`objects.status`: at the source or not, as the last inventory round saw it."""

    PRESENT = "present"
    DELETED = "deleted"


class ObjectKind(StrEnum):
    """`objects.kind`."""

    PENDING = "pending"  # header not read yet
    DICOM = "dicom"
    OTHER = "other"
    UNREADABLE = "unreadable"


class RunStatus(StrEnum):
    """`migration_runs.status`."""

    RUNNING = "running"
    COMPLETE = "complete"
    PARTIAL = "partial"
    INTERRUPTED = "interrupted"
    STOPPED = "stopped"


class VerifyStatus(StrEnum):
    """`verify_runs.status`."""

    RUNNING = "running"
    PASSED = "passed"
    FAILED = "failed"
    ERROR = "error"


class StudyStatus(StrEnum):
    """`verify_studies.status`: a study's counts at a PACS against the inventory."""

    OK = "ok"
    MISSING = "missing"
    MISMATCH = "mismatch"


class DecommissionMode(StrEnum):
    """`decommission_runs.mode`."""

    DRY_RUN = "dry-run"
    EXECUTE = "execute"


class DecommissionStatus(StrEnum):
    """`decommission_runs.status`."""

    RUNNING = "running"
    PLANNED = "planned"  # a dry run
    COMPLETE = "complete"
    PARTIAL = "partial"
    REFUSED = "refused"


class DeletionOutcome(StrEnum):
    """`deletions.outcome`: the store's answer for one object of a DeleteObjects batch."""

    DELETED = "deleted"
    DELETE_MARKER = "delete-marker"
    FAILED = "failed"


T = TransferState
# A checked copy is at the destination (a duplicate: the canonical copy of its SOP Instance is).
GOOD = frozenset({T.VERIFIED, T.DUPLICATE, T.STORED, T.WARNING})
# A copy a duplicate may point to: a copy of its own, checked.
CANONICAL = GOOD - {T.DUPLICATE}
# A copy is kept aside and a person decides.
REVIEW = frozenset({T.QUARANTINED, T.CONFLICT})
# A copy of some version is at the destination (good, or kept aside).
HELD = GOOD | REVIEW
# Work not finished yet.
WAITING = frozenset({T.QUEUED, T.FETCHING, T.INSPECT, T.RESTORING})
# Copied from the source (bytes downloaded for it), whatever came of the copy.
COPIED = frozenset({T.VERIFIED, T.DUPLICATE, T.QUARANTINED})
# Nothing more to do for the migration's progress figures (archive runs).
DONE = frozenset({T.VERIFIED, T.DUPLICATE, T.QUARANTINED, T.SKIPPED})
# A PACS delivery that is done: the PACS holds the instance (or an identical one under another key).
DELIVERED = frozenset({T.STORED, T.WARNING, T.DUPLICATE})
# No more work for the delta: the object is at the destination or the engine decided about it.
HANDLED = HELD | {T.SKIPPED}
# Listed as problems (status, study groups).
PROBLEMS = frozenset({T.FAILED, T.MISSING, T.QUARANTINED})
# Verify runs that finished (an `error` run checked nothing).
VERIFY_FINISHED = frozenset({VerifyStatus.PASSED, VerifyStatus.FAILED})


def ordered(states: Iterable[StrEnum]) -> list[StrEnum]:
    """`states` in their enum's declaration order (stable SQL text and parameter order)."""
    members = list(states)
    if not members:
        return []
    order = list(type(members[0]))
    return sorted(set(members), key=order.index)


def sql_in(states: Iterable[StrEnum]) -> str:
    """A SQL list literal, `('verified', 'duplicate')`: the strings are ours, never user input."""
    return "(" + ", ".join(f"'{s.value}'" for s in ordered(states)) + ")"


# Destinations: an archive folder is `file:///abs/path`; these are PACS (DICOM objects only).
PACS_PREFIXES = ("dicom://", "dicomweb+http://", "dicomweb+https://")


def is_pacs(dest: str) -> bool:
    """A PACS destination (it takes DICOM objects only; an archive folder takes every object)."""
    return dest.startswith(PACS_PREFIXES)
