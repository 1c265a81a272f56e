"""The time model: when each byte moves, through the link, the timetable and the restores.

:meth:`Timeline.walk` moves every byte through calendar time, segment by segment (timetable
changes, time-of-day price bands, month starts, restores finishing), so that the cost model can
price each stretch in its billing month and price band.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import datetime, timedelta, tzinfo
from zoneinfo import ZoneInfo

from cloudexit.core.units import format_bytes, format_rate
from cloudexit.engine.schedule import Schedule, effective_rate
from cloudexit.plan.inputs import CASES, Link, Range, Workload
from cloudexit.plan.pricing.catalogue import Catalogue, RestoreTier, Span, StorageClass

# The quick end of a time range comes from the link's high throughput, and vice versa.
_THROUGHPUT = {"low": "high", "expected": "expected", "high": "low"}
_BYTE_SLACK = 0.5  # float sums may leave a fraction of a byte; that is done
_NO_PROGRESS = timedelta(days=8)  # a weekly timetable that moves nothing for this long never will
SERIES_POINTS = 200
# A bandwidth limiter holds its rate to a few percent, and parallel requests hide most of their
# latency: how much of each the low / expected / high cases count. Calibrated against real
# migrations by benchmarks/plan_accuracy.py (docs/performance.md).
_TIMETABLE_SHARE = {"low": 1.0, "expected": 0.97, "high": 0.90}
_LATENCY_SHARE = {"low": 0.0, "expected": 0.5, "high": 1.0}
# What the migrate client itself costs, for a link given as a nominal rate (a measured link
# already includes it): CPU per object (request, signing, results, DB rows) and per byte (MD5,
# SHA-256, the DICOM check, write and fsync), per worker process on one core. Measured on a
# 2-core x86-64 VM with the S3 server on the same cores (docs/performance.md, "Transfer" and
# "Plan accuracy"); the quick end of a range assumes a faster client, the slow end a slower one.
CLIENT_CPU_PER_OBJECT_S = 1.5e-3
CLIENT_CPU_PER_BYTE_S = 10e-9
_CLIENT_SHARE = {"low": 1.3, "expected": 1.0, "high": 0.75}
_START_UP_SHARE = {"low": 0.5, "expected": 1.0, "high": 2.0}


@dataclass
class Chunk:
    """Bytes moved in a stretch of time with one month and one price band."""

    begin: datetime
    end: datetime
    nbytes: float
    month: str
    band: int | None  # index into catalogue.egress.time_of_day


@dataclass
class Run:
    finish: datetime
    chunks: list[Chunk]


@dataclass
class Setup:
    """What a scenario fixes before the walk: when to transfer and how to restore."""

    key: str
    title: str
    schedule: Schedule
    restore: Callable[[StorageClass], RestoreTier]
    assumptions: list[str]
    exit_credit: bool = False
    only_band: int | None = None  # move bytes only in this time-of-day price band


class NeverMoves(Exception):
    """The timetable and the allowed price hours never overlap."""


class Timeline:
    """The link, the provider's billing clock and the restores of one plan: where bytes move when."""

    def __init__(
        self,
        workload: Workload,
        catalogue: Catalogue,
        classes: dict[str, StorageClass],
        link: Link,
        start: datetime,
    ) -> None:
        self.workload = workload
        self.catalogue = catalogue
        self.classes = classes
        self.start = start
        self.warnings: list[str] = []
        self.zone: tzinfo | None = ZoneInfo(catalogue.billing_timezone) if start.tzinfo else None
        self.link = self._provider_capped(link)
        # Request latency spread over the bytes: seconds per byte beyond the bandwidth. A link
        # measured by migrate itself has it in its rate already.
        self.per_byte_overhead = 0.0 if link.overheads_included else (
            link.latency_s * workload.get_requests / (max(link.concurrency, 1) * workload.bytes)
        )
        # The client's CPU as a ceiling on the rate: many tiny objects are bound by it, not
        # by the link.
        self.client_rate: float | None = None
        if link.cores and not link.overheads_included:
            cpu_per_byte = CLIENT_CPU_PER_BYTE_S + CLIENT_CPU_PER_OBJECT_S * workload.fetches / workload.bytes
            self.client_rate = link.cores / cpu_per_byte
        edges = {b.start_minute for b in catalogue.egress.time_of_day} | {
            b.end_minute % 1440 for b in catalogue.egress.time_of_day
        }
        self.band_edges = sorted(edges)

    def _provider_capped(self, link: Link) -> Link:
        limit = self.catalogue.throughput_limit
        cap = limit.cap(self.workload.bytes) if limit else None
        if cap is None or cap >= link.throughput.high:
            return link
        self.warnings.append(
            f"{self.catalogue.provider} caps egress at {format_rate(cap)} for "
            f"{format_bytes(self.workload.bytes)} stored: faster than that the link cannot be used"
        )
        rates = Range(*(min(link.rate(c), cap) for c in CASES))
        return replace(link, throughput=rates, source=f"{link.source}; capped by the provider")

    def ready_times(self, setup: Setup, case: str) -> list[tuple[datetime, float]]:
        """When each class's bytes can be read: now, or after its restore."""
        batches = []
        rps = self.catalogue.restore_requests_per_second
        submitted = 0
        for name, load in self.workload.classes.items():
            cls = self.classes[name]
            if not cls.needs_restore:
                batches.append((self.start, float(load.bytes)))
                continue
            submitted += load.objects
            submit_s = submitted / rps.value if rps is not None and rps.value else 0.0
            hours = pick(setup.restore(cls).hours, case, default=48.0)
            batches.append(
                (self.start + timedelta(seconds=submit_s, hours=hours), float(load.bytes))
            )
        return sorted(batches, key=lambda b: b[0])

    def rate_model(self, case: str) -> dict[str, float]:
        """What sets the rate of a case, as plain numbers: the link's cap (bytes/s), seconds per
        byte beyond the bandwidth, and the share of a bandwidth limit the run is expected to
        reach. Kept with the plan so the rate it expected under any limit can be compared with
        what a run did (`planned_rate`)."""
        cap = self.link.rate(_THROUGHPUT[case])
        if self.client_rate is not None:
            cap = min(cap, self.client_rate * _CLIENT_SHARE[case])
        return {"cap_bytes_per_s": cap, "per_byte_overhead_s": self.per_byte_overhead * _LATENCY_SHARE[case],
                "limit_share": _TIMETABLE_SHARE[case], "startup_s": self.link.startup_s * _START_UP_SHARE[case]}

    def walk(self, setup: Setup, case: str) -> Run:
        """Move every byte through the link and timetable, split at every billing boundary."""
        rates = self.rate_model(case)
        cap, overhead = rates["cap_bytes_per_s"], rates["per_byte_overhead_s"]
        schedule = setup.schedule
        pending = self.ready_times(setup, case)
        total = sum(b for _, b in pending)
        # Nothing moves while the run starts: a constant that matters only for small exits.
        startup = timedelta(seconds=rates["startup_s"])
        moment, moved, released, chunks = self.start + startup, 0.0, 0.0, []
        last_progress = moment
        while total - moved > _BYTE_SLACK:
            while pending and pending[0][0] <= moment:
                released += pending.pop(0)[1]
            waiting = released - moved
            next_ready = pending[0][0] if pending else None
            if waiting <= _BYTE_SLACK:
                if next_ready is None:
                    break
                moment = last_progress = next_ready  # idle until a restore finishes
                continue
            local = self.billing_local(moment)
            month, band = self.billing_slot(local)
            stops = [self.next_boundary(moment, local)]
            change = schedule.next_change(moment)
            stops += [t for t in (change, next_ready) if t is not None]
            end = min(stops)
            allowed = schedule.rate_at(moment)
            if allowed is not None:
                allowed *= _TIMETABLE_SHARE[case]
            speed = effective_rate(allowed, cap, overhead)
            if setup.only_band is not None and band != setup.only_band:
                speed = 0.0
            if speed > 0:
                possible = speed * (end - moment).total_seconds()
                if possible >= waiting:
                    end, possible = moment + timedelta(seconds=waiting / speed), waiting
                chunks.append(Chunk(moment, end, possible, month, band))
                moved += possible
                last_progress = end
            elif end - last_progress > _NO_PROGRESS:
                raise NeverMoves()
            moment = end
        return Run(moment, chunks)

    def billing_local(self, moment: datetime) -> datetime:
        return moment.astimezone(self.zone) if self.zone is not None else moment

    def billing_slot(self, local: datetime) -> tuple[str, int | None]:
        """Billing month and price band at a moment on the provider's clock."""
        month = f"{local.year:04d}-{local.month:02d}"
        minute = local.hour * 60 + local.minute
        for index, band in enumerate(self.catalogue.egress.time_of_day):
            if band.covers(minute):
                return month, index
        return month, None

    def next_boundary(self, moment: datetime, local: datetime) -> datetime:
        """The next month start or price-band edge on the provider's clock (``local``)."""
        midnight = datetime(local.year, local.month, local.day, tzinfo=local.tzinfo)
        year, month = divmod(local.year * 12 + local.month, 12)  # local.month is 1-based
        candidates = [datetime(year, month + 1, 1, tzinfo=local.tzinfo)]
        for edge in self.band_edges:
            candidate = midnight + timedelta(minutes=edge)
            candidates.append(candidate if candidate > local else candidate + timedelta(days=1))
        nearest = min(candidates)
        return nearest.astimezone(moment.tzinfo) if self.zone is not None else nearest


def planned_rate(model: dict[str, float], limit: float | None) -> float:
    """Bytes/s a plan's `rate_model` expects under a bandwidth limit (None: no limit)."""
    allowed = None if limit is None else limit * model.get("limit_share", 1.0)
    return effective_rate(allowed, model["cap_bytes_per_s"], model.get("per_byte_overhead_s", 0.0))


def pick(span: Span, case: str, default: float) -> float:
    if not span.known:
        return default
    return {"low": span.min, "expected": (span.min + span.max) / 2, "high": span.max}[case]


def series(start: datetime, chunks: list[Chunk]) -> list[tuple[datetime, float]]:
    """Cumulative bytes over calendar time, thinned to at most SERIES_POINTS points."""
    points = [(start, 0.0)]
    total = 0.0
    for chunk in chunks:
        if chunk.begin > points[-1][0]:
            points.append((chunk.begin, total))
        total += chunk.nbytes
        points.append((chunk.end, total))
    if len(points) <= SERIES_POINTS:
        return points
    step = (len(points) - 1) / (SERIES_POINTS - 1)
    return [points[round(i * step)] for i in range(SERIES_POINTS)]


def hhmm(minute: int) -> str:
    return f"{minute // 60 % 24:02d}:{minute % 60:02d}" if minute != 1440 else "24:00"
