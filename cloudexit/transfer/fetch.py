"""One object fetched, verified and placed, in a worker process (`Fetcher`).

Bodies are read into one reusable buffer and fed to MD5 + SHA-256 (+ provider checksums) in C
(`core/checksums.py`), written with `os.write`, so the GIL is mostly released. A file counts only
once it verified, was fsynced and renamed into place; large objects go by parallel ranges
(`ranges.py`); many small ones at once by `multiget.py`, which ends in `finish_body` here.
"""

from __future__ import annotations

import errno
import http.client
import os
import random
import socket
import threading
import time
from typing import Any, Callable

from cloudexit.core.config import MigrateConfig
from cloudexit.core.checksums import CheckResult, Expectation, ObjectHasher, expectations, part_bounds, worth_computing
from cloudexit.dicom.scan import scan
from cloudexit.transfer.messages import Message
from cloudexit.s3.parts import RAISE_KINDS, learn_part_sizes
from cloudexit.s3.meter import Meter
from cloudexit.s3.client import DISK_ERRNOS, Counters, Credentials, Endpoint, FetchError, S3Reader, _short, disk_error
from cloudexit.transfer.rate import SharedRate
from cloudexit.transfer.tasks import Result, Task

HEADER_BYTES = 64 * 1024  # first bytes kept in memory for the DICOM check


class Fetcher:
    """Runs tasks in one process: download, verify, place. Thread-safe."""

    def __init__(self, endpoint: Endpoint, credentials: Credentials, rate: SharedRate | None,
                 stop: Any, root: str, attempts: int = 6, backoff_base: float = 0.5, backoff_max: float = 30.0,
                 buffer_size: int = 2**20, range_streams: int = 4, fsync: bool = True,
                 report: Callable[[Message], None] | None = None,
                 group_folder_sync: bool = False, meter: str | None = None) -> None:
        from cloudexit.stores.filesystem import Placer

        self.reader = S3Reader(endpoint, credentials)
        if meter:
            self.reader.meter = Meter(meter)
        self.rate = rate
        self.stop = stop
        self.attempts = attempts
        self.backoff_base, self.backoff_max = backoff_base, backoff_max
        self.buffer_size = buffer_size
        self.range_streams = range_streams
        self.placer = Placer(root, fsync=fsync)
        self.report = report or (lambda message: None)
        # True: `place` leaves the folder fsync to a FolderSync, which reports the result after
        # it (one fsync per folder for all the files that landed meanwhile).
        self.group_folder_sync = group_folder_sync
        self._local = threading.local()

    @classmethod
    def from_config(cls, config: MigrateConfig, endpoint: Endpoint, credentials: Credentials,
                    rate: SharedRate | None, stop: Any, root: str, **kwargs: Any) -> Fetcher:
        """A Fetcher with the retry, buffer and fsync settings of a run's frozen config."""
        return cls(endpoint, credentials, rate, stop, root, attempts=config.attempts,
                   backoff_base=config.backoff_base, backoff_max=config.backoff_max,
                   buffer_size=config.buffer_size, range_streams=config.range_streams,
                   fsync=config.fsync, **kwargs)

    def _buffer(self) -> memoryview:
        buf = getattr(self._local, "buf", None)
        if buf is None:
            buf = self._local.buf = memoryview(bytearray(self.buffer_size))
        return buf

    def _sleep(self, attempt: int) -> None:
        delay = random.uniform(0, min(self.backoff_max, self.backoff_base * 2 ** attempt))
        end = time.monotonic() + delay
        while time.monotonic() < end and not self.stop.is_set():
            time.sleep(min(0.1, end - time.monotonic()) if end > time.monotonic() else 0)

    def _quick_retry(self, failures: int, result: Result) -> bool:
        """After the `failures`-th failed connection of one fetch: retry once, quickly (bytes
        already on disk are kept); after that the engine judges whether the link is down."""
        if failures < 2 and not self.stop.is_set():
            result.retries += 1
            time.sleep(random.uniform(0.05, 0.3))
            return True
        return False

    # -- one task --------------------------------------------------------------------------------
    def run(self, task: Task, prior: Counters | None = None) -> Result:
        """Fetch, verify and place one object. `prior`: what an earlier attempt at it (in
        `multiget`) cost, counted in this result."""
        started = time.monotonic()
        result = Result(task.id, task.key, "failed", etag=task.etag)
        result.faults.extend(task.faults)  # link evidence: what the multiget loop met first
        if prior is not None:
            result.counters.add(prior)
            result.retries += 1
        self.reader.set_credentials(task.credentials)
        self.reader._local.ttfb = None  # this task's own answers only
        try:
            if self.stop.is_set():
                result.outcome = "cancelled"
                return result
            self.placer.prepare(task.final)
            if task.member is None and os.path.exists(task.final) and self._verify_local(task, result):
                return result
            attempt = connection_failures = 0
            while True:
                try:
                    if task.member is not None:  # a file inside a zip (transfer/zipmember.py)
                        from cloudexit.transfer.zipmember import fetch_member

                        fetch_member(self, task, result)
                    elif task.large:
                        self._fetch_large(task, result)
                    else:
                        self._fetch(task, result)
                    return result
                except FetchError as exc:
                    if exc.kind == "cancelled":
                        result.outcome = "cancelled"
                        return result
                    if len(result.faults) < 32:  # link evidence, retried errors included
                        result.faults.append((exc.kind, exc.detail))
                    changed_to = None
                    if exc.kind == "changed":
                        changed_to = self._new_version(task, result)
                        if changed_to is not None and changed_to.get("etag") == task.etag \
                                and changed_to.get("size") == task.size:
                            # The source still has the inventoried version: the 412 or the short
                            # Content-Length came from something on the way (a proxy, a cache).
                            exc = FetchError("transient", f"{exc.detail}; but the source still has "
                                             "the inventoried ETag and size: a transport fault", exc.status,
                                             exc.code, restart=exc.restart)
                    if exc.kind in ("transient", "corrupt") and attempt + 1 < self.attempts \
                            and not self.stop.is_set():
                        if exc.restart:
                            task.fresh, task.done_ranges = True, {}
                        attempt += 1
                        result.retries += 1
                        self._sleep(attempt)
                        continue
                    if exc.kind in ("unreachable", "cut"):
                        connection_failures += 1
                        if self._quick_retry(connection_failures, result):
                            continue
                        exc.kind = "unreachable"
                    if exc.kind == "changed":
                        result.changed_to = changed_to
                    result.error_kind, result.detail, result.restart = exc.kind, exc.detail, exc.restart
                    if exc.restart:
                        self.placer.discard(task.temp)
                    return result
        except OSError as exc:
            err = disk_error(exc, f"writing {exc.filename or task.final}")
            result.error_kind, result.detail, result.error_code = err.kind, err.detail, err.code
            if exc.errno not in DISK_ERRNOS:
                result.error_kind = "permanent"
            return result
        finally:
            result.elapsed = time.monotonic() - started
            result.ttfb = None if result.local else getattr(self.reader._local, "ttfb", None)

    def _new_version(self, task: Task, result: Result) -> dict[str, Any] | None:
        try:
            head = self.reader.head(task.key, result.counters)
        except FetchError as exc:
            return {"gone": True} if exc.kind == "gone" else None
        return {"etag": head.get("etag", "").strip('"'), "size": int(head.get("content-length", 0)),
                "last_modified": head.get("last-modified")}

    def _checks(self, task: Task, headers: dict[str, str], result: Result, can_ask: bool = True
                ) -> tuple[list[Expectation], list[int] | None]:
        """The checks that apply and, for multipart objects, the part boundaries."""
        provider = dict(task.provider)
        provider.update({k: v for k, v in headers.items()
                         if k.startswith(("x-amz-checksum-", "x-oss-hash-", "x-cos-hash-", "x-obs-hash-"))})
        checks = expectations(task.etag, provider, headers.get("x-amz-server-side-encryption")
                              or ("customer" if headers.get("x-amz-server-side-encryption-customer-algorithm") else None))
        if headers.get("x-amz-server-side-encryption") in ("aws:kms", "aws:kms:dsse"):
            result.not_checked.append("md5 (SSE-KMS: the ETag is not an MD5)")
        checks, _covered = worth_computing(checks)  # a provider CRC adds nothing to a verified MD5
        if not any(c.per_part for c in checks):
            return checks, None
        parts = max(c.parts for c in checks if c.per_part)
        if task.part_sizes and len(task.part_sizes) == parts:  # learned on an earlier attempt
            return checks, part_bounds(task.size, part_sizes=task.part_sizes)
        if not can_ask:  # a response body is being read on this connection: no HEADs now
            for c in [c for c in checks if c.per_part]:
                result.not_checked.append(f"{c.name} (composite checksum without a multipart ETag)")
            return [c for c in checks if not c.per_part], None
        try:
            first = self.reader.head(task.key, result.counters, part_number=1)  # no If-Match: see parts.py
            part_size = int(first.get("content-length", 0))
            bounds = part_bounds(task.size, part_size=part_size) if part_size else None
        except FetchError as exc:
            if exc.kind in RAISE_KINDS:
                raise
            bounds = None
        if bounds is None or len(bounds) - 1 != parts:
            # Parts of unequal size: ask each part's size (one HEAD per part).
            sizes = self._learn_parts(task, result, parts)
            bounds = part_bounds(task.size, part_sizes=sizes) if sizes else None
        if bounds is None or bounds[-1] != task.size:
            for c in [c for c in checks if c.per_part]:
                result.not_checked.append(f"{c.name} (the endpoint does not tell part sizes)")
            checks = [c for c in checks if not c.per_part]
        return checks, bounds

    def _learn_parts(self, task: Task, result: Result, parts: int) -> list[int] | None:
        sizes = learn_part_sizes(self.reader, task.key, task.size, parts, result.counters)
        if sizes:
            task.part_sizes = result.part_sizes = sizes
        return sizes

    def _unequal_parts(self, task: Task, result: Result, hasher: ObjectHasher, check: CheckResult,
                       fd: int) -> ObjectHasher | None:
        """A per-part check failed with part sizes guessed from part 1 (all equal but the last):
        ask every part's size; if they differ from the guess, hash the file again with them.
        None: nothing to learn (sizes known already, or the same as guessed, or not told)."""
        per_part = [c for c in hasher.checks if c.per_part]
        failed = {name for name, _expected, _got in check.failed}
        if task.part_sizes or not any(c.name in failed for c in per_part):
            return None
        sizes = self._learn_parts(task, result, max(c.parts for c in per_part))
        if not sizes or part_bounds(task.size, part_sizes=sizes) == hasher.bounds:
            return None
        again = ObjectHasher(task.size, hasher.checks, part_bounds(task.size, part_sizes=sizes))
        self._rehash(fd, task.size, again, bytearray())
        return again

    # -- small objects: one streaming GET ---------------------------------------------------------
    def _fetch(self, task: Task, result: Result) -> None:
        counters = result.counters
        offset = 0 if task.fresh else self.placer.partial_size(task.temp, task.size)
        checks: list[Expectation] | None = None
        bounds: list[int] | None = None
        if "-" in task.etag or offset:
            # Multipart (part sizes needed before hashing) or resumed (a ranged GET carries no
            # full-object checksums): ask HEAD first, on this thread's idle connection.
            info = self.reader.head(task.key, counters, etag=task.etag)
            if int(info.get("content-length", -1)) != task.size:
                raise FetchError("changed", f"HEAD {task.key!r}: size differs from the inventory")
            checks, bounds = self._checks(task, info, result)
        headers = {"if-match": f'"{task.etag}"', "x-amz-checksum-mode": "ENABLED"}
        if offset:
            headers["range"] = f"bytes={offset}-"
        resp = self.reader.request("GET", task.key, None, headers, counters)
        if resp.status not in (200, 206):
            if resp.status == 416 and offset:
                resp.read()
                raise FetchError("transient", "resume offset refused", restart=True)
            raise self.reader.fail(resp, f"GET {task.key!r}")
        if offset and resp.status != 206:
            offset = 0  # the server ignored the Range: take the whole object
        expected_len = task.size - offset
        length = resp.getheader("content-length")
        if length is not None and int(length) != expected_len:
            resp.close()
            self.reader.close()
            raise FetchError("changed" if not offset else "transient",
                             f"GET {task.key!r}: {length} bytes announced, {expected_len} expected",
                             restart=bool(offset))
        if checks is None:
            checks, bounds = self._checks(task, {k.lower(): v for k, v in resp.getheaders()}, result,
                                          can_ask=False)
        hasher = ObjectHasher(task.size, checks, bounds)
        head = bytearray()
        fd = self.placer.open_temp(task.temp, truncate=offset == 0)
        try:
            if offset:
                result.resumed_from = offset
                self._rehash(fd, offset, hasher, head)
                os.ftruncate(fd, offset)
                os.lseek(fd, offset, os.SEEK_SET)
            self._stream(resp, fd, hasher, head, expected_len, counters, task)
            self._finish(task, result, fd, hasher, bytes(head), resumed=offset > 0)
        finally:
            os.close(fd)

    def finish_body(self, task: Task, result: Result, body: memoryview,
                    headers: dict[str, str]) -> Callable[[], None]:
        """Verify a whole object already in memory (`multiget`'s path) and write its temp file:
        the checks of `_fetch`. Returns its placement (fsync, rename; closes the file), to run
        on any thread. Raises FetchError or OSError on any problem."""
        checks, bounds = self._checks(task, headers, result, can_ask=False)
        hasher = ObjectHasher(task.size, checks, bounds)
        hasher.update(body)
        fd = self.placer.open_temp(task.temp, truncate=True)
        try:
            written = os.write(fd, body)
            while written < len(body):
                written += os.write(fd, body[written:])
            target = self._judge(task, result, hasher, bytes(body[:HEADER_BYTES]))
        except BaseException:
            os.close(fd)
            raise

        def place() -> None:
            try:
                self._place(task, result, fd, target)
            finally:
                os.close(fd)

        return place

    def _rehash(self, fd: int, upto: int, hasher: ObjectHasher, head: bytearray) -> None:
        pos = 0
        while pos < upto:
            pos += self.hash_back(fd, pos, upto, hasher, head, "recorded")

    def hash_back(self, fd: int, pos: int, end: int, hasher: ObjectHasher, head: bytearray, what: str) -> int:
        """Read the file from `pos` (up to `end`, one buffer at most) into `hasher` and the
        first HEADER_BYTES into `head`; how many bytes were read."""
        buf = self._buffer()
        n = os.preadv(fd, [buf[:min(len(buf), end - pos)]], pos)
        if n <= 0:
            raise FetchError("transient", f"temp file shorter than {what}", restart=True)
        chunk = buf[:n]
        hasher.update(chunk)
        if len(head) < HEADER_BYTES:
            head += chunk[:HEADER_BYTES - len(head)]
        return n

    def _stream(self, resp: http.client.HTTPResponse, fd: int, hasher: ObjectHasher | None,
                head: bytearray, expected: int, counters: Counters, task: Task,
                offset: int | None = None, progress: Callable[[int], None] | None = None) -> None:
        """Body -> hasher + file (at `offset` with pwrite when given)."""
        buf = self._buffer()
        got = 0
        rate = self.rate
        try:
            while got < expected:
                if self.stop.is_set():
                    raise FetchError("cancelled", "stopped")
                n = resp.readinto(buf[:min(len(buf), expected - got)])
                if not n:
                    break
                self.reader.received(n, counters)
                chunk = buf[:n]
                if hasher is not None:
                    hasher.update(chunk)
                if len(head) < HEADER_BYTES:
                    head += chunk[:HEADER_BYTES - len(head)]
                if offset is None:
                    written = os.write(fd, chunk)
                    while written < n:
                        written += os.write(fd, chunk[written:])
                else:
                    written = os.pwrite(fd, chunk, offset + got)
                    while written < n:
                        written += os.pwrite(fd, chunk[written:], offset + got + written)
                got += n
                if progress is not None:
                    progress(got)
                if rate is not None:
                    rate.take(n, self.stop)  # after the write: a kill now leaves the bytes on disk
        except FetchError:
            self.reader.close()
            raise
        except OSError as exc:
            self.reader.close()
            if isinstance(exc, (socket.timeout, ConnectionError)) or exc.errno in (
                    errno.ECONNRESET, errno.EPIPE, errno.ETIMEDOUT, None):
                raise FetchError("cut", f"body cut after {got} of {expected} bytes: {_short(exc)}") from exc
            raise
        except http.client.HTTPException as exc:
            self.reader.close()
            raise FetchError("cut", f"body cut after {got} of {expected} bytes: {_short(exc)}") from exc
        if got < expected:
            self.reader.close()
            raise FetchError("cut", f"body cut after {got} of {expected} bytes")
        if not resp.isclosed():
            # Content-Length met: http.client marks the response done; drain defensively.
            resp.read()

    def _finish(self, task: Task, result: Result, fd: int, hasher: ObjectHasher, head: bytes,
                resumed: bool) -> None:
        """Verify everything, then fsync and rename into place."""
        self._place(task, result, fd, self._judge(task, result, hasher, head, fd))

    def _judge(self, task: Task, result: Result, hasher: ObjectHasher, head: bytes,
               fd: int | None = None) -> str:
        """Verify the bytes (FetchError "corrupt" if they are not the object's) and the DICOM
        header; return where the file goes: its final path, or quarantine. `fd`: the temp file,
        to hash again if the object's parts turn out to be of unequal sizes."""
        check = hasher.verify()
        if not check.ok and fd is not None:
            again = self._unequal_parts(task, result, hasher, check, fd)
            if again is not None:
                hasher, check = again, again.verify()
        if not check.ok:
            name, expected, got = check.failed[0]
            raise FetchError("corrupt", f"{name} mismatch: expected {expected}, got {got}",
                             restart=True)
        result.checks = list(check.passed)
        result.sha256 = hasher.sha256_hex()
        result.md5 = hasher.md5_hex()
        target = task.final
        if task.encoding and task.kind == "dicom":
            from cloudexit.dicom.containers import judge_decoded

            return judge_decoded(self, task, result)
        if task.kind == "dicom":
            problem = self._check_dicom(task, head, result)
            if problem:
                target = task.quarantine or self._mismatch_path(task.key)
                result.outcome, result.detail = "quarantined", problem
        elif task.kind == "unreadable":
            result.outcome = "quarantined"
        if result.outcome != "quarantined":
            result.outcome = "verified"
        return target

    def _place(self, task: Task, result: Result, fd: int, target: str) -> None:
        from cloudexit.stores.filesystem import PlacementConflict

        if target != task.final:
            self.placer.prepare(target)
        sync = not self.group_folder_sync
        try:
            result.replaced = self.placer.place(fd, task.temp, target, sync_folder=sync,
                                                sha256=result.sha256, replaceable=task.replaceable)
        except PlacementConflict as exc:
            # Another file (another migration's, or another key's on a destination that folds
            # case) holds this path: keep it, quarantine this copy beside the others.
            result.conflict, target = exc.path, self._conflict_path(exc.path, result.sha256 or "")
            self.placer.prepare(target)
            self.placer.place(fd, task.temp, target, sync_folder=sync, sha256=result.sha256)
            result.outcome = "quarantined"
        result.path = target
        result.mtime_ns = os.stat(target, follow_symlinks=False).st_mtime_ns
        if self.group_folder_sync:
            result.folder = os.path.dirname(target)

    def _conflict_path(self, taken: str, sha256: str) -> str:
        from cloudexit.stores.filesystem import ARCHIVE_CONFLICTS

        rel = os.path.relpath(taken, self.placer.base)
        stem, suffix = os.path.splitext(os.path.basename(rel))
        return os.path.join(self.placer.base, ARCHIVE_CONFLICTS, os.path.dirname(rel),
                            f"{stem}~{sha256[:16]}{suffix}")

    def _mismatch_path(self, key: str) -> str:
        from cloudexit.stores.filesystem import MISMATCH, safe_key_path

        return os.path.join(self.placer.base, MISMATCH, safe_key_path(key))

    def _check_dicom(self, task: Task, head: bytes, result: Result, path: str | None = None,
                     size: int | None = None) -> str | None:
        """None if the file is DICOM with the inventoried UIDs; else what is wrong."""
        found = scan(head, task.size if size is None else size)
        if found.need_more or not found.decided:
            from cloudexit.dicom.header import parse_file

            header = parse_file(path or task.temp)
            kind, uids = header.kind, (header.sop_uid, header.study_uid, header.series_uid)
            reason = header.reason
        else:
            kind, uids, reason = found.kind, (found.sop_uid, found.study_uid, found.series_uid), found.reason
        if kind != "dicom":
            return f"downloaded file is not usable DICOM: {reason}"
        for name, got in zip(("sop_uid", "study_uid", "series_uid"), uids):
            want = task.expect.get(name)
            if want and got != want:
                label = {"sop_uid": "SOP Instance UID", "study_uid": "Study Instance UID",
                         "series_uid": "Series Instance UID"}[name]
                return f"{label} in the file ({got}) differs from the inventory ({want})"
        result.checks.append("dicom-sop-uid")
        return None

    def _verify_local(self, task: Task, result: Result) -> bool:
        """A file already at the final path (a crash after rename, before the DB commit):
        accept it if it verifies, without fetching it again."""
        try:
            if os.path.getsize(task.final) != task.size:
                return False
            checks, bounds = self._checks(task, {}, result)
        except (OSError, FetchError):
            return False
        if not any(c.algorithm in ("md5", "sha256", "crc32", "crc32c", "crc64nvme", "crc64ecma", "sha1")
                   for c in checks):
            return False  # nothing to compare with: fetch it
        hasher = ObjectHasher(task.size, checks, bounds)
        head = bytearray()
        fd = os.open(task.final, os.O_RDONLY | os.O_NOFOLLOW)
        try:
            self._rehash(fd, task.size, hasher, head)
            if self.placer.fsync:
                os.fsync(fd)  # a kill -9 after the rename may have left it in the page cache only
            check = hasher.verify()
            if not check.ok:
                again = self._unequal_parts(task, result, hasher, check, fd)
                if again is not None:
                    hasher, check = again, again.verify()
        except FetchError:
            return False
        finally:
            os.close(fd)
        if not check.ok:
            return False
        result.checks = []
        if task.kind == "dicom" and self._check_dicom(task, bytes(head), result, path=task.final):
            return False
        check.passed.extend(result.checks)
        result.outcome = "quarantined" if task.kind == "unreadable" else "verified"
        result.checks, result.sha256, result.md5 = check.passed, hasher.sha256_hex(), hasher.md5_hex()
        result.path, result.local = task.final, True
        result.mtime_ns = os.stat(task.final, follow_symlinks=False).st_mtime_ns
        self.placer.discard(task.temp)
        if self.group_folder_sync:
            result.folder = os.path.dirname(task.final)
        else:
            self.placer.sync_folders([os.path.dirname(task.final)])
        return True

    def _fetch_large(self, task: Task, result: Result) -> None:
        from cloudexit.transfer.ranges import fetch_large

        fetch_large(self, task, result)
