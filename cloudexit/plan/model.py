"""The plan: what leaving the cloud costs and how long it takes, as ranges, per scenario.

Pure arithmetic over plain numbers: a :class:`Workload` (from the inventory), a :class:`Link`,
an optional bandwidth :class:`~cloudexit.engine.schedule.Schedule`, a price
:class:`~cloudexit.plan.pricing.catalogue.Catalogue` and a start time. :func:`make_plan` walks calendar time
segment by segment (timetable changes, time-of-day price bands, month starts, restores
finishing) so that egress tiers reset each billing month and idle-hour prices apply to the
bytes that really move in those hours.

Scenarios, side by side: ``fastest`` (full link, fastest restores), ``cheapest`` (cheapest
hours and restore tiers, within the timetable), ``within_schedule`` (the hospital's
timetable), ``free_exit`` (the provider's exit program, where there is one) and
``offline_device`` (when the network would take longer than the offline threshold).

Each time and cost is a :class:`Range`: ``low`` uses the link's best throughput and shortest
restore times, ``high`` the worst ones and minimum billable sizes. This module holds the
scenarios; the inputs are in :mod:`cloudexit.plan.inputs`, the time model in
:mod:`cloudexit.plan.timeline`, the cost model in :mod:`cloudexit.plan.costs` and the result
with its JSON form (documented in docs/plan.md) in :mod:`cloudexit.plan.result`.
"""

from __future__ import annotations

from datetime import datetime, timedelta

from cloudexit.core.errors import UsageError
from cloudexit.core.units import format_duration, format_rate
from cloudexit.engine.schedule import UNLIMITED, Schedule
from cloudexit.plan.costs import Costs
from cloudexit.plan.inputs import CASES, Link, Range, Workload
from cloudexit.plan.pricing.catalogue import Catalogue
from cloudexit.plan.result import Plan, Scenario
from cloudexit.plan.timeline import (
    CLIENT_CPU_PER_BYTE_S,
    CLIENT_CPU_PER_OBJECT_S,
    NeverMoves,
    Run,
    Setup,
    Timeline,
    hhmm,
    pick,
    series,
)

DEFAULT_OFFLINE_THRESHOLD = timedelta(days=7)


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
    model = _Model(Timeline(workload, catalogue, classes, link, start))

    setups = [
        Setup(
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
            Setup(
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
            Setup(
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
        rate_model=model.time.rate_model("expected"),
    )


class _Model:
    """The scenarios of one plan, over its time model and its cost model."""

    def __init__(self, time: Timeline) -> None:
        self.time = time
        self.costs = Costs(time)
        self.workload = time.workload
        self.catalogue = time.catalogue
        self.classes = time.classes
        self.start = time.start
        self.link = time.link  # capped by the provider's throughput limit, if any
        self.warnings = time.warnings

    # scenario setups

    def cheapest_setup(self, schedule: Schedule | None) -> Setup:
        assumptions = ["restore tiers: the cheapest for each class"]
        only_band = self._cheapest_band()
        if only_band is not None:
            band = self.catalogue.egress.time_of_day[only_band]
            assumptions.append(
                f"transfer only {hhmm(band.start_minute)}-{hhmm(band.end_minute)} "
                f"{self.catalogue.billing_timezone} (cheaper price {band.price.or_zero()} "
                f"{self.catalogue.currency}/GB)"
            )
        else:
            assumptions.append("no time-of-day prices: the cheapest hours are all hours")
        if schedule is not None:
            assumptions.append(f"timetable: {schedule.text}")
        return Setup(
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

    def network_scenario(self, setup: Setup) -> Scenario:
        scenario = Scenario(setup.key, setup.title, assumptions=list(setup.assumptions))
        scenario.restore_tiers = {
            name: setup.restore(cls).name for name, cls in self.classes.items() if cls.needs_restore
        }
        finishes, costs, breakdown = [], [], None
        for case in CASES:
            try:
                run = self.time.walk(setup, case)
            except NeverMoves:
                scenario.available = False
                scenario.reason = "the timetable never allows transfer in the cheap hours"
                return scenario
            bd = self.costs.breakdown(setup, case, run)
            finishes.append(run.finish)
            costs.append(bd.total)
            if case == "expected":
                breakdown, scenario.series = bd, series(self.start, run.chunks)
                self._check_restore_expiry(setup, run, scenario)
                if setup.exit_credit:
                    self._check_exit_window(run, scenario)
        scenario.finish = (finishes[0], finishes[1], finishes[2])
        scenario.time_s = Range(*((f - self.start).total_seconds() for f in finishes))
        scenario.cost = Range(min(costs), costs[1], max(costs))
        scenario.breakdown = breakdown
        scenario.assumptions.extend(self._restore_assumptions(scenario.restore_tiers))
        return scenario

    def _check_restore_expiry(self, setup: Setup, run: Run, scenario: Scenario) -> None:
        for name, cls in self.classes.items():
            days = cls.restore.restored_copy_days if cls.restore else None
            if days is None or not days.known:
                continue
            ready = min(t for t, _ in self.time.ready_times(setup, "expected"))
            if (run.finish - ready).days > days.or_zero():
                scenario.warnings.append(
                    f"restored copies of {name} are kept {days.or_zero():g} days but the "
                    "transfer takes "
                    f"longer: restore in batches sized to the link"
                )

    def _check_exit_window(self, run: Run, scenario: Scenario) -> None:
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
        setup = Setup(
            "offline_device", scenario.title, UNLIMITED, lambda c: c.restore.default(), []
        )
        scenario.restore_tiers = {
            n: c.restore.default().name for n, c in self.classes.items() if c.needs_restore
        }
        finishes, costs, breakdown = [], [], None
        for case in CASES:
            days = pick(device.days, case, default=0.0)
            ready = max(t for t, _ in self.time.ready_times(setup, case))
            finishes.append(ready + timedelta(days=days))
            bd = self.costs.device(setup, case, device)
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

    def plan_assumptions(self) -> list[str]:
        cat = self.catalogue
        words = [
            f"prices: {cat.title} ({cat.source_file}), in {cat.currency}",
            f"link: {self.link.source}; usable {format_rate(self.link.throughput.low)} to "
            f"{format_rate(self.link.throughput.high)}, "
            f"expected {format_rate(self.link.throughput.expected)}",
            f"{self.link.concurrency} parallel requests, {self.link.latency_s * 1000:g} ms latency "
            f"each, {self.workload.get_requests:,} GETs (one per object, one per part of multipart "
            "objects, one per file inside a zip instead of the zip)"
            + ("; latency and the client's own work are in the measured rate"
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
        if self.time.client_rate is not None:
            words.append(
                f"the client's CPU caps the rate at {format_rate(self.time.client_rate)} with "
                f"{self.link.cores} worker processes ({CLIENT_CPU_PER_OBJECT_S * 1000:g} ms per "
                f"object, {CLIENT_CPU_PER_BYTE_S * 1e9:g} s per GB on one core)"
            )
        if self.time.zone is None:
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


# --- rendering -----------------------------------------------------------------------------


def render_text(plan: Plan, lang: str = "en") -> str:
    """The terminal table (rendering lives in cloudexit.plan.render)."""
    from cloudexit.plan.render import render_text as render

    return render(plan, lang)


def render_markdown(plan: Plan, lang: str = "en") -> str:
    from cloudexit.plan.render import render_markdown as render

    return render(plan, lang)


def render_html(plan: Plan, lang: str = "en") -> str:
    from cloudexit.plan.render import render_html as render

    return render(plan, lang)
