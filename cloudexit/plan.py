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

import html
import math
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta, tzinfo
from zoneinfo import ZoneInfo

from cloudexit.errors import UsageError
from cloudexit.pricing.catalogue import Catalogue, Fact, RestoreTier, Span, StorageClass
from cloudexit.schedule import UNLIMITED, Schedule, effective_rate
from cloudexit.units import format_bytes, format_duration, format_rate

FORMAT = "cloudexit.plan/1"
DEFAULT_OFFLINE_THRESHOLD = timedelta(days=7)
CASES = ("low", "expected", "high")
# The quick end of a time range comes from the link's high throughput, and vice versa.
_THROUGHPUT = {"low": "high", "expected": "expected", "high": "low"}
_BYTE_SLACK = 0.5  # float sums may leave a fraction of a byte; that is done
_NO_PROGRESS = timedelta(days=8)  # a weekly timetable that moves nothing for this long never will
# A nominal line rate is never all usable: TCP/TLS overhead, other traffic, the cloud side.
NOMINAL_SHARE = {"low": 0.60, "expected": 0.85, "high": 0.95}
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
START_UP_S = 2.0  # interpreter, worker processes and the endpoint check before the first GET


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
        }


def _workload_dict(workload: Workload) -> dict:
    return {
        "objects": workload.objects,
        "bytes": workload.bytes,
        "get_requests": workload.get_requests,
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
        moment, moved, released, chunks = self.start + timedelta(seconds=self.link.startup_s), 0.0, 0.0, []
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
            "egress tiers restart every calendar month; the free allowance covers the first GB "
            "of each "
            "month and counts toward the first tier",
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


def _money(value: float) -> str:
    return f"{value:,.2f}"


def _cost_text(plan: Plan, scenario: Scenario) -> str:
    if scenario.cost is None:
        return "unknown"
    c = scenario.cost
    text = f"{_money(c.expected)} ({_money(c.low)}-{_money(c.high)})"
    return text if scenario.complete else text + " incomplete"


def _time_text(scenario: Scenario) -> str:
    if scenario.time_s is None:
        return "-"
    t = scenario.time_s
    return f"{format_duration(t.expected)} ({format_duration(t.low)}-{format_duration(t.high)})"


def _finish_text(scenario: Scenario) -> str:
    return scenario.finish[1].strftime("%Y-%m-%d %H:%M") if scenario.finish else "-"


def _summary_rows(plan: Plan) -> list[list[str]]:
    rows = []
    for s in plan.scenarios:
        if s.available:
            rows.append([s.key, _time_text(s), _finish_text(s), _cost_text(plan, s)])
        else:
            rows.append([s.key, "-", "-", f"not available: {s.reason}"])
    return rows


def _headline(plan: Plan) -> str:
    w = plan.workload
    return (
        f"{plan.title} ({plan.provider}, {plan.region}): "
        f"{format_bytes(w.bytes)} in {w.objects:,} objects, "
        f"start {plan.start.strftime('%Y-%m-%d %H:%M %Z').strip()}"
    )


def render_text(plan: Plan) -> str:
    """The terminal table: one row per scenario, then warnings."""
    header = [
        "scenario",
        "time (expected, range)",
        "finish (expected)",
        f"cost {plan.currency} (expected, range)",
    ]
    rows = [header] + _summary_rows(plan)
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    lines = [_headline(plan), ""]
    for index, row in enumerate(rows):
        lines.append("  ".join(cell.ljust(widths[i]) for i, cell in enumerate(row)).rstrip())
        if index == 0:
            lines.append("  ".join("-" * w for w in widths))
    notes = plan.warnings + [f"{s.key}: {w}" for s in plan.scenarios for w in s.warnings]
    if notes:
        lines += ["", "warnings:"] + [f"  - {n}" for n in notes]
    if plan.unknown:
        lines += ["", f"unknown, prices counted as 0: {', '.join(f.name for f in plan.unknown)}"]
    return "\n".join(lines) + "\n"


def _md_table(rows: list[list[str]]) -> list[str]:
    out = ["| " + " | ".join(rows[0]) + " |", "|" + "---|" * len(rows[0])]
    out += ["| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |" for row in rows[1:]]
    return out


def _breakdown_rows(plan: Plan, bd: Breakdown) -> list[list[str]]:
    rows = [["item", "quantity", "unit price", f"cost {plan.currency}"]]
    for month in bd.egress:
        for line in month.lines:
            rows.append(
                _line_row(
                    plan,
                    CostLine(
                        f"{month.month} {line.item}",
                        line.quantity,
                        line.unit,
                        line.unit_price,
                        line.cost,
                        line.note,
                    ),
                )
            )
    for line in bd.requests + bd.restores + bd.device + bd.inventory:
        rows.append(_line_row(plan, line))
    if bd.exit_credit:
        rows.append(["exit program credit", "", "", _money(bd.exit_credit)])
    rows.append(["**total**", "", "", f"**{_money(bd.total)}**"])
    return rows


def _line_row(plan: Plan, line: CostLine) -> list[str]:
    if line.unit_price is None:
        price = "unknown"
    else:
        price = f"{line.unit_price:.6g}/{line.unit.rstrip('s')}" + (
            f" ({line.note})" if line.note else ""
        )
    quantity = f"{line.quantity:,.2f}" if line.unit == "GB" else f"{line.quantity:,.0f}"
    return [line.item, f"{quantity} {line.unit}", price, _money(line.cost)]


def render_markdown(plan: Plan) -> str:
    """The plan as a Markdown document for management and the project record."""
    out = [f"# Leaving {plan.title}: cost and time", "", _headline(plan), ""]
    out += _md_table(
        [
            [
                "scenario",
                "time (expected, range)",
                "finish (expected)",
                f"cost {plan.currency} (expected, range)",
            ]
        ]
        + _summary_rows(plan)
    )
    for s in plan.scenarios:
        out += ["", f"## {s.title} (`{s.key}`)", ""]
        if not s.available:
            out += [f"Not available: {s.reason}", ""]
        out += [f"- {a}" for a in s.assumptions] + [f"- **warning:** {w}" for w in s.warnings]
        if s.breakdown is not None:
            out += ["", *_md_table(_breakdown_rows(plan, s.breakdown))]
    out += ["", "## Assumptions", ""] + [f"- {a}" for a in plan.assumptions]
    if plan.warnings:
        out += ["", "## Warnings", ""] + [f"- {w}" for w in plan.warnings]
    out += ["", "## Prices not confirmed in a primary source", ""]
    out += [
        f"- `{f.name}`: {_fact_value(f)} ({f.source}, read {f.read_on})"
        + (f" - {f.note}" if f.note else "")
        for f in plan.unverified
    ] or ["- none"]
    return "\n".join(out) + "\n"


def _fact_value(fact: Fact | Span) -> str:
    if isinstance(fact, Fact):
        return "unknown" if fact.value is None else f"{fact.value:g}"
    return "unknown" if not fact.known else f"{fact.min:g}-{fact.max:g}"


_COLOURS = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b"]


def render_svg(plan: Plan, width: int = 760, height: int = 320) -> str:
    """Cumulative data moved over calendar time, one line per scenario (inline SVG)."""
    series = [(s, s.series) for s in plan.scenarios if s.available and s.series]
    left, right, top, bottom = 70, 45, 20, 50
    end = max((pts[-1][0] for _, pts in series), default=plan.start + timedelta(days=1))
    span_s = max((end - plan.start).total_seconds(), 1.0)
    total = max(float(plan.workload.bytes), 1.0)
    plot_w, plot_h = width - left - right, height - top - bottom

    def x(t: datetime) -> float:
        return left + plot_w * (t - plan.start).total_seconds() / span_s

    def y(b: float) -> float:
        return top + plot_h * (1 - b / total)

    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
        f'viewBox="0 0 {width} {height}" font-family="sans-serif" font-size="11">',
        f'<rect x="{left}" y="{top}" width="{plot_w}" height="{plot_h}" '
        'fill="none" stroke="#999"/>',
    ]
    for i in range(5):
        value = total * i / 4
        parts.append(
            f'<text x="{left - 6}" y="{y(value) + 4:.1f}" text-anchor="end">'
            f"{html.escape(format_bytes(value))}</text>"
        )
        parts.append(
            f'<line x1="{left}" x2="{left + plot_w}" y1="{y(value):.1f}" y2="{y(value):.1f}" '
            'stroke="#eee"/>'
        )
    for i in range(6):
        moment = plan.start + timedelta(seconds=span_s * i / 5)
        label = moment.strftime("%Y-%m-%d" if span_s > 3 * 86400 else "%m-%d %H:%M")
        parts.append(
            f'<text x="{x(moment):.1f}" y="{top + plot_h + 16}" text-anchor="middle">{label}</text>'
        )
    for index, (scenario, pts) in enumerate(series):
        colour = _COLOURS[index % len(_COLOURS)]
        coords = " ".join(f"{x(t):.1f},{y(b):.1f}" for t, b in pts)
        # Scenarios often share a curve: earlier lines are wider, so they show under later ones.
        stroke = 2 + 1.2 * (len(series) - 1 - index)
        parts.append(
            f'<polyline fill="none" stroke="{colour}" stroke-width="{stroke:g}" '
            f'stroke-linejoin="round" points="{coords}"/>'
        )
        lx = left + 10 + index * (plot_w // max(len(series), 1))
        parts.append(f'<rect x="{lx}" y="{height - 16}" width="10" height="10" fill="{colour}"/>')
        parts.append(f'<text x="{lx + 14}" y="{height - 7}">{html.escape(scenario.key)}</text>')
    parts.append("</svg>")
    return "\n".join(parts)


def render_html(plan: Plan) -> str:
    """One self-contained HTML file: summary, chart, breakdowns, assumptions; nothing external."""
    esc = html.escape

    def table(rows: list[list[str]]) -> str:
        head = "".join(f"<th>{esc(c)}</th>" for c in rows[0])
        body = "".join(
            "<tr>" + "".join(f"<td>{esc(c.strip('*'))}</td>" for c in row) + "</tr>"
            for row in rows[1:]
        )
        return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"

    sections = [
        f"<h1>Leaving {esc(plan.title)}: cost and time</h1>",
        f"<p>{esc(_headline(plan))}</p>",
        table(
            [
                [
                    "scenario",
                    "time (expected, range)",
                    "finish (expected)",
                    f"cost {plan.currency} (expected, range)",
                ]
            ]
            + _summary_rows(plan)
        ),
        "<h2>Data moved over calendar time</h2>",
        render_svg(plan),
    ]
    for s in plan.scenarios:
        sections.append(f"<h2>{esc(s.title)} <code>{esc(s.key)}</code></h2>")
        if not s.available:
            sections.append(f"<p>Not available: {esc(s.reason)}</p>")
        items = [esc(a) for a in s.assumptions] + [
            f"<strong>warning:</strong> {esc(w)}" for w in s.warnings
        ]
        sections.append("<ul>" + "".join(f"<li>{i}</li>" for i in items) + "</ul>")
        if s.breakdown is not None:
            sections.append(table(_breakdown_rows(plan, s.breakdown)))
    sections.append(
        "<h2>Assumptions</h2><ul>"
        + "".join(f"<li>{esc(a)}</li>" for a in plan.assumptions)
        + "</ul>"
    )
    if plan.warnings:
        sections.append(
            "<h2>Warnings</h2><ul>" + "".join(f"<li>{esc(w)}</li>" for w in plan.warnings) + "</ul>"
        )
    facts = "".join(
        f"<li><code>{esc(f.name)}</code>: {esc(_fact_value(f))} ({esc(f.source)}, "
        f"read {esc(f.read_on)}) {esc(f.note)}</li>"
        for f in plan.unverified
    )
    sections.append(
        f"<h2>Prices not confirmed in a primary source</h2><ul>{facts or '<li>none</li>'}</ul>"
    )
    style = (
        "body{font-family:sans-serif;max-width:60em;margin:2em auto;color:#222}"
        "table{border-collapse:collapse;margin:1em 0}"
        "td,th{border:1px solid #ccc;padding:3px 8px;text-align:left}"
        "th{background:#f4f4f4}code{background:#f4f4f4}"
    )
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f"<title>cloudexit plan: {esc(plan.title)}</title><style>{style}</style></head><body>\n"
        + "\n".join(sections)
        + "\n</body></html>\n"
    )
