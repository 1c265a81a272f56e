"""What the engine asks of a worker (`Task`) and what comes back (`Result`): plain picklable
dataclasses, the same for every executor (engine/executor.py)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from cloudexit.s3.client import Counters, Credentials


@dataclass
class Task:
    """One object to fetch, verify and place (built by the engine, run by a worker)."""

    id: int
    key: str
    etag: str
    size: int
    kind: str  # dicom | other | unreadable
    final: str  # absolute final path
    temp: str  # absolute temp path beside it
    quarantine: str | None  # where a DICOM file that does not match its inventory goes
    expect: dict[str, str | None]  # sop_uid, study_uid, series_uid from the inventory
    provider: dict[str, str]  # checksum headers recorded by the inventory
    credentials: Credentials
    large: bool = False
    range_size: int = 16 * 2**20
    done_ranges: dict[int, int] = field(default_factory=dict)  # range -> bytes on disk and fsynced
    part_sizes: list[int] | None = None  # of a multipart object, learned from the source (parts.py)
    fresh: bool = False  # discard any temp file (a resumed one failed verification)
    replaceable: int | None = None  # mtime_ns of this migration's own earlier file at `final`
    encoding: str | None = None  # envelope to decode after the raw checks (cloudexit.containers)
    faults: list[tuple[str, str]] = field(default_factory=list)  # link evidence: what multiget met
    member: dict[str, Any] | None = None  # zipped study: this member (transfer/zipmember.py)


@dataclass
class Result:
    id: int
    key: str
    outcome: str  # verified | quarantined | failed | cancelled
    error_kind: str | None = None
    detail: str | None = None
    error_code: str | None = None  # errno name of a disk error (ENOSPC, EROFS, EACCES...)
    path: str | None = None  # where the file landed (absolute)
    sha256: str | None = None
    md5: str | None = None
    checks: list[str] = field(default_factory=list)
    not_checked: list[str] = field(default_factory=list)
    counters: Counters = field(default_factory=Counters)
    retries: int = 0
    resumed_from: int = 0  # bytes of a temp file reused
    local: bool = False  # verified from a file already at its final path: no GET
    replaced: bool = False  # a different file at the final path was replaced
    etag: str | None = None
    changed_to: dict[str, Any] | None = None  # 412: the object's new ETag/size (from HEAD)
    restart: bool = False
    elapsed: float = 0.0
    folder: str | None = None  # the file's folder still to fsync (worker side only)
    mtime_ns: int | None = None  # of the file as placed (verify compares it, with the size)
    conflict: str | None = None  # the path that held other bytes: this copy went to quarantine
    part_sizes: list[int] | None = None  # learned from the source, for the engine to record
    decoded: dict[str, Any] | None = None  # encoding, raw_sha256, raw_size, size (plain file)
    # Link evidence (cloudexit/state/linkseries.py): time to the first byte of the last answer,
    # and every error met on the way (kind, detail), those retried past included.
    ttfb: float | None = None
    faults: list[tuple[str, str]] = field(default_factory=list)
    worker: str | None = None  # the cluster worker that ran it (cloudexit/cluster); None: this machine
