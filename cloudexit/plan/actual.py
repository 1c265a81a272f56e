"""The plan meets the link: what each migration run did, minute by minute, against the plan.

Reads the per-minute link series (`link_series`, source `migrate`: cloudexit/state/
linkseries.py), the runs (`migration_runs`) and the plans made (`plan.made` events, each with the
plan's rate model, see `Timeline.rate_model`). Two uses:

- `plan_windows`: per run and per stretch of constant bandwidth limit (a "window"), the rate the
  plan in force at the time expected under that limit, the rate achieved, and the error of the
  plan's time for the bytes the window moved (+: the plan expected it to take longer).
- `steady_minutes`: the minutes that show what the link itself does (whole minutes of a run, not
  its first ones, not in an outage, not held by the bandwidth limit), for `plan --recalibrate`.

A minute's seconds are those inside its run (runs start and end mid-minute), less the seconds
the link was down. A minute in which a live `migrate --bwlimit` changed the limit carries two
limits' traffic: it counts for neither window's rate. Nothing here names an object or a patient.
"""

from __future__ import annotations

import json
import sqlite3
from dataclasses import asdict, dataclass, field
from datetime import datetime
from typing import Any

from cloudexit.plan.timeline import planned_rate
from cloudexit.state.linkseries import HOUR

STARTUP_S = 10.0  # a minute that begins this soon after its run started holds the start-up
LIMITED_SHARE = 0.9  # a minute at this share of its bandwidth limit or more was held by it
DEFAULT_STARTUP_S = 1.5  # the plan's start-up estimate when the plan does not say (old plans)


@dataclass
class Minute:
    ts: int
    span: int
    run: int
    bytes: int
    seconds: float  # inside the run, outage time left out
    down_seconds: float
    bwlimit: int | None
    first: bool = False  # the run's start-up
    last: bool = False  # the run's tail (its last minute)
    mixed: bool = False  # the limit changed inside this minute (live --bwlimit)

    @property
    def rate(self) -> float:
        return self.bytes / self.seconds if self.seconds > 0 else 0.0

    @property
    def limited(self) -> bool:
        return self.bwlimit is not None and (self.bwlimit == 0 or self.rate >= LIMITED_SHARE * self.bwlimit)


@dataclass
class Window:
    run: int
    start: float
    end: float
    bwlimit: int | None
    bytes: int = 0
    seconds: float = 0.0
    minutes: int = 0
    mixed_minutes: int = 0  # left out of the rate: the limit changed inside them
    rate: float | None = None
    planned_rate: float | None = None
    planned_seconds: float | None = None
    error: float | None = None
    plan_made_at: str | None = None
    members: list[Minute] = field(default_factory=list, repr=False)


def _unix(text: str | None) -> float | None:
    return datetime.fromisoformat(text).timestamp() if text else None


def _runs(conn: sqlite3.Connection) -> list[tuple[int, float, float]]:
    """(id, start, end) of every run, Unix seconds. The times are kept to the second, cut: a
    run went on for up to a second after its last heartbeat says."""
    rows = conn.execute("SELECT id, started_at, coalesce(finished_at, heartbeat_at, started_at) "
                        "FROM migration_runs ORDER BY id").fetchall()
    return [(r[0], _unix(r[1]) or 0.0, (_unix(r[2]) or 0.0) + 1.0) for r in rows]


def _events(conn: sqlite3.Connection, kind: str) -> list[tuple[float, dict[str, Any]]]:
    return [(_unix(at) or 0.0, json.loads(detail or "{}"))
            for at, detail in conn.execute("SELECT at, detail FROM events WHERE kind = ? ORDER BY id", (kind,))]


def run_minutes(conn: sqlite3.Connection, since: float | None = None, until: float | None = None) -> list[Minute]:
    """The migrate minutes of every run (overlapping [since, until)), in time order."""
    changes = [(at, d.get("run")) for at, d in _events(conn, "migrate.bwlimit") if d.get("live")]
    found: list[Minute] = []
    for run, start, end in _runs(conn):
        if end <= start or (since is not None and end < since) or (until is not None and start >= until):
            continue
        # `ts > start - HOUR` bounds the index range (no row spans more than an hour): without
        # it each run read every row before its end, so R runs cost R x the whole series.
        rows = conn.execute(
            "SELECT ts, span, bytes, down_seconds, bwlimit FROM link_series WHERE source = 'migrate' "
            "AND ts > ? AND ts + span > ? AND ts < ? ORDER BY ts", (start - HOUR, start, end)).fetchall()
        previous: int | str | None = "none"
        for i, (ts, span, nbytes, down, bwlimit) in enumerate(rows):
            inside = min(ts + span, end) - max(ts, start)
            m = Minute(ts, span, run, nbytes, max(inside - down, 0.0), down, bwlimit,
                       first=ts < start + STARTUP_S, last=i == len(rows) - 1)
            m.mixed = previous != "none" and previous != bwlimit and any(
                c_run == run and ts < at < ts + span for at, c_run in changes)
            previous = bwlimit
            found.append(m)
    return found


def _plans(conn: sqlite3.Connection) -> list[tuple[float, str, dict[str, float]]]:
    """(made at, made at as text, rate model) of every plan that recorded its rate model; an
    older DB's stored plan (no event with a model) counts from the start of time."""
    plans = [(at, datetime.fromtimestamp(at).astimezone().isoformat(timespec="seconds"), d["rate_model"])
             for at, d in _events(conn, "plan.made") if d.get("rate_model")]
    if plans:
        return plans
    row = conn.execute("SELECT value FROM meta WHERE key = 'plan'").fetchone()
    if not row or not row[0]:
        return []
    try:
        link = json.loads(row[0])["link"]
        model = link.get("rate_model") or {"cap_bytes_per_s": float(link["throughput_bytes_per_s"]["expected"]),
                                           "limit_share": 1.0, "startup_s": DEFAULT_STARTUP_S}
    except (KeyError, TypeError, ValueError):
        return []
    return [(0.0, "", model)]


def _in_force(plans: list[tuple[float, str, dict[str, float]]], at: float) -> tuple[str, dict[str, float]] | None:
    """The last plan made before `at`; a window before any plan is compared with the first."""
    if not plans:
        return None
    before = [p for p in plans if p[0] <= at]
    chosen = before[-1] if before else plans[0]
    return chosen[1], chosen[2]


def plan_windows(conn: sqlite3.Connection, since: float | None = None,
                 until: float | None = None) -> dict[str, Any]:
    """Per run, and per window of constant bandwidth limit in it: planned and achieved rate and
    the plan's error. JSON-ready."""
    try:
        minutes = run_minutes(conn, since, until)
    except sqlite3.OperationalError:  # a DB from before the link series (schema 11)
        return {"runs": [], "windows": []}
    plans = _plans(conn)
    windows: list[Window] = []
    for m in minutes:
        w = windows[-1] if windows else None
        if w is None or w.run != m.run or w.bwlimit != m.bwlimit:
            w = Window(m.run, m.ts, m.ts + m.span, m.bwlimit)
            windows.append(w)
        w.members.append(m)
        w.end = m.ts + m.span
    spans = {run: (start, end) for run, start, end in _runs(conn)}
    starts = {run: start for run, (start, _) in spans.items()}
    for w in windows:
        clean = [m for m in w.members if not m.mixed and m.seconds > 0] or [m for m in w.members if m.seconds > 0]
        w.minutes, w.mixed_minutes = len(w.members), sum(m.mixed for m in w.members)
        w.start, w.end = max(w.start, spans[w.run][0]), min(w.end, spans[w.run][1])
        plan = _in_force(plans, w.start)
        startup = 0.0
        if plan is not None:
            w.plan_made_at = plan[0]
            # The run's start-up, before its first GET: out of the achieved rate, as the plan
            # counts it apart from the rate.
            if any(m.first and m.ts <= starts[w.run] for m in clean):
                startup = float(plan[1].get("startup_s", DEFAULT_STARTUP_S))
        w.bytes = sum(m.bytes for m in clean)
        w.seconds = max(sum(m.seconds for m in clean) - startup, 0.0)
        if w.seconds <= 0 or w.bytes <= 0:
            continue
        w.rate = w.bytes / w.seconds
        if plan is not None and w.bwlimit != 0:
            w.planned_rate = planned_rate(plan[1], w.bwlimit)
            if w.planned_rate > 0:
                w.planned_seconds = w.bytes / w.planned_rate
                w.error = w.planned_seconds / w.seconds - 1
    runs = []
    for run in sorted({w.run for w in windows}):
        mine = [w for w in windows if w.run == run and w.rate is not None]
        planned = [w for w in mine if w.planned_seconds is not None]
        nbytes, seconds = sum(w.bytes for w in mine), sum(w.seconds for w in mine)
        p_seconds, p_actual = sum(w.planned_seconds or 0.0 for w in planned), sum(w.seconds for w in planned)
        runs.append({"run": run, "windows": len(mine), "bytes": nbytes, "seconds": round(seconds, 1),
                     "rate": nbytes / seconds if seconds else None,
                     "planned_seconds": round(p_seconds, 1) if planned else None,
                     "error": p_seconds / p_actual - 1 if planned and p_actual else None})
    return {"runs": runs, "windows": [_window_dict(w) for w in windows if w.rate is not None]}


def _window_dict(w: Window) -> dict[str, Any]:
    data = {k: v for k, v in asdict(w).items() if k != "members"}
    data["seconds"] = round(w.seconds, 1)
    data["start_local"] = datetime.fromtimestamp(w.start).astimezone().isoformat(timespec="seconds")
    data["end_local"] = datetime.fromtimestamp(w.end).astimezone().isoformat(timespec="seconds")
    return data


@dataclass
class Steady:
    """The minutes `plan --recalibrate` uses, and what it left out (counts of minutes)."""

    used: list[Minute]
    startup: int = 0
    tail: int = 0
    outage: int = 0
    limited: int = 0
    mixed: int = 0
    partial: int = 0
    limited_only: bool = False  # no minute was free of the limit: these are the limiter's

    def describe(self) -> str:
        """Which minutes, in words, for the plan's text."""
        first, last = self.used[0].ts, self.used[-1].ts + self.used[-1].span
        when = (f"{datetime.fromtimestamp(first).astimezone():%Y-%m-%d %H:%M}-"
                f"{datetime.fromtimestamp(last).astimezone():%H:%M %Z}").strip()
        runs = sorted({m.run for m in self.used})
        left = [f"{n} {what}" for n, what in (
            (self.startup, "start-up"), (self.tail, "last of a run"), (self.outage, "in an outage"),
            (self.limited, "held by the bandwidth limit"), (self.mixed, "with a limit change"),
            (self.partial, "partial")) if n]
        text = (f"{len(self.used)} steady minute(s) of the link series, {when}, run(s) "
                f"{', '.join(map(str, runs))}")
        if left:
            text += "; left out: " + ", ".join(left)
        if self.limited_only:
            text += "; every minute was held by the bandwidth limit: this is the limiter's rate"
        return text


def steady_minutes(conn: sqlite3.Connection) -> Steady | None:
    """The minutes that show the link's own steady rate; None: the series holds no minute of a
    run that moved data (a DB from before the link series, or no run yet)."""
    try:
        minutes = [m for m in run_minutes(conn) if m.span == 60 and m.bytes > 0]
    except sqlite3.OperationalError:
        return None
    if not minutes:
        return None
    steady = Steady(used=[])
    held = []
    for m in minutes:
        if m.first:
            steady.startup += 1
        elif m.last:
            steady.tail += 1
        elif m.down_seconds > 0:
            steady.outage += 1
        elif m.mixed:
            steady.mixed += 1
        elif m.seconds < m.span - 1:
            steady.partial += 1
        elif m.limited:
            steady.limited += 1
            held.append(m)
        else:
            steady.used.append(m)
    if not steady.used and held:
        steady.used, steady.limited, steady.limited_only = held, 0, True
    return steady if steady.used else None
