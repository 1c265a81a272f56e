"""Link evidence: what migrate and inventory saw of the link, minute by minute.

`LinkRecorder` is fed by the process that owns the state DB (the migrate engine, the inventory)
with what it already learns: bytes and requests (the egress meters), per-object results (time
to first byte, the errors a worker retried past and the last one), the connections busy, the
bandwidth limit in force, and the link monitor's judgement (down, up). It keeps the current
minutes in memory and adds them to `link_series` in the caller's transaction (`flush`), so the
table grows by about one row a minute per source. Minutes older than `KEEP_MINUTES_S` are rolled
up into hours (`roll_up`): a month of minutes, then 24 rows a day.

Time to first byte is a fixed histogram per interval (`TTFB_BOUNDS_MS`), never raw samples: p50
and p95 come from it (`percentile`), hours add up like minutes. Errors are counted by kind as the
link report names them (`classify`); what is stored of an error is its exception or HTTP status
(`seen`), never the object key it was about (keys can carry patient names).
"""

from __future__ import annotations

import re
import sqlite3
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

MINUTE, HOUR = 60, 3600
KEEP_MINUTES_S = 30 * 86400  # minute rows kept this long, then rolled up into hours
# Upper bounds (ms) of the time-to-first-byte buckets; the last bucket is everything slower.
TTFB_BOUNDS_MS = (25, 50, 100, 200, 400, 800, 1600, 3200, 6400)
ERROR_KINDS = ("timeout", "reset", "5xx", "tls", "dns", "refused", "other")
COUNTS = ("bytes", "objects", "get_requests", "head_requests", "list_requests",
          *(f"err_{k}" for k in ERROR_KINDS), *(f"ttfb_{i}" for i in range(len(TTFB_BOUNDS_MS) + 1)),
          "conn_seconds", "down_seconds")
# Error kinds of the transfer layer that say nothing about the link (the object changed, is
# gone or archived, the credentials or the disk).
_NOT_THE_LINK = {"changed", "gone", "archived", "credentials", "denied", "sse-c", "permanent",
                 "disk", "cancelled"}
_HTTP = re.compile(r"HTTP(?:/\d\.\d)? (\d{3})(?: (\w+))?")
_EXC = re.compile(r"\b([A-Za-z]*(?:Error|Exception|Disconnected|timeout|gaierror|Timeout))\b(.*)$")


def classify(kind: str | None, detail: str | None) -> str | None:
    """The kind a failed request counts as (ERROR_KINDS); None: not a link error."""
    text = detail or ""
    if kind in _NOT_THE_LINK:
        return None
    if kind == "tls" or "SSL" in text or "TLS" in text or "certificate" in text:
        return "tls"
    match = _HTTP.search(text)
    if match:
        status, code = int(match.group(1)), match.group(2) or ""
        if status >= 500 or status == 429 or code in ("SlowDown", "Throttling", "RequestTimeout"):
            return "5xx"
        return None if kind != "transient" else "other"
    lowered = text.lower()
    if "refused" in lowered:
        return "refused"
    if "gaierror" in text or "name or service" in lowered or "name resolution" in lowered:
        return "dns"
    if "timed out" in lowered or "timeout" in lowered or "no answer in time" in lowered:
        return "timeout"
    if any(w in text for w in ("Reset", "reset", "RemoteDisconnected", "BrokenPipe", "Aborted",
                               "connection lost", "closed", "body cut")):
        return "reset"
    return "other" if kind in ("unreachable", "cut", "transient", "corrupt", None) else None


def seen(detail: str | None) -> str | None:
    """What is kept of an error: its HTTP status and code, or its exception and message."""
    if not detail:
        return None
    match = _HTTP.search(detail)
    if match:
        return match.group(0)
    found = _EXC.search(detail)
    return (found.group(1) + found.group(2))[:160] if found else None


def percentile(hist: list[int], q: float) -> float | None:
    """The q-quantile (0..1) of a TTFB histogram, in ms: the upper bound of the bucket it falls
    in (the slowest bucket reports twice the last bound). None: no samples."""
    total = sum(hist)
    if not total:
        return None
    need = q * total
    running = 0
    for i, n in enumerate(hist):
        running += n
        if running >= need and n:
            return float(TTFB_BOUNDS_MS[i] if i < len(TTFB_BOUNDS_MS) else 2 * TTFB_BOUNDS_MS[-1])
    return float(2 * TTFB_BOUNDS_MS[-1])


def ttfb_bucket(seconds: float) -> int:
    ms = seconds * 1000
    for i, bound in enumerate(TTFB_BOUNDS_MS):
        if ms < bound:
            return i
    return len(TTFB_BOUNDS_MS)


@dataclass
class _Minute:
    counts: defaultdict[str, float] = field(default_factory=lambda: defaultdict(float))
    bwlimit: int | None = None


class LinkRecorder:
    """One source's link evidence, kept per minute until `flush` writes it (engine thread only)."""

    def __init__(self, source: str, run_id: int | None = None,
                 clock: Callable[[], float] = time.time) -> None:
        self.source, self.run_id, self.clock = source, run_id, clock
        self.minutes: dict[int, _Minute] = {}
        self.bwlimit: int | None = None
        self.outage: int | None = None  # link_outages.id of the open outage
        self.failures: Counter[str] = Counter()  # causes since the last answer
        self.examples: dict[str, str | None] = {}
        self.first_failure: float | None = None
        self.down_from = 0.0  # when the open outage began
        self._last_busy: float | None = None
        self._next_roll_up = 0.0

    def _minute(self) -> _Minute:
        ts = int(self.clock()) // MINUTE * MINUTE
        m = self.minutes.get(ts)
        if m is None:
            m = self.minutes[ts] = _Minute(bwlimit=self.bwlimit)
        return m

    # -- what was seen ---------------------------------------------------------------------------
    def traffic(self, nbytes: int = 0, get: int = 0, head: int = 0, list_: int = 0, objects: int = 0) -> None:
        c = self._minute().counts
        c["bytes"] += nbytes
        c["get_requests"] += get
        c["head_requests"] += head
        c["list_requests"] += list_
        c["objects"] += objects

    def ttfb(self, seconds: float | None) -> None:
        if seconds is not None and seconds >= 0:
            self._minute().counts[f"ttfb_{ttfb_bucket(seconds)}"] += 1

    def error(self, kind: str | None, detail: str | None) -> str | None:
        """Count one failed request; returns the kind it counted as (None: not the link's)."""
        cause = classify(kind, detail)
        if cause is None:
            return None
        self._minute().counts[f"err_{cause}"] += 1
        if cause != "5xx":  # an answer, even a 503, means the link carried it
            if self.first_failure is None:
                self.first_failure = self.clock()
            self.failures[cause] += 1
            self.examples.setdefault(cause, seen(detail))
        return cause

    def answered(self) -> None:
        """The endpoint answered: a run of failures (if any) is over."""
        if self.outage is None:
            self.failures.clear()
            self.examples.clear()
            self.first_failure = None

    def result(self, r: Any) -> None:
        """A migrate worker's result: its errors (retried ones too), TTFB and outcome."""
        for kind, detail in getattr(r, "faults", None) or ():
            self.error(kind, detail)
        self.ttfb(getattr(r, "ttfb", None))
        if r.outcome in ("verified", "quarantined"):
            self._minute().counts["objects"] += 1
            if not getattr(r, "local", False):
                self.answered()

    def busy(self, connections: int, bwlimit: int | None) -> None:
        """Connections in use since the last call, and the limit in force now."""
        now = self.clock()
        self.bwlimit = int(bwlimit) if bwlimit else None
        m = self._minute()
        m.bwlimit = self.bwlimit
        if self._last_busy is not None:
            spent = max(0.0, min(now - self._last_busy, 60.0))
            down = 0.0
            if self.outage is not None:
                down = min(spent, max(0.0, now - max(self._last_busy, self.down_from)))
                m.counts["down_seconds"] += down
            m.counts["conn_seconds"] += connections * (spent - down)
        self._last_busy = now

    # -- the link monitor's judgement -------------------------------------------------------------
    def down(self, tx: sqlite3.Connection, kind: str | None = None, detail: str | None = None) -> None:
        """The link is judged down: open an outage from the first failure seen."""
        if self.outage is not None:
            return
        if kind is not None and not self.failures:
            self.error(kind, detail)
        cause, example = self._cause()
        started = self.down_from = self.first_failure or self.clock()
        self.outage = tx.execute(
            "INSERT INTO link_outages(source, run_id, started, cause, detail) VALUES (?, ?, ?, ?, ?)",
            (self.source, self.run_id, started, cause, example)).lastrowid

    def up(self, tx: sqlite3.Connection) -> float | None:
        """The link answers again: close the outage; returns its length in seconds."""
        if self.outage is None:
            return None
        cause, example = self._cause()
        ended = self.clock()
        tx.execute("UPDATE link_outages SET ended = ?, cause = ?, detail = ? WHERE id = ?",
                   (ended, cause, example, self.outage))
        started = tx.execute("SELECT started FROM link_outages WHERE id = ?", (self.outage,)).fetchone()[0]
        self.outage = None
        self.answered()
        return ended - started

    def _cause(self) -> tuple[str, str | None]:
        if not self.failures:
            return "other", None
        cause = self.failures.most_common(1)[0][0]
        return cause, self.examples.get(cause)

    # -- into the DB --------------------------------------------------------------------------------
    def flush(self, tx: sqlite3.Connection) -> None:
        """Add the minutes seen so far to `link_series` (in the caller's transaction)."""
        for ts, m in sorted(self.minutes.items()):
            add_row(tx, ts, MINUTE, self.source, m.counts, m.bwlimit)
        current = int(self.clock()) // MINUTE * MINUTE
        self.minutes = {ts: _Minute(bwlimit=m.bwlimit) for ts, m in self.minutes.items() if ts == current}
        if self.clock() >= self._next_roll_up:
            roll_up(tx, self.clock())
            self._next_roll_up = self.clock() + HOUR


def add_row(tx: sqlite3.Connection, ts: int, span: int, source: str, counts: Mapping[str, Any],
            bwlimit: int | None, keep_highest: bool = False) -> None:
    names = ", ".join(COUNTS)
    marks = ", ".join("?" * len(COUNTS))
    adds = ", ".join(f"{c} = {c} + excluded.{c}" for c in COUNTS)
    limit = "max(coalesce(bwlimit, 0), coalesce(excluded.bwlimit, 0))" if keep_highest else "excluded.bwlimit"
    tx.execute(f"INSERT INTO link_series(ts, span, source, {names}, bwlimit) VALUES (?, ?, ?, {marks}, ?) "
               f"ON CONFLICT(ts, span, source) DO UPDATE SET {adds}, bwlimit = nullif({limit}, 0)",
               (ts, span, source, *(counts.get(c, 0) for c in COUNTS), bwlimit))


def roll_up(tx: sqlite3.Connection, now: float, keep_s: int = KEEP_MINUTES_S) -> int:
    """Minutes older than `keep_s` become hours (sums; the highest limit); returns rows removed."""
    cutoff = int(now) - keep_s
    cutoff -= cutoff % HOUR  # whole hours only: an hour is rolled up once, all its minutes at once
    sums = ", ".join(f"sum({c}) AS {c}" for c in COUNTS)
    rows = tx.execute(f"SELECT ts - ts % {HOUR} AS hour, source, {sums}, max(bwlimit) AS bwlimit "
                      f"FROM link_series WHERE span = {MINUTE} AND ts < ? GROUP BY 1, 2", (cutoff,)).fetchall()
    for row in rows:
        values = dict(zip(("hour", "source", *COUNTS, "bwlimit"), row))
        add_row(tx, values["hour"], HOUR, values["source"], values, values["bwlimit"], keep_highest=True)
    return tx.execute(f"DELETE FROM link_series WHERE span = {MINUTE} AND ts < ?", (cutoff,)).rowcount
