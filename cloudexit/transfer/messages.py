"""What comes back from an executor to the engine: typed, picklable messages.

Workers (local processes or cluster workers) send these; the engine is their only reader and
alone turns them into rows of the state DB. A result counts only once the engine has committed
it, so a message that is lost (a worker killed) loses no data: the object is fetched again.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from cloudexit.transfer.tasks import Result

# One object's outcome (verified, quarantined, failed with a classified error, cancelled), with
# its sizes, hashes and checks: `transfer.tasks.Result`, built up by the worker as it goes, read
# only once sent.
TaskResult = Result


@dataclass(frozen=True)
class ResultGroup:
    """Results whose files' folders were fsynced together (one fsync per folder for all)."""

    results: list[Result] = field(default_factory=list)


@dataclass(frozen=True)
class RangeDone:
    """A large object's range `index` has `done` bytes on disk, fsynced (resume continues there)."""

    task_id: int
    index: int
    done: int


@dataclass(frozen=True)
class WorkerLost:
    """A worker ended while it held `task_ids`: the engine runs them again (an executor that
    cannot tell which tasks a lost worker held reports it by `Executor.health` instead)."""

    worker: str
    task_ids: list[int]
    reason: str


Message = Result | ResultGroup | RangeDone | WorkerLost


def results_of(message: Message) -> list[Result]:
    """The results a message carries (none for a range or a lost worker)."""
    if isinstance(message, Result):
        return [message]
    if isinstance(message, ResultGroup):
        return list(message.results)
    return []
