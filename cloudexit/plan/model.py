"""The plan: what leaving the cloud costs and how long it takes, as ranges, per scenario.

Pure arithmetic over plain numbers: a :class:`Workload` (from the inventory), a :class:`Link`,
an optional bandwidth :class:`~cloudexit.schedule.Schedule`, a price
:class:`~cloudexit.pricing.Catalogue` and a start time. :func:`make_plan` walks calendar time
segment by segment (timetable changes, time-of-day price bands, month starts, restores
finishing) so that egress tiers reset each billing month and idle-hour prices apply to the
bytes that really move in those hours.

Scenarios, side by side: ``fastest`` (full link, fastest restores), ``cheapest`` (cheapest
hours and restore tiers, within the timetable), ``within_schedule`` (the hospital's
timetable), ``free_exit`` (the provider's exit program, where there is one) and
``offline_device`` (when the network would take longer than the offline threshold).

Each time and cost is a :class:`Range`: ``low`` uses the link's best throughput and shortest
restore times, ``high`` the worst ones and minimum billable sizes. Field names of
:meth:`Plan.to_dict` are stable and documented in docs/plan.md.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta, tzinfo
from zoneinfo import ZoneInfo

from cloudexit.core.errors import UsageError
from cloudexit.plan.pricing.catalogue import Catalogue, Fact, RestoreTier, Span, StorageClass
from cloudexit.engine.schedule import UNLIMITED, Schedule, effective_rate
from cloudexit.core.units import format_bytes, format_duration, format_rate

FORMAT = "cloudexit.plan/1"
DEFAULT_OFFLINE_THRESHOLD = timedelta(days=7)
CASES = ("low", "expected", "high")
# The quick end of a time range comes from the link's high throughput, and vice versa.
_THROUGHPUT = {"low": "high", "expected": "expected", "high": "low"}
_BYTE_SLACK = 0.5  # float sums may leave a fraction of a byte; that is done
_NO_PROGRESS = timedelta(days=8)  # a weekly timetable that moves nothing for this long never will
# A nominal line rate is never all usable: TCP/TLS overhead, other traffic, the cloud side.
# On a dedicated link shaped by tbf, migrate got 94-97% of the nominal rate (TCP/IP headers
# take ~3%; benchmarks/plan_accuracy.py, docs/plan.md): the expected case leaves room for other
# traffic, the slow end is a busy shared link.
NOMINAL_SHARE = {"low": 0.60, "expected": 0.90, "high": 0.98}
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
START_UP_S = 1.5  # interpreter, worker processes and the endpoint check before the first GET
_START_UP_SHARE = {"low": 0.5, "expected": 1.0, "high": 2.0}


# --- inputs --------------------------------------------------------------------------------


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

    objects: int
    bytes: int
    multipart_objects: int = 0  # objects at or above the multipart threshold
    multipart_parts: int = 0  # their parts in total: one ranged GET each

    @property
    def get_requests(self) -> int:
        return self.objects - self.multipart_objects + self.multipart_parts


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

    @property
    def objects(self) -> int:
        return sum(c.objects for c in self.classes.values())

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


# --- outputs -------------------------------------------------------------------------------


@dataclass
class CostLine:
    item: str
    quantity: float
    unit: str
    unit_price: float | None  # None: unknown price, counted as 0
    cost: float
    note: str = ""
    price_ref: str = ""  # the catalogue field the price comes from

    def to_dict(self) -> dict:
        return {
            "item": self.item,
            "quantity": self.quantity,
            "unit": self.unit,
            "unit_price": self.unit_price,
            "cost": self.cost,
            "note": self.note,
            "price_ref": self.price_ref,
        }


@dataclass
class MonthEgress:
    month: str  # YYYY-MM on the provider's billing clock
    gb: float
    cost: float
    lines: list[CostLine]

    def to_dict(self) -> dict:
        return {
            "month": self.month,
            "gb": self.gb,
            "cost": self.cost,
            "lines": [line.to_dict() for line in self.lines],
        }


@dataclass
class Breakdown:
    """Where the money goes, for one scenario in its expected case."""

    egress: list[MonthEgress] = field(default_factory=list)
    requests: list[CostLine] = field(default_factory=list)
    restores: list[CostLine] = field(default_factory=list)
    inventory: list[CostLine] = field(default_factory=list)  # already spent by `inventory`
    device: list[CostLine] = field(default_factory=list)
    exit_credit: float = 0.0  # zero or negative
    unknown_prices: list[str] = field(default_factory=list)

    def lines(self) -> list[CostLine]:
        egress = [line for month in self.egress for line in month.lines]
        return egress + self.requests + self.restores + self.inventory + self.device

    @property
    def egress_total(self) -> float:
        return sum(m.cost for m in self.egress)

    @property
    def total(self) -> float:
        lines = self.requests + self.restores + self.inventory + self.device
        return self.egress_total + sum(line.cost for line in lines) + self.exit_credit

    def to_dict(self) -> dict:
        return {
            "egress": [m.to_dict() for m in self.egress],
            "egress_total": self.egress_total,
            "requests": [line.to_dict() for line in self.requests],
            "restores": [line.to_dict() for line in self.restores],
            "inventory": [line.to_dict() for line in self.inventory],
            "device": [line.to_dict() for line in self.device],
            "exit_credit": self.exit_credit,
            "total": self.total,
            "unknown_prices": list(self.unknown_prices),
        }


@dataclass
class Scenario:
    key: str
    title: str
    available: bool = True
    reason: str = ""  # why not available
    time_s: Range | None = None
    finish: tuple[datetime, datetime, datetime] | None = None  # low, expected, high
    cost: Range | None = None
    breakdown: Breakdown | None = None
    restore_tiers: dict[str, str] = field(default_factory=dict)
    assumptions: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    series: list[tuple[datetime, float]] = field(
        default_factory=list
    )  # cumulative bytes, expected case

    @property
    def complete(self) -> bool:
        """False when an unknown price was counted as 0."""
        return self.breakdown is not None and not self.breakdown.unknown_prices

    def to_dict(self) -> dict:
        return {
            "key": self.key,
            "title": self.title,
            "available": self.available,
            "reason": self.reason,
            "time_s": self.time_s.to_dict() if self.time_s else None,
            "finish": dict(zip(CASES, (t.isoformat() for t in self.finish), strict=True))
            if self.finish
            else None,
            "cost": self.cost.to_dict() if self.cost else None,
            "complete": self.complete,
            "restore_tiers": dict(self.restore_tiers),
            "assumptions": list(self.assumptions),
            "warnings": list(self.warnings),
            "breakdown": self.breakdown.to_dict() if self.breakdown else None,
            "series": [[t.isoformat(), b] for t, b in self.series],
        }


@dataclass
class Plan:
    provider: str
    region: str
    title: str
    currency: str
    start: datetime
    workload: Workload
    link: Link
    schedule: str | None
    offline_threshold: timedelta
    scenarios: list[Scenario]
    assumptions: list[str]
    warnings: list[str]
    unverified: list[Fact | Span]
    unknown: list[Fact | Span]
    catalogue_file: str = ""
    # Set by `plan --assume-size`: {"size": "40 TB", "bytes": ..., "objects": ...} of the real
    # inventory; every output says the figures are for the assumed size.
    assumed_size: dict | None = None

    def scenario(self, key: str) -> Scenario:
        for scenario in self.scenarios:
            if scenario.key == key:
                return scenario
        raise KeyError(key)

    def to_dict(self) -> dict:
        return {
            "format": FORMAT,
            "provider": self.provider,
            "region": self.region,
            "title": self.title,
            "currency": self.currency,
            "catalogue": self.catalogue_file,
            "start": self.start.isoformat(),
            "workload": _workload_dict(self.workload),
            "link": {
                "throughput_bytes_per_s": self.link.throughput.to_dict(),
                "latency_s": self.link.latency_s,
                "concurrency": self.link.concurrency,
                "source": self.link.source,
            },
            "schedule": self.schedule,
            "offline_threshold_s": self.offline_threshold.total_seconds(),
            "scenarios": [s.to_dict() for s in self.scenarios],
            "assumptions": list(self.assumptions),
            "warnings": list(self.warnings),
            "unverified_prices": [_fact_dict(f) for f in self.unverified],
            "unknown_prices": [_fact_dict(f) for f in self.unknown],
            "assumed_size": self.assumed_size,
        }


def _workload_dict(workload: Workload) -> dict:
    return {
        "objects": workload.objects,
        "bytes": workload.bytes,
        "get_requests": workload.get_requests,
        "instances": workload.instances,
        "studies": workload.studies,
        "encoded_bytes": workload.encoded_bytes,
        "decoded_bytes": workload.decoded_bytes,
        "classes": {
            name: {
                "objects": c.objects,
                "bytes": c.bytes,
                "multipart_objects": c.multipart_objects,
                "multipart_parts": c.multipart_parts,
            }
            for name, c in workload.classes.items()
        },
        "inventory": {
            "header_bytes": workload.inventory_header_bytes,
            "get_requests": workload.inventory_get_requests,
            "list_requests": workload.inventory_list_requests,
        },
    }


def _fact_dict(fact: Fact | Span) -> dict:
    values = {"value": fact.value} if isinstance(fact, Fact) else {"min": fact.min, "max": fact.max}
    return {
        "name": fact.name,
        **values,
        "source": fact.source,
        "read_on": fact.read_on,
        "verified": fact.verified,
        "note": fact.note,
    }


# --- the model -----------------------------------------------------------------------------


@dataclass
class _Chunk:
    """Bytes moved in a stretch of time with one month and one price band."""

    begin: datetime
    end: datetime
    nbytes: float
    month: str
    band: int | None  # index into catalogue.egress.time_of_day


@dataclass
class _Run:
    finish: datetime
    chunks: list[_Chunk]


@dataclass
class _Setup:
    """What a scenario fixes before the walk: when to transfer and how to restore."""

    key: str
    title: str
    schedule: Schedule
    restore: Callable[[StorageClass], RestoreTier]
    assumptions: list[str]
    exit_credit: bool = False
    only_band: int | None = None  # move bytes only in this time-of-day price band


class _NeverMoves(Exception):
    """The timetable and the allowed price hours never overlap."""


def make_plan(
    workload: Workload,
    catalogue: Catalogue,
    link: Link,
    start: datetime,
    schedule: Schedule | None = None,
    offline_threshold: timedelta = DEFAULT_OFFLINE_THRESHOLD,
) -> Plan:
    """Cost and time of leaving, per scenario. Raises UsageError for an empty workload."""
    if workload.objects <= 0 or workload.bytes <= 0:
        raise UsageError(
            "the inventory is empty: nothing to plan",
            hint="run `cloudexit inventory s3://BUCKET` first",
        )
    if min(link.throughput.low, link.throughput.expected, link.throughput.high) <= 0:
        raise UsageError("link throughput must be above 0")
    if schedule is not None and schedule.never_transfers:
        raise UsageError(f"schedule {schedule.text!r} never allows transfer: every entry is 0")
    # An unknown storage class fails here, naming the known ones.
    classes = {name: catalogue.storage_class(name) for name in workload.classes}
    model = _Model(workload, catalogue, classes, link, start)

    setups = [
        _Setup(
            "fastest",
            "Fastest: full link, fastest restores",
            UNLIMITED,
            lambda c: c.restore.fastest(),
            ["no timetable: the full link around the clock"],
        )
    ]
    setups.append(model.cheapest_setup(schedule))
    if schedule is not None:
        setups.append(
            _Setup(
                "within_schedule",
                "Within the hospital's timetable",
                schedule,
                lambda c: c.restore.default(),
                [f"timetable: {schedule.text}"],
            )
        )
    if catalogue.exit_program is not None:
        program = catalogue.exit_program
        setups.append(
            _Setup(
                "free_exit",
                f"Free exit: {program.name}",
                schedule or UNLIMITED,
                lambda c: c.restore.default(),
                [
                    f"exit program: {program.conditions}",
                    f"timetable: {schedule.text}" if schedule else "no timetable: the full link",
                ],
                exit_credit=True,
            )
        )

    scenarios = [model.network_scenario(setup) for setup in setups]
    reference = next((s for s in scenarios if s.key == "within_schedule"), scenarios[0])
    if (
        reference.time_s is not None
        and reference.time_s.expected > offline_threshold.total_seconds()
    ):
        scenarios.append(model.offline_scenario(reference, offline_threshold))
    used = model.facts_used(scenarios)
    unknown = sorted(
        {name for s in scenarios if s.breakdown for name in s.breakdown.unknown_prices}
    )
    unknown_facts = [
        f for f in catalogue.facts if f.name in unknown or (f.name in used and not f.known)
    ]
    assumptions = model.plan_assumptions()
    if unknown_facts:
        assumptions.append(
            f"{len(unknown_facts)} prices or times are unknown; prices count as 0 (listed): "
            "supply a --price-file"
        )

    return Plan(
        provider=catalogue.provider,
        region=catalogue.region,
        title=catalogue.title,
        currency=catalogue.currency,
        start=start,
        workload=workload,
        link=model.link,
        schedule=schedule.text if schedule else None,
        offline_threshold=offline_threshold,
        scenarios=scenarios,
        assumptions=assumptions,
        warnings=model.warnings,
        unverified=[f for f in catalogue.unverified() if f.name in used],
        unknown=unknown_facts,
        catalogue_file=catalogue.source_file,
    )


class _Model:
    """The shared arithmetic behind every scenario of one plan."""

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
            cpu_per_byte = CLIENT_CPU_PER_BYTE_S + CLIENT_CPU_PER_OBJECT_S * workload.objects / workload.bytes
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

    # scenario setups

    def cheapest_setup(self, schedule: Schedule | None) -> _Setup:
        assumptions = ["restore tiers: the cheapest for each class"]
        only_band = self._cheapest_band()
        if only_band is not None:
            band = self.catalogue.egress.time_of_day[only_band]
            assumptions.append(
                f"transfer only {_hhmm(band.start_minute)}-{_hhmm(band.end_minute)} "
                f"{self.catalogue.billing_timezone} (cheaper price {band.price.or_zero()} "
                f"{self.catalogue.currency}/GB)"
            )
        else:
            assumptions.append("no time-of-day prices: the cheapest hours are all hours")
        if schedule is not None:
            assumptions.append(f"timetable: {schedule.text}")
        return _Setup(
            "cheapest",
            "Cheapest",
            schedule or UNLIMITED,
            lambda c: c.restore.cheapest(),
            assumptions,
            only_band=only_band,
        )

    def _cheapest_band(self) -> int | None:
        """The time-of-day band cheaper than the standard price, if the provider has one."""
        bands = self.catalogue.egress.time_of_day
        top = self.catalogue.egress.tiers[0].price.or_zero()
        cheaper = [i for i, b in enumerate(bands) if b.price.known and b.price.or_zero() < top]
        return min(cheaper, key=lambda i: bands[i].price.or_zero()) if cheaper else None

    # network scenarios

    def network_scenario(self, setup: _Setup) -> Scenario:
        scenario = Scenario(setup.key, setup.title, assumptions=list(setup.assumptions))
        scenario.restore_tiers = {
            name: setup.restore(cls).name for name, cls in self.classes.items() if cls.needs_restore
        }
        finishes, costs, breakdown = [], [], None
        for case in CASES:
            try:
                run = self._walk(setup, case)
            except _NeverMoves:
                scenario.available = False
                scenario.reason = "the timetable never allows transfer in the cheap hours"
                return scenario
            bd = self._costs(setup, case, run)
            finishes.append(run.finish)
            costs.append(bd.total)
            if case == "expected":
                breakdown, scenario.series = bd, _series(self.start, run.chunks)
                self._check_restore_expiry(setup, run, scenario)
                if setup.exit_credit:
                    self._check_exit_window(run, scenario)
        scenario.finish = (finishes[0], finishes[1], finishes[2])
        scenario.time_s = Range(*((f - self.start).total_seconds() for f in finishes))
        scenario.cost = Range(min(costs), costs[1], max(costs))
        scenario.breakdown = breakdown
        scenario.assumptions.extend(self._restore_assumptions(scenario.restore_tiers))
        return scenario

    def _ready_times(self, setup: _Setup, case: str) -> list[tuple[datetime, float]]:
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
            hours = _pick(setup.restore(cls).hours, case, default=48.0)
            batches.append(
                (self.start + timedelta(seconds=submit_s, hours=hours), float(load.bytes))
            )
        return sorted(batches, key=lambda b: b[0])

    def _walk(self, setup: _Setup, case: str) -> _Run:
        """Move every byte through the link and timetable, split at every billing boundary."""
        cap = self.link.rate(_THROUGHPUT[case])
        if self.client_rate is not None:
            cap = min(cap, self.client_rate * _CLIENT_SHARE[case])
        schedule = setup.schedule
        overhead = self.per_byte_overhead * _LATENCY_SHARE[case]
        pending = self._ready_times(setup, case)
        total = sum(b for _, b in pending)
        # Nothing moves while the run starts: a constant that matters only for small exits.
        startup = timedelta(seconds=self.link.startup_s * _START_UP_SHARE[case])
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
            local = self._billing_local(moment)
            month, band = self._billing_slot(local)
            stops = [self._next_boundary(moment, local)]
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
                chunks.append(_Chunk(moment, end, possible, month, band))
                moved += possible
                last_progress = end
            elif end - last_progress > _NO_PROGRESS:
                raise _NeverMoves()
            moment = end
        return _Run(moment, chunks)

    def _billing_local(self, moment: datetime) -> datetime:
        return moment.astimezone(self.zone) if self.zone is not None else moment

    def _billing_slot(self, local: datetime) -> tuple[str, int | None]:
        """Billing month and price band at a moment on the provider's clock."""
        month = f"{local.year:04d}-{local.month:02d}"
        minute = local.hour * 60 + local.minute
        for index, band in enumerate(self.catalogue.egress.time_of_day):
            if band.covers(minute):
                return month, index
        return month, None

    def _next_boundary(self, moment: datetime, local: datetime) -> datetime:
        """The next month start or price-band edge on the provider's clock (``local``)."""
        midnight = datetime(local.year, local.month, local.day, tzinfo=local.tzinfo)
        year, month = divmod(local.year * 12 + local.month, 12)  # local.month is 1-based
        candidates = [datetime(year, month + 1, 1, tzinfo=local.tzinfo)]
        for edge in self.band_edges:
            candidate = midnight + timedelta(minutes=edge)
            candidates.append(candidate if candidate > local else candidate + timedelta(days=1))
        nearest = min(candidates)
        return nearest.astimezone(moment.tzinfo) if self.zone is not None else nearest

    # costs

    def _costs(self, setup: _Setup, case: str, run: _Run) -> Breakdown:
        cat = self.catalogue
        breakdown = Breakdown()
        unknown: set[str] = set()
        header = _Chunk(
            self.start,
            self.start,
            float(self.workload.inventory_header_bytes),
            self._billing_slot(self._billing_local(self.start))[0],
            None,
        )
        chunk_costs: list[float] = []
        by_month: dict[str, list[_Chunk]] = {}
        for chunk in ([header] if header.nbytes else []) + run.chunks:
            by_month.setdefault(chunk.month, []).append(chunk)
        for month, chunks in by_month.items():
            priced, costs = self._price_month(month, chunks, unknown)
            breakdown.egress.append(priced)
            chunk_costs.extend(costs[1:] if chunks[0] is header else costs)

        gets = self.workload.get_requests
        breakdown.requests.append(
            _line(
                "GET requests (one per object, one per part)",
                gets,
                "requests",
                cat.get_per_1000,
                1000,
                unknown,
            )
        )
        for name, load in self.workload.classes.items():
            breakdown.restores.extend(self._restore_lines(name, load, setup, case, unknown))
        breakdown.inventory = self._inventory_lines(unknown)
        if setup.exit_credit and cat.exit_program is not None:
            breakdown.exit_credit = -self._credited(run, chunk_costs)
        breakdown.unknown_prices = sorted(unknown)
        return breakdown

    def _price_month(
        self, month: str, chunks: list[_Chunk], unknown: set[str]
    ) -> tuple[MonthEgress, list[float]]:
        """Egress of one billing month: free allowance first, then tiers or time-of-day bands."""
        egress = self.catalogue.egress
        gb_bytes = self.catalogue.gb_bytes.or_zero()
        free_left = egress.free_gb_per_month.or_zero()
        if not egress.free_gb_per_month.known:
            unknown.add(egress.free_gb_per_month.name)
        used, free_used = 0.0, 0.0
        tier_gb = [0.0] * len(egress.tiers)
        band_gb = [0.0] * len(egress.time_of_day)
        costs = []
        for chunk in chunks:
            gb = chunk.nbytes / gb_bytes
            free = min(gb, free_left)
            free_left -= free
            free_used += free
            cost = 0.0
            if chunk.band is not None:
                band = egress.time_of_day[chunk.band]
                band_gb[chunk.band] += gb - free
                cost = (gb - free) * band.price.or_zero()
            else:
                # The free allowance sits inside the first tier: tiers count all of the month's GB.
                low = 0.0
                for index, tier in enumerate(egress.tiers):
                    high = math.inf if tier.up_to_gb is None else tier.up_to_gb
                    overlap = max(0.0, min(used + gb, high) - max(used + free, low))
                    tier_gb[index] += overlap
                    cost += overlap * tier.price.or_zero()
                    low = high
            used += gb
            costs.append(cost)
        lines = []
        if free_used:
            lines.append(
                CostLine(
                    "free allowance",
                    free_used,
                    "GB",
                    0.0,
                    0.0,
                    price_ref=egress.free_gb_per_month.name,
                )
            )
        low = 0.0
        for index, tier in enumerate(egress.tiers):
            if tier_gb[index]:
                lines.append(
                    _priced(self._tier_label(index, low), tier_gb[index], "GB", tier.price, unknown)
                )
            low = tier.up_to_gb or low
        for index, band in enumerate(egress.time_of_day):
            if band_gb[index]:
                hours = f"{_hhmm(band.start_minute)}-{_hhmm(band.end_minute)}"
                label = f"egress {hours} ({self.catalogue.billing_timezone})"
                lines.append(_priced(label, band_gb[index], "GB", band.price, unknown))
        total_gb = sum(c.nbytes for c in chunks) / gb_bytes
        return MonthEgress(month, total_gb, sum(costs), lines), costs

    def _tier_label(self, index: int, low: float) -> str:
        egress = self.catalogue.egress
        if len(egress.tiers) == 1:
            return "egress, other hours" if egress.time_of_day else "egress"
        high = egress.tiers[index].up_to_gb
        span = f"{low:,.0f}-{high:,.0f} GB" if high is not None else f"over {low:,.0f} GB"
        return f"egress tier {index + 1} ({span} per month)"

    def _inventory_lines(self, unknown: set[str]) -> list[CostLine]:
        wl, cat = self.workload, self.catalogue
        return [
            _line(
                "inventory LIST requests (already spent)",
                wl.inventory_list_requests,
                "requests",
                cat.list_per_1000,
                1000,
                unknown,
            ),
            _line(
                "inventory header GETs (already spent)",
                wl.inventory_get_requests,
                "requests",
                cat.get_per_1000,
                1000,
                unknown,
            ),
        ]

    def _restore_lines(
        self, name: str, load: ClassLoad, setup: _Setup, case: str, unknown: set[str]
    ) -> list[CostLine]:
        cls = self.classes[name]
        billable = float(load.bytes)
        if case == "high" and cls.min_billable_bytes is not None and cls.min_billable_bytes.known:
            # Small objects may bill as the minimum size; the high end assumes they all do.
            billable = max(billable, load.objects * cls.min_billable_bytes.or_zero())
        gb = billable / self.catalogue.gb_bytes.or_zero()
        if cls.restore is not None:
            tier = setup.restore(cls)
            return [
                _priced(
                    f"{name} retrieval ({tier.name})", gb, "GB", tier.retrieval_per_gb, unknown
                ),
                _line(
                    f"{name} restore requests ({tier.name})",
                    load.objects,
                    "requests",
                    tier.requests_per_1000,
                    1000,
                    unknown,
                ),
            ]
        if cls.retrieval_per_gb is not None:
            return [_priced(f"{name} retrieval", gb, "GB", cls.retrieval_per_gb, unknown)]
        return []

    def _credited(self, run: _Run, chunk_costs: list[float]) -> float:
        """Egress the exit program pays back: what moves inside its window (all, if unknown)."""
        window = self.catalogue.exit_program.window_days
        if not window.known:
            return sum(chunk_costs)
        deadline = self.start + timedelta(days=window.or_zero())
        credit = 0.0
        for chunk, cost in zip(run.chunks, chunk_costs, strict=True):
            if chunk.end <= deadline:
                credit += cost
            elif chunk.begin < deadline:
                credit += cost * (deadline - chunk.begin) / (chunk.end - chunk.begin)
        return credit

    # checks and words

    def _check_restore_expiry(self, setup: _Setup, run: _Run, scenario: Scenario) -> None:
        for name, cls in self.classes.items():
            days = cls.restore.restored_copy_days if cls.restore else None
            if days is None or not days.known:
                continue
            ready = min(t for t, _ in self._ready_times(setup, "expected"))
            if (run.finish - ready).days > days.or_zero():
                scenario.warnings.append(
                    f"restored copies of {name} are kept {days.or_zero():g} days but the "
                    "transfer takes "
                    f"longer: restore in batches sized to the link"
                )

    def _check_exit_window(self, run: _Run, scenario: Scenario) -> None:
        window = self.catalogue.exit_program.window_days
        if not window.known:
            scenario.warnings.append(
                "the exit program's window is unknown: credit assumes everything is inside it"
            )
        elif run.finish - self.start > timedelta(days=window.or_zero()):
            scenario.warnings.append(
                "the expected transfer takes longer than the program's "
                f"{window.or_zero():g}-day window: "
                "egress after it is not credited"
            )

    def _restore_assumptions(self, tiers: dict[str, str]) -> list[str]:
        words = []
        for name, tier_name in tiers.items():
            hours = self.classes[name].restore.tiers[tier_name].hours
            if hours.known:
                took = format_duration(hours.min * 3600)
                if hours.max != hours.min:
                    took += f" to {format_duration(hours.max * 3600)}"
                words.append(f"{name}: {tier_name} restore, {took}, all requested at the start")
            else:
                words.append(f"{name}: {tier_name} restore, time unknown (48 h assumed)")
        return words

    def offline_scenario(self, reference: Scenario, threshold: timedelta) -> Scenario:
        scenario = Scenario("offline_device", "Offline device")
        device = self.catalogue.offline_device
        network = format_duration(reference.time_s.expected)
        scenario.assumptions.append(
            f"the network would take {network} ({reference.key}), over the "
            f"{format_duration(threshold.total_seconds())} threshold"
        )
        if device is None or not device.days.known:
            scenario.available = False
            scenario.reason = (
                f"no device export with known terms for {self.catalogue.provider}: ask for a quote"
            )
            if device is not None:
                scenario.assumptions.append(f"{device.name}: {device.note}")
            return scenario
        scenario.title = f"Offline device: {device.name}"
        if device.note:
            scenario.warnings.append(device.note)
        setup = _Setup(
            "offline_device", scenario.title, UNLIMITED, lambda c: c.restore.default(), []
        )
        scenario.restore_tiers = {
            n: c.restore.default().name for n, c in self.classes.items() if c.needs_restore
        }
        finishes, costs, breakdown = [], [], None
        for case in CASES:
            days = _pick(device.days, case, default=0.0)
            ready = max(t for t, _ in self._ready_times(setup, case))
            finishes.append(ready + timedelta(days=days))
            bd = self._device_costs(setup, case, device)
            costs.append(bd.total)
            if case == "expected":
                breakdown = bd
        scenario.finish = (finishes[0], finishes[1], finishes[2])
        scenario.time_s = Range(*((f - self.start).total_seconds() for f in finishes))
        scenario.cost = Range(min(costs), costs[1], max(costs))
        scenario.breakdown = breakdown
        scenario.series = [
            (self.start, 0.0),
            (finishes[1], 0.0),
            (finishes[1], float(self.workload.bytes)),
        ]
        scenario.assumptions.append(
            f"device jobs of {device.capacity_gb_per_job.or_zero():,.0f} GB, "
            f"{device.days.min:g}-{device.days.max:g} days "
            "including shipping; data counts as moved when the device is back"
        )
        scenario.assumptions.extend(self._restore_assumptions(scenario.restore_tiers))
        return scenario

    def _device_costs(self, setup: _Setup, case: str, device) -> Breakdown:
        breakdown = Breakdown()
        unknown: set[str] = set()
        gb = self.workload.bytes / self.catalogue.gb_bytes.or_zero()
        capacity = device.capacity_gb_per_job.or_zero()
        jobs = math.ceil(gb / capacity) if capacity else 1
        if not device.capacity_gb_per_job.known:
            unknown.add(device.capacity_gb_per_job.name)
        breakdown.device.append(_priced("device jobs", jobs, "jobs", device.job_fee, unknown))
        breakdown.device.append(_priced("data onto the device", gb, "GB", device.per_gb, unknown))
        for name, load in self.workload.classes.items():
            breakdown.restores.extend(self._restore_lines(name, load, setup, case, unknown))
        breakdown.inventory = self._inventory_lines(unknown)
        breakdown.unknown_prices = sorted(unknown)
        return breakdown

    def plan_assumptions(self) -> list[str]:
        cat = self.catalogue
        words = [
            f"prices: {cat.title} ({cat.source_file}), in {cat.currency}",
            f"link: {self.link.source}; usable {format_rate(self.link.throughput.low)} to "
            f"{format_rate(self.link.throughput.high)}, "
            f"expected {format_rate(self.link.throughput.expected)}",
            f"{self.link.concurrency} parallel requests, {self.link.latency_s * 1000:g} ms latency "
            f"each, {self.workload.get_requests:,} GETs (one per object, one per part of multipart "
            "objects)" + ("; latency and the client's own work are in the measured rate"
                          if self.link.overheads_included else ""),
            f"1 GB = {cat.gb_bytes.or_zero():,.0f} bytes",
            f"egress tiers restart every calendar month; {self._free_words()}",
            "the inventory's header reads are billed in the first month; its requests are listed "
            "as already spent",
            "range: low = best throughput and shortest restores; high = worst throughput, "
            "longest restores "
            "and minimum billable sizes",
        ]
        if self.link.startup_s:
            words.append(f"{self.link.startup_s:.1f} s to start the run before the first byte")
        if self.client_rate is not None:
            words.append(
                f"the client's CPU caps the rate at {format_rate(self.client_rate)} with "
                f"{self.link.cores} worker processes ({CLIENT_CPU_PER_OBJECT_S * 1000:g} ms per "
                f"object, {CLIENT_CPU_PER_BYTE_S * 1e9:g} s per GB on one core)"
            )
        if self.zone is None:
            words.append(
                "times are read on one clock: the start time is taken to be "
                f"{cat.billing_timezone}, the "
                "provider's billing clock (give a timezone-aware start to convert)"
            )
        else:
            words.append(
                f"billing months and price hours on {cat.billing_timezone}; "
                "timetable on the start's clock"
            )
        return words

    def _free_words(self) -> str:
        """What the monthly free egress allowance does: nothing said of a first GB it lacks."""
        free = self.catalogue.egress.free_gb_per_month
        if not free.known:
            return "the free allowance is unknown: counted as 0 GB"
        if free.or_zero() <= 0:
            return f"no free egress allowance ({free.or_zero():g} GB per month)"
        return (f"the free allowance covers the first {free.or_zero():,.0f} GB of each month "
                "and counts toward the first tier")

    def facts_used(self, scenarios: list[Scenario]) -> set[str]:
        """Catalogue fields this plan's numbers rest on (to list only the relevant caveats)."""
        cat = self.catalogue
        used = {cat.gb_bytes.name, cat.egress.free_gb_per_month.name}
        for scenario in scenarios:
            if scenario.breakdown is not None:
                used |= {line.price_ref for line in scenario.breakdown.lines() if line.price_ref}
            for name, tier in scenario.restore_tiers.items():
                used.add(self.classes[name].restore.tiers[tier].hours.name)
        if any(s.key == "free_exit" for s in scenarios) and cat.exit_program is not None:
            used.add(cat.exit_program.window_days.name)
        if any(s.key == "offline_device" and s.available for s in scenarios) and cat.offline_device:
            device = cat.offline_device
            used |= {
                device.days.name,
                device.capacity_gb_per_job.name,
                device.job_fee.name,
                device.per_gb.name,
            }
        if cat.throughput_limit is not None:
            limit = cat.throughput_limit
            used |= {limit.per_tb_stored_bytes_per_s.name, limit.account_bytes_per_s.name}
        if any(c.needs_restore for c in self.classes.values()) and cat.restore_requests_per_second:
            used.add(cat.restore_requests_per_second.name)
        return used


def _pick(span: Span, case: str, default: float) -> float:
    if not span.known:
        return default
    return {"low": span.min, "expected": (span.min + span.max) / 2, "high": span.max}[case]


def _priced(item: str, quantity: float, unit: str, price: Fact, unknown: set[str]) -> CostLine:
    if not price.known and quantity:
        unknown.add(price.name)
    return CostLine(
        item,
        quantity,
        unit,
        price.value,
        quantity * price.or_zero(),
        "" if price.verified else "unverified price",
        price.name,
    )


def _line(item: str, count: float, unit: str, price: Fact, per: int, unknown: set[str]) -> CostLine:
    """A per-``per``-requests price applied to ``count`` requests."""
    if not price.known and count:
        unknown.add(price.name)
    unit_price = None if price.value is None else price.value / per
    return CostLine(
        item,
        count,
        unit,
        unit_price,
        count * price.or_zero() / per,
        "" if price.verified else "unverified price",
        price.name,
    )


def _series(start: datetime, chunks: list[_Chunk]) -> list[tuple[datetime, float]]:
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


def _hhmm(minute: int) -> str:
    return f"{minute // 60 % 24:02d}:{minute % 60:02d}" if minute != 1440 else "24:00"


# --- rendering -----------------------------------------------------------------------------


def render_text(plan: Plan, lang: str = "en") -> str:
    """The terminal table (rendering lives in cloudexit.plan_render)."""
    from cloudexit.plan.render import render_text as render

    return render(plan, lang)


def render_markdown(plan: Plan, lang: str = "en") -> str:
    from cloudexit.plan.render import render_markdown as render

    return render(plan, lang)


def render_html(plan: Plan, lang: str = "en") -> str:
    from cloudexit.plan.render import render_html as render

    return render(plan, lang)
