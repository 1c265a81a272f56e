"""What the engine does with a worker's result: the decision only (no SQL, no I/O, no clock).

`decide(result, context)` turns one `Result` and what the engine knows at that moment (the
object's strikes, the streak of unanswered tasks, how long since the endpoint last answered...)
into an `Action`; the engine (migrate.py) carries it out: rows, counters, log, retries. Keeping
the rules here lets every fault kind be tested in microseconds (tests/test_policy.py).

Fault kinds come from the worker (`FetchError.kind`, s3/client.py): unreachable, tls,
credentials, disk, gone, archived, changed, transient/corrupt/denied/permanent/sse-c (retried in
the worker already; here they fail the object).
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from cloudexit.core.states import TransferState as T
from cloudexit.transfer.tasks import Result

LINK_UP_WINDOW = 2.0  # seconds: an answer this recent means the link is up, the object is at fault
CHANGES_MAX = 3  # an object that changed this often during the migration fails
READ_ONLY_CODES = ("EROFS", "EACCES", "EPERM")  # a disk error that free space will not fix


class Do(StrEnum):
    DONE = "done"  # landed: verified or quarantined (`state`); `conflict`: kept beside another file
    REQUEUE = "requeue"  # cancelled by a stop: queued again, no attempt counted
    RETRY = "retry"  # run again in this run after `delay` seconds
    FAIL = "fail"  # the object ends as `state` (failed | missing) with `reason`
    STOP = "stop"  # queued again, and the run stops (`stop`: credentials | read-only | full)
    RESTORE = "restore"  # needs a restore first: back to `restoring`
    CHANGED = "changed"  # a new version at the source (`new`): read its header again


@dataclass(frozen=True)
class Context:
    """What the engine knows when a result arrives."""

    attempts: int  # config.attempts: strikes that fail an object
    capacity: int  # tasks the executor works on at once
    strikes: int = 0  # the object's unanswered tries while the link was up, so far
    streak: int = 0  # unanswered results in a row, before this one
    since_answer: float = 0.0  # seconds since the endpoint last answered a task
    changes: int = 0  # times the object changed at the source during the migration (DB row)
    renewed_credentials: bool = False  # credentials: the source offers new ones (engine asked)


@dataclass(frozen=True)
class Action:
    do: Do
    state: T | None = None
    reason: str | None = None
    delay: float = 0.0
    strike: bool = False  # count one strike against the object
    retry_counted: bool = False  # count a retry in the run's figures
    link_down: bool = False  # pause dispatch and probe the endpoint
    why: str | None = None  # with link_down: what the user may have to do
    renew: bool = False  # retry with the renewed credentials
    stop: str | None = None
    conflict: bool = False
    answered: bool = False  # the endpoint answered: link up, the streak ends
    streak: int = 0  # unanswered results in a row, this one included
    new: dict[str, Any] | None = None  # CHANGED: etag, size, last_modified of the new version


def decide(r: Result, ctx: Context) -> Action:
    """The action for result `r` (see `Do`)."""
    if r.outcome in (T.VERIFIED, T.QUARANTINED):
        return Action(Do.DONE, state=T(r.outcome), reason=r.detail, conflict=bool(r.conflict), answered=True)
    if r.outcome == "cancelled":
        return Action(Do.REQUEUE, streak=ctx.streak)
    kind = r.error_kind or "permanent"
    answered = kind not in ("unreachable", "tls")
    streak = ctx.streak if not answered else 0
    if kind == "unreachable":
        # No answer. If others get answers, this object has a problem (strike); if nobody
        # does, the link is down: pause and probe (strikes do not count then).
        streak += 1
        link_up = ctx.since_answer < LINK_UP_WINDOW
        if ctx.strikes + link_up >= ctx.attempts:
            return Action(Do.FAIL, state=T.FAILED, reason=r.detail or "connection lost", strike=link_up,
                          streak=streak)
        link_down = streak >= max(3, min(ctx.capacity, 6)) and not link_up
        return Action(Do.RETRY, delay=1.0, strike=link_up, retry_counted=True, link_down=link_down,
                      streak=streak)
    if kind == "credentials":
        if ctx.renewed_credentials and ctx.strikes < 2:
            return Action(Do.RETRY, delay=0.0, strike=True, renew=True, answered=True)
        return Action(Do.STOP, stop="credentials", reason=r.detail, answered=True)
    if kind == "tls":
        # The certificate was trusted when the run started (its first requests passed): a
        # firewall that blocks the domain with its own certificate, or a middlebox that
        # started to inspect TLS. Not this object's fault: wait and probe as for an outage
        # (a block is lifted by itself), and say what to do if it is not.
        return Action(Do.RETRY, delay=1.0, link_down=True, streak=streak,
                      why=f"{r.detail}: if the network now inspects TLS, set AWS_CA_BUNDLE to its CA, "
                          "stop and run: cloudexit migrate --resume")
    if kind == "disk":
        return Action(Do.STOP, stop="read-only" if r.error_code in READ_ONLY_CODES else "full",
                      reason=r.detail, answered=True)
    if kind == "gone":
        return Action(Do.FAIL, state=T.MISSING, reason=r.detail or "deleted at the source", answered=True)
    if kind == "archived":
        return Action(Do.RESTORE, answered=True)
    if kind == "changed":
        new = r.changed_to
        if new and new.get("gone"):
            return Action(Do.FAIL, state=T.MISSING, reason="deleted at the source since inventory", answered=True)
        if not new or ctx.changes >= CHANGES_MAX:
            return Action(Do.FAIL, state=T.FAILED, reason="the object keeps changing at the source", answered=True)
        return Action(Do.CHANGED, new=new, answered=True)
    return Action(Do.FAIL, state=T.FAILED, reason=r.detail or kind, answered=True)
