"""One object's DICOM header, read where it lies: the inventory's header reads.

`HeaderReader.read` does a ranged GET (If-Match) of the object's first bytes, grown until the
header is whole, and classifies it (a zipped study: its directory and members' headers). It runs
in the inventory's threads (`LocalReads`) or on dask workers (`inventory --cluster`,
cloudexit/cluster/headers.py), so both give the same `HeaderResult`. A result carries the
header as read, Patient ID included: only the inventory (the coordinator) hashes it, with the
patient key that never leaves that machine.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

from cloudexit.core.errors import (CloudexitError, CredentialsError, CustomerKeyRequired, EndpointUnreachable,
                                   ObjectArchived)
from cloudexit.dicom.containers import ZIP, classify_object
from cloudexit.dicom.header import Header
from cloudexit.dicom.zipped import Member, inspect_zip
from cloudexit.s3.source import ObjectChanged, ObjectGone

if TYPE_CHECKING:
    from cloudexit.s3.lean import LeanS3

Item = tuple[str, int, str]  # key, size, ETag of an object to read


@dataclass
class HeaderResult:
    key: str
    etag: str
    header: Header | None = None
    checksums: dict[str, str] = field(default_factory=dict)
    bytes_read: int = 0
    requests: int = 0
    gone: bool = False
    changed_to: tuple[str, int, str] | None = None  # new (etag, size, last_modified)
    error: str | None = None
    unreadable: str | None = None  # why no retry reads it: archived | customer-key
    ttfb: float | None = None  # link evidence: seconds to the (small) ranged GET's answer
    members: list[tuple[Member, Header]] | None = None  # zipped study (cloudexit/dicom/zipped.py)


class HeaderReader:
    """Reads headers over one `LeanS3` (thread-safe: a connection per thread). Credentials and
    endpoint errors are raised (nothing else can be read either); the others are the result's."""

    def __init__(self, lean: LeanS3, header_bytes: int, max_header_bytes: int,
                 stop: threading.Event | None = None) -> None:
        self.lean = lean
        self.header_bytes, self.max_header_bytes = header_bytes, max_header_bytes
        self.stop = stop or threading.Event()

    def read(self, key: str, size: int, etag: str) -> HeaderResult:
        result = HeaderResult(key, etag)
        if self.stop.is_set():
            result.error = "stopped"
            return result
        if size == 0:
            result.header = classify_object(key, b"", 0)
            return result
        length = min(self.header_bytes, size)
        try:
            while True:
                asked = time.monotonic()
                read = self.lean.read_range(key, 0, length - 1, etag)
                result.ttfb = time.monotonic() - asked  # link evidence
                result.requests += 1
                result.bytes_read += len(read.data)
                result.checksums = read.checksums
                header = classify_object(key, read.data, read.size)
                if header.encoding == ZIP:  # zipped study: its directory, then its members
                    return self._read_zip(result, key, etag, read.size, read.data)
                if not header.need_more or length >= size or length >= self.max_header_bytes:
                    if header.need_more:
                        header.reason = (header.reason or "") + f" (gave up after {length} bytes)"
                    result.header = header
                    return result
                length = min(length * 4, size, self.max_header_bytes)
        except ObjectChanged:  # its new version, for the inventory to record and read again
            return self._changed(result, key)
        except ObjectGone:
            result.gone = True
        except (ObjectArchived, CustomerKeyRequired) as exc:
            result.error = str(exc)
            result.unreadable = "archived" if isinstance(exc, ObjectArchived) else "customer-key"
        except (CredentialsError, EndpointUnreachable):
            raise
        except CloudexitError as exc:
            result.error = str(exc)
        return result

    def _changed(self, result: HeaderResult, key: str) -> HeaderResult:
        result.requests += 1
        try:
            head = self.lean.head(key)
        except ObjectGone:  # deleted meanwhile
            result.gone = True
            return result
        except (CredentialsError, EndpointUnreachable):
            raise
        except CloudexitError as exc:
            result.error = str(exc)
            return result
        result.changed_to = (head.get("etag", "").strip('"'), int(head.get("content-length", 0)),
                             head.get("last-modified", ""))
        return result

    def _read_zip(self, result: HeaderResult, key: str, etag: str, size: int, first: bytes) -> HeaderResult:
        lean = self.lean
        found = inspect_zip(lambda a, b: lean.read_range(key, a, b - 1, etag).data, size, first,
                            self.header_bytes, self.max_header_bytes)
        result.header, result.members = found.header, found.members
        result.requests += found.requests
        result.bytes_read += found.bytes
        return result


class Reads(Protocol):
    """Where the inventory's header reads run: `LocalReads` (threads here) or the cluster's
    (cloudexit/cluster/headers.py). Called from the inventory's one thread only."""

    capacity: int  # objects that may be in flight at once

    def busy(self, key: str) -> bool: ...

    def pending(self) -> int: ...

    def submit(self, items: list[Item]) -> None: ...

    def finished(self) -> list[HeaderResult]:
        """Results ready to commit (raises what stops the round: credentials, endpoint)."""
        ...

    def close(self) -> None: ...


class LocalReads:
    """Header reads on a pool of threads of this process."""

    def __init__(self, read: Callable[[str, int, str], HeaderResult], threads: int,
                 wake: Callable[[], None]) -> None:
        self.read, self.wake = read, wake
        self.pool = ThreadPoolExecutor(threads, thread_name_prefix="header")
        self.capacity = threads * 4
        self.in_flight: dict[str, Future[HeaderResult]] = {}
        # The inventory is woken when a quarter of the reads in flight are done, not at every
        # one: a turn of its loop costs a few queries, and a fixed 50 ms poll capped reads at
        # ~1,300/s.
        self.wake_every = max(1, self.capacity // 4)
        self.done = 0
        self.lock = threading.Lock()

    def busy(self, key: str) -> bool:
        return key in self.in_flight

    def pending(self) -> int:
        return len(self.in_flight)

    def submit(self, items: list[Item]) -> None:
        for key, size, etag in items:
            self.in_flight[key] = future = self.pool.submit(self.read, key, size, etag)
            future.add_done_callback(self._finished)

    def _finished(self, _future: Future[HeaderResult]) -> None:
        with self.lock:
            self.done += 1
            if self.done >= self.wake_every:
                self.done = 0
                self.wake()

    def finished(self) -> list[HeaderResult]:
        return [self.in_flight.pop(k).result() for k, f in list(self.in_flight.items()) if f.done()]

    def close(self) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)
