"""Large objects: parallel ranged GETs into one temp file, hashed in order as they land.

How far each range got is fsynced and reported (`RangeDone`, transfer/messages.py) every
`CHECKPOINT_SECONDS`, so a resume after a kill continues mid-range.
"""

from __future__ import annotations

import os
import threading
import time
from typing import TYPE_CHECKING

from cloudexit.core.checksums import ObjectHasher
from cloudexit.transfer.messages import RangeDone
from cloudexit.s3.client import FetchError, disk_error
from cloudexit.transfer.fetch import HEADER_BYTES
from cloudexit.transfer.tasks import Result, Task

if TYPE_CHECKING:
    from cloudexit.transfer.fetch import Fetcher

# Large objects: how often the ranges' progress is fsynced and reported for resume. A kill loses
# at most this much (plus the engine's commit interval) of each object's download.
CHECKPOINT_SECONDS = 0.5


def fetch_large(f: Fetcher, task: Task, result: Result) -> None:
    """Download `task` (large) by ranges with `f`'s reader and placer; raise FetchError."""
    counters = result.counters
    info = f.reader.head(task.key, counters, etag=task.etag)
    if int(info.get("content-length", -1)) != task.size:
        raise FetchError("changed", f"HEAD {task.key!r}: size differs from the inventory")
    checks, bounds = f._checks(task, info, result)
    fresh = task.fresh or not os.path.exists(task.temp)
    fd = f.placer.open_temp(task.temp, truncate=fresh, size=task.size)
    ranges = [(s, min(s + task.range_size, task.size)) for s in range(0, task.size, task.range_size)]
    done = {} if fresh else dict(task.done_ranges)
    written = [min(done.get(i, 0), r[1] - r[0]) for i, r in enumerate(ranges)]
    failure: list[FetchError] = []
    cond = threading.Condition()
    result.resumed_from = sum(written)

    def fetch_range(index: int) -> None:
        start, end = ranges[index]
        tries = cuts = 0
        while written[index] < end - start:
            if failure or f.stop.is_set():
                return
            pos = start + written[index]
            try:
                resp = f.reader.request("GET", task.key, None, {
                    "if-match": f'"{task.etag}"', "range": f"bytes={pos}-{end - 1}"}, counters)
                if resp.status != 206:
                    raise f.reader.fail(resp, f"GET {task.key!r} bytes {pos}-{end - 1}")

                def moved(n: int, base: int = written[index]) -> None:
                    with cond:
                        written[index] = base + n
                        cond.notify_all()

                f._stream(resp, fd, None, bytearray(HEADER_BYTES), end - pos, counters, task,
                             offset=pos, progress=moved)
            except FetchError as exc:
                if exc.kind in ("unreachable", "cut"):
                    cuts += 1
                    if f._quick_retry(cuts, result):
                        continue
                    exc.kind = "unreachable"
                elif exc.kind == "transient" and tries + 1 < f.attempts and not f.stop.is_set():
                    tries += 1
                    result.retries += 1
                    f._sleep(tries)
                    continue
                with cond:
                    failure.append(exc)
                    cond.notify_all()
                return
            except OSError as exc:
                with cond:
                    failure.append(disk_error(exc, f"writing {task.temp}"))
                    cond.notify_all()
                return
        try:
            os.fdatasync(fd)  # a whole range: recorded at once, not at the next checkpoint
        except OSError as exc:
            with cond:
                failure.append(disk_error(exc, f"writing {task.temp}"))
                cond.notify_all()
            return
        synced_to(index, end - start)

    threads: list[threading.Thread] = []
    synced = list(written)
    sync_lock = threading.Lock()

    def checkpoint() -> None:
        """How far each range got, for a resume that continues mid-range: fsync the temp
        file first, so what the engine records is on disk. One fdatasync covers every range,
        and the streams never wait for it (they only pwrite)."""
        with cond:
            now_written = list(written)
        os.fdatasync(fd)
        for i, n in enumerate(now_written):
            synced_to(i, n)

    def synced_to(index: int, n: int) -> None:
        with sync_lock:
            if n > synced[index]:
                synced[index] = task.done_ranges[index] = n  # a retry in this process continues too
                f.report(RangeDone(task.id, index, n))

    pending = [i for i in range(len(ranges)) if written[i] < ranges[i][1] - ranges[i][0]]
    lock = threading.Lock()

    def stream_worker() -> None:
        while True:
            with lock:
                if not pending or failure:
                    return
                index = pending.pop(0)
            fetch_range(index)

    for _ in range(min(f.range_streams, len(pending))):
        t = threading.Thread(target=stream_worker, daemon=True)
        t.start()
        threads.append(t)
    # Meanwhile: hash the bytes in order as they land (read back from the page cache).
    hasher = ObjectHasher(task.size, checks, bounds)
    head = bytearray()
    pos = 0
    next_checkpoint = time.monotonic() + CHECKPOINT_SECONDS
    try:
        while pos < task.size:
            if time.monotonic() >= next_checkpoint:
                checkpoint()
                next_checkpoint = time.monotonic() + CHECKPOINT_SECONDS
            index = pos // task.range_size
            with cond:
                while True:
                    available = ranges[index][0] + written[index]
                    if available > pos or failure or f.stop.is_set():
                        break
                    cond.wait(0.5)
            if failure:
                raise failure[0]
            if f.stop.is_set():
                raise FetchError("cancelled", "stopped")
            pos += f.hash_back(fd, pos, available, hasher, head, "written")
    except FetchError as exc:
        with cond:
            failure.append(exc)
            cond.notify_all()
        for t in threads:
            t.join()
        if not exc.restart and exc.kind != "corrupt":
            try:
                checkpoint()  # keep what arrived: the next attempt or run continues from there
            except OSError:
                pass
        os.close(fd)
        if exc.restart or exc.kind == "corrupt":
            raise
        raise exc
    for t in threads:
        t.join()
    try:
        f._finish(task, result, fd, hasher, bytes(head), resumed=bool(done))
    finally:
        os.close(fd)
