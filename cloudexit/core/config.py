"""Settings with documented defaults, one dataclass per concern."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class SourceConfig:
    """Where the bucket is and how to talk to it."""

    endpoint_url: str | None = None  # None: AWS, or AWS_ENDPOINT_URL from the environment
    profile: str | None = None  # a named profile from ~/.aws; None: the default chain
    region: str | None = None
    max_attempts: int = 8  # per request, with exponential backoff and jitter (botocore "standard")
    connect_timeout: float = 10.0
    read_timeout: float = 60.0
    max_pool_connections: int = 64


@dataclass(frozen=True)
class InventoryConfig:
    """How `inventory` lists and reads headers."""

    workers: int = 16  # threads reading DICOM headers
    list_workers: int = 8  # threads listing key ranges in parallel
    header_bytes: int = 64 * 1024  # first ranged GET; grown (doubled) when the header is longer
    max_header_bytes: int = 32 * 1024 * 1024  # give up growing past this
    key_pattern: str | None = None  # e.g. "{study}/{series}/{sop}.dcm": UIDs from keys, no reads
    pattern_sample: int = 20  # objects whose headers are read to check the key pattern
    commit_every: int = 1000  # rows per SQLite transaction


@dataclass(frozen=True)
class MigrateConfig:
    """How `migrate` downloads, verifies and places objects (see docs/performance.md)."""

    layout: str = "uid"  # "uid": STUDY/SERIES/SOP.dcm; "keys": the source keys, sanitised
    non_dicom: str = "copy"  # "copy": into DEST/_non-dicom/ (by key); "skip": recorded, not copied
    keep_containers: bool = False  # zipped studies: also keep the zip as stored (in _non-dicom/)
    order: str = "newest"  # newest | oldest | key: newest studies first, whole studies together
    # ("mixed", sizes interleaved, is for `plan --measure`'s sample)
    processes: int = 0  # worker processes; 0: one per CPU (at most 8)
    threads: int = 8  # download threads per worker process, one connection each; small objects
    # run 2 x threads at once on each worker's main thread (`multiget`)
    large_object: int = 64 * 2**20  # objects this big or bigger download in parallel ranges
    range_size: int = 16 * 2**20  # bytes per ranged GET of a large object
    range_streams: int = 4  # ranges of one large object in flight at once
    buffer_size: int = 1 * 2**20  # read/hash/write buffer per stream
    attempts: int = 6  # per object for transient errors (5xx, SlowDown, resets, corruption)
    backoff_base: float = 0.5  # seconds; retry n waits up to base * 2**n (full jitter)
    backoff_max: float = 30.0
    link_probe_max: float = 60.0  # seconds between probes when the endpoint is down, at most
    restore_tier: str = "Bulk"  # Bulk | Standard | Expedited
    restore_days: int = 7  # days a restored copy stays readable
    restore_poll: float = 900.0  # seconds between checks of restores in progress
    bwlimit: str | None = None  # rclone timetable, e.g. "08:00,20M 18:00,off"; None: no limit
    fsync: bool = True  # fsync each file and its directory before it counts as verified
    backup_minutes: float = 30.0  # a backup of the state DB this often (0: none); see docs/state-db.md
    connect_timeout: float = 10.0
    read_timeout: float = 60.0
    commit_interval: float = 0.25  # seconds between DB commits of finished objects
    join_archive: bool = False  # write into an archive folder another migration claimed
    progress_interval: float = 1.0  # seconds between progress reports (the link measurement: less)
    # How long to wait for a PACS: recorded with the run's options, so --resume keeps them
    # (a lambda: PacsConfig is defined below).
    pacs: PacsConfig = field(default_factory=lambda: PacsConfig())

    def worker_processes(self) -> int:
        """Worker processes a run starts: `processes`, or one per CPU (at most 8)."""
        import os

        return self.processes or min(os.cpu_count() or 1, 8)

    def requests_in_flight(self, small: bool = True) -> int:
        """GETs a run keeps in flight: small objects 2 x threads per worker (`multiget`),
        large ones one per download thread."""
        return self.worker_processes() * self.threads * (2 if small else 1)


@dataclass(frozen=True)
class PacsConfig:
    """How long to wait for a PACS (C-STORE and STOW-RS) before counting it as not answering.

    A dead PACS (host up, process hung: the TCP connection is accepted, nothing answers) must
    free a delivery thread in seconds: the object stays queued and is sent again once a probe
    finds the PACS back. A large object gets more time for its answer (`answer_timeout`)."""

    connect_timeout: float = 10.0  # TCP connect (C-STORE and STOW-RS)
    acse_timeout: float = 10.0  # C-STORE: the answer to an association request or release
    network_timeout: float = 30.0  # C-STORE: no PDU from the PACS this long aborts the association
    dimse_timeout: float = 10.0  # C-STORE/C-ECHO: the answer to a small object's request
    http_timeout: float = 30.0  # STOW-RS: the answer to a small request (read timeout)
    min_rate: float = 2 * 2**20  # bytes/s a PACS takes at least: a larger object waits size/min_rate more
    max_timeout: float = 300.0  # the longest any answer is waited for (and C-FIND, C-GET's)

    def answer_timeout(self, base: float, size: int) -> float:
        """Seconds to wait for the answer to a request that sent `size` bytes."""
        return min(self.max_timeout, base + max(size, 0) / self.min_rate)
