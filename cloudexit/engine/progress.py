"""What a run tells its caller: progress as it goes, a summary at the end."""

from __future__ import annotations

from dataclasses import dataclass, field

from cloudexit.core.states import DONE, TransferState as T


@dataclass
class MigrateProgress:
    """Counters the CLI turns into a progress bar (and `status` reads from the DB)."""

    total: int = 0
    done: int = 0  # verified + quarantined + duplicate + skipped
    failed: int = 0
    quarantined: int = 0
    bytes_total: int = 0
    bytes_done: int = 0
    bytes_downloaded: int = 0
    in_flight: int = 0
    restoring: int = 0
    waiting_since: str | None = None
    waiting_why: str | None = None  # what the user may have to do, when it is not a plain outage
    rate_limit: float | None = None  # bytes/s in force (None: unlimited, 0: paused)
    study: str | None = None  # study being worked on
    stopping: int | None = None  # after Ctrl-C: objects in flight being finished (None: running)

    def load(self, counts: dict[str, int]) -> None:
        """Start from the archive's counts (state/transfers.py `counts`)."""
        self.total = sum(v for k, v in counts.items() if not k.startswith("_"))
        self.done = sum(counts.get(s, 0) for s in DONE)
        self.quarantined = counts.get(T.QUARANTINED, 0)
        self.failed = counts.get(T.FAILED, 0) + counts.get(T.MISSING, 0)
        self.restoring = counts.get(T.RESTORING, 0)
        self.bytes_total = counts["_bytes_total"]
        self.bytes_done = counts["_bytes_done"]


@dataclass
class MigrationSummary:
    run: int
    resumed: bool
    dest: str
    total: int
    verified: int
    quarantined: int
    duplicates: int
    failed: int
    missing: int
    skipped: int
    unfinished: int  # waiting for a restore, or left queued by a stop
    bytes_verified: int
    bytes_downloaded: int
    requests: dict[str, int]
    retries: int
    elapsed: float
    fetched_this_run: int
    failures: list[tuple[str, str, str]] = field(default_factory=list)  # key, state, reason
    # PACS destinations (`--to dicom://...`, `--to dicomweb+https://...`): dest -> state -> count
    deliveries: dict[str, dict[str, int]] = field(default_factory=dict)
    delivered_this_run: int = 0
    backup_error: str | None = None  # why the last backup of the state DB failed

    @property
    def exit_code(self) -> int:
        pacs_bad = any(c.get(s, 0) for c in self.deliveries.values()
                       for s in (T.FAILED, T.CONFLICT, T.QUEUED))
        return 3 if (self.failed or self.missing or self.quarantined or self.unfinished or pacs_bad) else 0
