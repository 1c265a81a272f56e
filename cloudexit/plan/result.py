"""The plan as it is returned: scenarios with their time and cost ranges, and its JSON form.

Field names of :meth:`Plan.to_dict` are stable and documented in docs/plan.md.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timedelta

from cloudexit.plan.inputs import CASES, Link, Range, Workload
from cloudexit.plan.pricing.catalogue import Fact, Span

FORMAT = "cloudexit.plan/1"


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
    # The expected case's rate model (Timeline.rate_model): the rate the plan expects under any
    # bandwidth limit, so a run's windows can be compared with it (plan/actual.py).
    rate_model: dict | None = None

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
                "rate_model": self.rate_model,
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
        "zip_archives": workload.zip_archives,
        "zip_files": workload.zip_files,
        "zip_archives_not_unpacked": workload.zip_archives_not_unpacked,
        "classes": {
            name: {
                "objects": c.objects,
                "bytes": c.bytes,
                "multipart_objects": c.multipart_objects,
                "multipart_parts": c.multipart_parts,
                "zips_unpacked": c.zips_unpacked,
                "zip_files": c.zip_files,
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
