"""The link evidence as figures: throughput against the plan and the limit, errors by hour of
day, outages, the worst hours, and the numbers of a plain-language summary.

`link_facts(conn, since, until)` reads `link_series` and `link_outages` (cloudexit/state/
linkseries.py) and nothing else but the plan's expected rate: the link report (`linkreport`),
the audit's digest and the live page all show these same figures. Times of day are the local
time of the machine the report is made on (the hospital's clock); instants are also given as
Unix seconds. Nothing here names an object, a study or a patient.
"""

from __future__ import annotations

import json
import sqlite3
from collections import Counter, defaultdict
from datetime import datetime
from typing import Any

from cloudexit.state.linkseries import COUNTS, ERROR_KINDS, TTFB_BOUNDS_MS, percentile

FORMAT = "cloudexit.link-report/1"
CLINIC_HOURS = (8, 18)  # local hours counted as clinic hours in the summary: 08:00 to 18:00
_HIST = [f"ttfb_{i}" for i in range(len(TTFB_BOUNDS_MS) + 1)]
_ERRS = [f"err_{k}" for k in ERROR_KINDS]


def _q(conn: sqlite3.Connection, sql: str, params: Any = ()) -> sqlite3.Cursor:
    cur = conn.cursor()
    cur.row_factory = sqlite3.Row  # type: ignore[assignment]
    return cur.execute(sql, params)


def bucket_for(span_s: float) -> int:
    """Chart interval: about 100 to 400 bars whatever the window."""
    for bucket in (60, 300, 900, 3600, 6 * 3600):
        if span_s <= bucket * 400:
            return bucket
    return 86400


def local(ts: float | None) -> str | None:
    return None if ts is None else datetime.fromtimestamp(ts).astimezone().isoformat(timespec="seconds")


def plan_rate(conn: sqlite3.Connection) -> float | None:
    """The plan's expected throughput in bytes/s (None without a plan)."""
    row = conn.execute("SELECT value FROM meta WHERE key = 'plan'").fetchone()
    if not row or not row[0]:
        return None
    try:
        rate = json.loads(row[0])["link"]["throughput_bytes_per_s"]["expected"]
    except (KeyError, TypeError, ValueError):
        return None
    return float(rate) if rate else None


def _window(conn: sqlite3.Connection, since: float | None, until: float | None) -> tuple[float, float]:
    lo, hi = conn.execute("SELECT min(ts), max(ts + span) FROM link_series").fetchone()
    first = conn.execute("SELECT min(started), max(coalesce(ended, started)) FROM link_outages").fetchone()
    lo = min(x for x in (lo, first[0]) if x is not None) if (lo or first[0]) else None
    hi = max(x for x in (hi, first[1]) if x is not None) if (hi or first[1]) else None
    start = since if since is not None else (lo if lo is not None else 0.0)
    end = until if until is not None else (hi if hi is not None else start + 60)
    return float(start), float(max(end, start + 60))


def outages(conn: sqlite3.Connection, since: float, until: float, now: float | None = None) -> list[dict[str, Any]]:
    """Outages that overlap the window. An open one of a run no longer alive ends at the run's
    last heartbeat (its true end is unknown); of a live run, `now`."""
    rows = _q(
        conn, "SELECT o.*, r.heartbeat_at FROM link_outages o LEFT JOIN migration_runs r ON r.id = o.run_id "
        "WHERE o.started < ? AND coalesce(o.ended, ?) >= ? ORDER BY o.started", (until, until, since)).fetchall()
    found = []
    for r in rows:
        ended, still = r["ended"], r["ended"] is None
        if ended is None:
            beat = datetime.fromisoformat(r["heartbeat_at"]).timestamp() if r["heartbeat_at"] else None
            ended = max(r["started"], now if now is not None else (beat or r["started"]))
        found.append({"id": r["id"], "source": r["source"], "run": r["run_id"], "start": r["started"],
                      "end": ended, "seconds": round(ended - r["started"], 1), "cause": r["cause"],
                      "seen": r["detail"], "open": still,
                      "start_local": local(r["started"]), "end_local": local(ended)})
    return found


def link_facts(conn: sqlite3.Connection, since: float | None = None, until: float | None = None,
               now: float | None = None, bucket: int | None = None) -> dict[str, Any]:
    """Every figure of the link report, for the window [since, until) (default: all recorded)."""
    start, end = _window(conn, since, until)
    bucket = bucket or bucket_for(end - start)
    plan = plan_rate(conn)
    sums = ", ".join(f"sum({c}) AS {c}" for c in COUNTS)
    totals: Counter[str] = Counter()
    points: dict[int, dict[str, Any]] = {}
    hours: dict[int, Counter[str]] = defaultdict(Counter)  # local hour of day
    clock_hours: dict[int, Counter[str]] = defaultdict(Counter)  # each hour of the window
    for r in _q(conn, f"SELECT ts, span, max(bwlimit) AS bwlimit, {sums} FROM link_series "
                          "WHERE ts >= ? AND ts < ? GROUP BY ts, span ORDER BY ts",
                          (start - start % 60, end)):
        row = dict(r)
        counts = {c: row[c] or 0 for c in COUNTS}
        totals.update(counts)
        slot = int(row["ts"] - (row["ts"] - start) % bucket) if row["span"] < bucket else int(row["ts"])
        p = points.setdefault(slot, {"ts": slot, "counts": Counter(), "bwlimit": None, "span": max(bucket, row["span"])})
        p["counts"].update(counts)
        if row["bwlimit"]:
            p["bwlimit"] = max(p["bwlimit"] or 0, row["bwlimit"])
        hour = datetime.fromtimestamp(row["ts"]).hour
        hours[hour].update(counts)
        hours[hour]["seconds"] += row["span"]
        clock = int(row["ts"]) - int(row["ts"]) % 3600
        clock_hours[clock].update(counts)
        clock_hours[clock]["seconds"] += row["span"]
    found = outages(conn, start, end, now)
    for o in found:  # outage time per local hour of day, and per hour of the window
        t = o["start"]
        while t < o["end"]:
            edge = min(o["end"], (int(t) // 3600 + 1) * 3600)
            hours[datetime.fromtimestamp(t).hour]["outage_seconds"] += edge - t
            clock_hours[int(t) - int(t) % 3600]["outage_seconds"] += edge - t
            t = edge
    series = [_point(p) for _, p in sorted(points.items())]
    by_hour = [_hour(h, hours.get(h, Counter())) for h in range(24)]
    # The worst hours: the most time without a link, then the most errors, then the slowest.
    worst = sorted(clock_hours.items(), key=lambda kv: (-kv[1]["outage_seconds"], -_errors(kv[1]),
                                                        _rate(kv[1]) or 0.0))[:5]
    worst_hours = [{"hour": ts, "hour_local": local(ts), "rate": _rate(c), "errors": _errors(c),
                    "down_seconds": round(min(c["outage_seconds"], 3600.0), 1),
                    "errors_by_kind": {k: c[f"err_{k}"] for k in ERROR_KINDS if c[f"err_{k}"]}}
                   for ts, c in worst if c["outage_seconds"] or _errors(c)]
    return {
        "format": FORMAT,
        "window": {"since": start, "until": end, "since_local": local(start), "until_local": local(end),
                   "bucket_s": bucket},
        "plan_bytes_per_s": plan,
        "clinic_hours": list(CLINIC_HOURS),
        "ttfb_bounds_ms": list(TTFB_BOUNDS_MS),
        "totals": {
            "bytes": totals["bytes"], "objects": totals["objects"],
            "requests": {k: totals[f"{k}_requests"] for k in ("get", "head", "list")},
            "errors": {k: totals[f"err_{k}"] for k in ERROR_KINDS},
            "ttfb_p50_ms": percentile([totals[h] for h in _HIST], 0.5),
            "ttfb_p95_ms": percentile([totals[h] for h in _HIST], 0.95),
            "rate_per_connection": totals["bytes"] / totals["conn_seconds"] if totals["conn_seconds"] else None,
        },
        "series": series,
        "by_hour_of_day": by_hour,
        "outages": found,
        "worst_hours": worst_hours,
        "summary": _summary(found, hours, plan),
    }


def _errors(c: Counter[str]) -> int:
    return sum(c[e] for e in _ERRS)


def _rate(c: Counter[str]) -> float | None:
    """Bytes/s while connected (outage time left out); None: nothing moved."""
    seconds = c["seconds"] - c["down_seconds"]
    return c["bytes"] / seconds if seconds > 0 and c["bytes"] else None


def _point(p: dict[str, Any]) -> dict[str, Any]:
    c: Counter[str] = p["counts"]
    hist = [c[h] for h in _HIST]
    return {"ts": p["ts"], "seconds": p["span"], "bytes": c["bytes"], "rate": c["bytes"] / p["span"],
            "objects": c["objects"],
            "requests": {k: c[f"{k}_requests"] for k in ("get", "head", "list")},
            "errors": {k: c[f"err_{k}"] for k in ERROR_KINDS},
            "ttfb_p50_ms": percentile(hist, 0.5), "ttfb_p95_ms": percentile(hist, 0.95),
            "rate_per_connection": c["bytes"] / c["conn_seconds"] if c["conn_seconds"] else None,
            "down_seconds": round(c["down_seconds"], 1), "bwlimit": p["bwlimit"]}


def _hour(hour: int, c: Counter[str]) -> dict[str, Any]:
    requests = c["get_requests"] + c["head_requests"] + c["list_requests"]
    errors = _errors(c)
    return {"hour": hour, "seconds": c["seconds"], "requests": requests, "errors": errors,
            "error_rate": errors / (requests + errors) if requests + errors else None,
            "errors_by_kind": {k: c[f"err_{k}"] for k in ERROR_KINDS},
            "rate": _rate(c), "outage_seconds": round(c["outage_seconds"], 1)}


def _summary(found: list[dict[str, Any]], hours: dict[int, Counter[str]], plan: float | None) -> dict[str, Any]:
    """The figures of the plain-language summary (the words are the renderer's)."""
    starts = Counter(datetime.fromtimestamp(o["start"]).hour for o in found)
    # The two-hour stretch of the day in which most outages began.
    peak = max(range(24), key=lambda h: (starts[h] + starts[(h + 1) % 24], -h)) if found else None
    lo, hi = CLINIC_HOURS
    clinic: Counter[str] = Counter()
    for h in range(lo, hi):
        clinic.update(hours.get(h, Counter()))
    rate = _rate(clinic)
    causes = Counter(o["cause"] for o in found)
    return {
        "outages": len(found),
        "outage_seconds": round(sum(o["seconds"] for o in found), 1),
        "longest_seconds": max((o["seconds"] for o in found), default=0.0),
        "main_cause": causes.most_common(1)[0][0] if causes else None,
        "peak_start_hour": peak,
        "peak_outages": (starts[peak] + starts[(peak + 1) % 24]) if peak is not None else 0,
        "clinic_rate": rate,
        "clinic_share_of_plan": rate / plan if rate and plan else None,
    }
