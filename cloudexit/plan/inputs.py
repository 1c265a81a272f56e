"""What a plan starts from: the workload (from the inventory) and the link, as plain numbers.

Each figure that varies is a :class:`Range`: ``low`` is the quick (or cheap) end, ``high`` the
slow (or dear) end.
"""

from __future__ import annotations

from dataclasses import dataclass

from cloudexit.core.units import format_rate

CASES = ("low", "expected", "high")
# A nominal line rate is never all usable: TCP/TLS overhead, other traffic, the cloud side.
# On a dedicated link shaped by tbf, migrate got 94-97% of the nominal rate (TCP/IP headers
# take ~3%; benchmarks/plan_accuracy.py, docs/plan.md): the expected case leaves room for other
# traffic, the slow end is a busy shared link.
NOMINAL_SHARE = {"low": 0.60, "expected": 0.90, "high": 0.98}
START_UP_S = 1.5  # interpreter, worker processes and the endpoint check before the first GET


@dataclass(frozen=True)
class Range:
    """A low / expected / high triple (for times, low is the quick end)."""

    low: float
    expected: float
    high: float

    def to_dict(self) -> dict[str, float]:
        return {"low": self.low, "expected": self.expected, "high": self.high}


@dataclass(frozen=True)
class ClassLoad:
    """What one storage class holds, and how it will be read."""

    objects: int  # objects in the bucket: a restore request and a minimum billable size each
    bytes: int
    multipart_objects: int = 0  # objects at or above the multipart threshold
    multipart_parts: int = 0  # their parts in total: one ranged GET each
    # Zipped studies: migrate fetches each file inside a zip with one ranged GET of the zip and
    # not the zip itself (unless --keep-containers), so the files are fetches but not objects.
    zips_unpacked: int = 0  # zips among `objects` that are not fetched whole
    zip_files: int = 0  # the files inside them

    @property
    def fetches(self) -> int:
        """Objects and files migrate fetches (a task each)."""
        return self.objects - self.zips_unpacked + self.zip_files

    @property
    def get_requests(self) -> int:
        return self.fetches - self.multipart_objects + self.multipart_parts


@dataclass
class Workload:
    """The inventory in numbers; ``classes`` is keyed by storage class as the listing says it."""

    classes: dict[str, ClassLoad]
    inventory_header_bytes: int = 0  # bytes the inventory's ranged header reads pulled out
    inventory_get_requests: int = 0
    inventory_list_requests: int = 0
    instances: int | None = None  # distinct SOP Instance UIDs (None: not counted)
    studies: int | None = None
    # objects stored in a PACS's envelope (Orthanc zlib, gzip): bytes as stored, and decoded
    # (what the archive will hold for them), when the envelope declared it
    encoded_bytes: int = 0
    decoded_bytes: int = 0
    # zipped studies, as `cloudexit status` counts them: the zip archives in the bucket (among
    # `objects`) and the files recorded inside them (not objects of the bucket)
    zip_archives: int = 0
    zip_files: int = 0
    zip_archives_not_unpacked: int = 0  # among zip_archives: unreadable, so fetched whole

    @property
    def objects(self) -> int:
        """Objects in the bucket (restores and minimum sizes bill per object; GET requests are
        per fetch, `fetches`, which counts the files inside zips instead of their zips)."""
        return sum(c.objects for c in self.classes.values())

    @property
    def fetches(self) -> int:
        return sum(c.fetches for c in self.classes.values())

    @property
    def bytes(self) -> int:
        return sum(c.bytes for c in self.classes.values())

    @property
    def get_requests(self) -> int:
        return sum(c.get_requests for c in self.classes.values())


@dataclass(frozen=True)
class Link:
    """The usable download path: throughput in bytes/s, per-request latency, parallel requests."""

    throughput: Range
    latency_s: float = 0.05
    concurrency: int = 16
    source: str = "given"  # how the figures were obtained, printed with the plan
    # True when the throughput was measured by running migrate itself on a sample of this
    # bucket: request latency and the client's own work are in it already, not added again.
    overheads_included: bool = False
    cores: int = 0  # worker processes of the migration; 0: the client's CPU is not modelled
    startup_s: float = 0.0  # before the first byte moves (a run's start: see START_UP_S)

    @classmethod
    def from_bandwidth(
        cls, bytes_per_s: float, latency_s: float = 0.05, concurrency: int = 16, cores: int = 0
    ) -> Link:
        """A link from its nominal rate; usable share 60% / 85% / 95% (low / expected / high)."""
        rates = Range(*(bytes_per_s * NOMINAL_SHARE[case] for case in CASES))
        shares = "/".join(f"{NOMINAL_SHARE[c]:.0%}" for c in CASES)
        return cls(
            rates, latency_s, concurrency, f"nominal {format_rate(bytes_per_s)}, {shares} usable",
            cores=cores,
        )

    def rate(self, case: str) -> float:
        return getattr(self.throughput, case)
