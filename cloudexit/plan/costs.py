"""The cost model: egress per billing month (free allowance, tiers, time-of-day bands), requests,
restores, the exit program's credit and offline devices, as priced cost lines.

Prices come from the catalogue; an unknown price counts as 0 and its name is collected, so
every plan says which of its figures rest on a guess.
"""

from __future__ import annotations

import math
from datetime import timedelta

from cloudexit.plan.inputs import ClassLoad
from cloudexit.plan.pricing.catalogue import Fact, OfflineDevice
from cloudexit.plan.result import Breakdown, CostLine, MonthEgress
from cloudexit.plan.timeline import Chunk, Run, Setup, Timeline, hhmm


class Costs:
    """Prices what a :class:`~cloudexit.plan.timeline.Timeline` moved, for one catalogue."""

    def __init__(self, time: Timeline) -> None:
        self.time = time
        self.workload = time.workload
        self.catalogue = time.catalogue
        self.classes = time.classes
        self.start = time.start

    def breakdown(self, setup: Setup, case: str, run: Run) -> Breakdown:
        """The costs of one scenario's case, from the bytes its walk moved."""
        cat = self.catalogue
        breakdown = Breakdown()
        unknown: set[str] = set()
        header = Chunk(
            self.start,
            self.start,
            float(self.workload.inventory_header_bytes),
            self.time.billing_slot(self.time.billing_local(self.start))[0],
            None,
        )
        chunk_costs: list[float] = []
        by_month: dict[str, list[Chunk]] = {}
        for chunk in ([header] if header.nbytes else []) + run.chunks:
            by_month.setdefault(chunk.month, []).append(chunk)
        for month, chunks in by_month.items():
            priced, costs = self._price_month(month, chunks, unknown)
            breakdown.egress.append(priced)
            chunk_costs.extend(costs[1:] if chunks[0] is header else costs)

        gets = self.workload.get_requests
        breakdown.requests.append(
            _line(
                "GET requests (one per object, one per part, one per file inside a zip)",
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
        self, month: str, chunks: list[Chunk], unknown: set[str]
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
                hours = f"{hhmm(band.start_minute)}-{hhmm(band.end_minute)}"
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
        self, name: str, load: ClassLoad, setup: Setup, case: str, unknown: set[str]
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

    def _credited(self, run: Run, chunk_costs: list[float]) -> float:
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

    def device(self, setup: Setup, case: str, device: OfflineDevice) -> Breakdown:
        """The costs of an offline device export (and the restores before it)."""
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
