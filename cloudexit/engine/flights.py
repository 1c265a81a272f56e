"""Tasks in flight: handed to the executor, result not committed yet; and those waiting to be
retried in this run. Task ids are new for every attempt, so a late result of an earlier attempt
is never taken for the current one."""

from __future__ import annotations

import heapq
import json
import random
import sqlite3
import time
from dataclasses import dataclass

from cloudexit.core.config import MigrateConfig
from cloudexit.s3.parts import recorded_sizes
from cloudexit.state import members
from cloudexit.stores.filesystem import FilesystemStore
from cloudexit.s3.client import Credentials
from cloudexit.transfer.tasks import Task


@dataclass
class Flight:
    """An object handed to the executor, until its result is committed."""

    seq: int
    key: str
    etag: str
    size: int
    kind: str
    path: str
    task: Task
    attempts: int = 0
    strikes: int = 0  # unreachable answers while the link was judged up


class Flights(dict[int, Flight]):
    """Flights by task id, and the retry queue (due time, id, flight)."""

    def __init__(self) -> None:
        super().__init__()
        self.retries: list[tuple[float, int, Flight]] = []
        self._ids = iter(range(1, 2**62))

    def new_id(self) -> int:
        return next(self._ids)

    def retry(self, flight: Flight, delay: float) -> None:
        """Run `flight` again after about `delay` seconds (jittered), under a new task id."""
        due = time.monotonic() + delay * random.uniform(0.5, 1.5)
        flight.task.id = self.new_id()
        heapq.heappush(self.retries, (due, flight.task.id, flight))

    def due(self, limit: int) -> list[Flight]:
        """Retries whose time has come, up to `limit`."""
        picked: list[Flight] = []
        clock = time.monotonic()
        while self.retries and self.retries[0][0] <= clock and len(picked) < limit:
            picked.append(heapq.heappop(self.retries)[2])
        return picked

    def retry_all_now(self) -> None:
        """The link is back: what waits to be retried goes now."""
        clock = time.monotonic()
        self.retries = [(clock, i, f) for _, i, f in self.retries]
        heapq.heapify(self.retries)

    def seconds_to_next(self) -> float:
        return max(0.0, self.retries[0][0] - time.monotonic()) if self.retries else 0.0

    def keys_unfinished(self) -> list[str]:
        """Keys of every flight and waiting retry (to queue again at a stop)."""
        return [f.key for f in self.values()] + [f.key for _, _, f in self.retries]

    def clear(self) -> None:
        super().clear()
        self.retries.clear()


def flight_for(r: sqlite3.Row, task_id: int, store: FilesystemStore, config: MigrateConfig,
               credentials: Credentials, range_size: int | None, done_ranges: dict[int, int]) -> Flight:
    """A queued row (state/transfers.py `queued_after`) made a task for the executor."""
    final = store.absolute(r["path"])
    task = Task(
        id=task_id, key=r["key"], etag=r["etag"], size=r["size"], kind=r["kind"],
        final=final, temp=store.temp_beside(final, r["key"], r["etag"]),
        quarantine=None,  # the worker derives it (store.mismatch_path) only when needed
        expect={"sop_uid": r["sop_uid"], "study_uid": r["study_uid"], "series_uid": r["series_uid"]},
        provider=json.loads(r["checksums"]) if r["checksums"] else {},
        credentials=credentials, large=r["size"] >= config.large_object,
        range_size=range_size or config.range_size, done_ranges=done_ranges, replaceable=r["mtime_ns"],
        part_sizes=recorded_sizes(r["part_sizes"], r["etag"], r["size"]),
        encoding=r["encoding"] if r["kind"] == "dicom" and not r["member"] else None,
        member=members.task_member(r))  # a file inside a zip (transfer/zipmember.py)
    return Flight(r["seq"], r["key"], r["etag"], r["size"], r["kind"], r["path"], task, attempts=r["attempts"] + 1)
