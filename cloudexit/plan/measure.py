"""Calibrate the link by doing what `migrate` will do, on a sample, for a few seconds.

The sample is stratified by size class (tiny, CT-sized, medium, large multipart-read objects) in
the proportions the inventory holds, so its mix of requests and bytes is the bucket's. It is
migrated for real, by the migrate engine with migrate's own client, worker processes,
concurrency, range size and verification, into a throwaway archive beside the state DB, until
the sample is done or `seconds` have passed. The steady-state rate is read from the middle of
the run, after start-up and any token-bucket burst and before the tail; per-request latency
is timed separately with a few one-byte ranged GETs. Nothing here is guessed from a formula:
what migrate will do is what is timed. The sample's own cost (bytes and requests) is reported.
"""

from __future__ import annotations

import json
import shutil
import statistics
import tempfile
import time
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Callable

from cloudexit.core.config import MigrateConfig
from cloudexit.core.errors import Interrupted, UsageError
from cloudexit.s3.source import Source
from cloudexit.state.db import State, now
from cloudexit.s3.source import ARCHIVE_CLASSES

# Size classes, by the work an object costs: request-bound, CT slices, single GETs of a few MB
# to the multipart threshold, and ranged reads (the bound is the migrate config's large_object).
SIZE_CLASSES = (("tiny", 0, 64 * 1024), ("small", 64 * 1024, 4 * 2**20), ("medium", 4 * 2**20, None))
STEADY_FROM, STEADY_TO = 0.5, 0.95  # the steady state: between these shares of the bytes moved
WINDOW_S = 1.0  # the spread of the rate is read over windows this long
MIN_SPREAD = 0.10  # a measured rate is never given tighter than +-10%
LATENCY_PROBES = 12
INTERPRETER_START_S = 0.5  # the command's own start (Python and imports), before the engine
# Archive tiers cannot be read without a restore: never sampled.
_NEEDS_RESTORE = tuple(sorted(ARCHIVE_CLASSES))  # not sampled: a restore takes hours


@dataclass
class Measurement:
    measured_at: str
    objects: int
    bytes: int
    get_requests: int
    seconds: float  # the whole measurement, start-up included
    latency_s: float  # median time to first byte of a one-byte ranged GET
    throughput_low: float  # bytes/s: 10th percentile of the steady-state windows
    throughput_expected: float  # bytes/s: the steady state
    throughput_high: float  # bytes/s: 90th percentile of the windows
    concurrency: int
    latency_p90_s: float = 0.0
    steady_seconds: float = 0.0  # how long the steady state was observed
    complete: bool = True  # the whole sample moved before the time limit
    startup_s: float = 0.0  # seconds a run takes before its first GET
    method: str = "engine"  # engine: migrate timed on a sample; runs: recalibrated from the
    # migration's own runs; boto3: older DBs
    classes: dict[str, dict[str, int]] = field(default_factory=dict)  # sample per size class
    basis: str = ""  # what the figures were taken from, in words (recalibration: which minutes)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class Sample:
    keys: list[str]
    bytes: int
    classes: dict[str, dict[str, int]]  # class -> {"objects", "bytes", "inventory_objects", ...}


def _class_case(large_object: int) -> tuple[str, list[Any]]:
    """An SQL CASE naming each object's size class, and its parameters."""
    parts, params = [], []
    for name, _low, high in SIZE_CLASSES:
        top = high if high is not None else large_object
        parts.append("WHEN size < ? THEN ?")
        params += [top, name]
    return "CASE " + " ".join(parts) + " ELSE 'large' END", params


def pick_sample(state: State, max_bytes: int, large_object: int,
                max_objects: int = 20_000) -> Sample:
    """A random sample whose bytes and object counts per size class are the inventory's,
    scaled to `max_bytes` (and `max_objects`): one pass for the totals, one for the draw."""
    readable = ("status = 'present' AND size > 0 AND upper(coalesce(storage_class, 'STANDARD')) "
                f"NOT IN ({', '.join('?' * len(_NEEDS_RESTORE))})")
    case, case_params = _class_case(large_object)
    totals = {row["c"]: (row["n"], row["b"]) for row in state.query(
        f"SELECT {case} AS c, count(*) AS n, sum(size) AS b FROM objects WHERE {readable} GROUP BY 1",
        (*case_params, *_NEEDS_RESTORE))}
    if not totals:
        raise UsageError("the inventory holds no object that can be read now: nothing to measure",
                         hint="run `cloudexit inventory s3://BUCKET` first (objects in archive "
                              "tiers need a restore and are not sampled)")
    all_objects = sum(n for n, _ in totals.values())
    all_bytes = sum(b for _, b in totals.values())
    share = min(1.0, max_bytes / all_bytes, max_objects / all_objects)
    # Per class: how many objects to draw so that its bytes get their share.
    wanted = {c: max(1, round(n * share)) if b * share >= (b / n) / 2 else 0
              for c, (n, b) in totals.items()}
    if not any(wanted.values()):  # every class too big for the budget: one of the smallest
        smallest = min(totals, key=lambda c: totals[c][1] / totals[c][0])
        wanted[smallest] = 1
    keys: list[str] = []
    classes: dict[str, dict[str, int]] = {}
    for cls, count in wanted.items():
        n, b = totals[cls]
        classes[cls] = {"inventory_objects": n, "inventory_bytes": b, "objects": 0, "bytes": 0}
        if not count:
            continue
        # A Bernoulli draw a little above the wanted share, trimmed: one pass, no sort of the
        # whole class (ORDER BY random() over 100 M rows is a sort the plan cannot afford).
        per_million = min(1_000_000, int(1_000_000 * min(1.0, 1.5 * count / n)) + 1)
        rows = state.query(
            f"SELECT key, size FROM objects WHERE {readable} AND {case} = ? "
            "AND abs(random()) % 1000000 < ? LIMIT ?",
            (*_NEEDS_RESTORE, *case_params, cls, per_million, count))
        if not rows:
            rows = state.query(f"SELECT key, size FROM objects WHERE {readable} AND {case} = ? LIMIT 1",
                               (*_NEEDS_RESTORE, *case_params, cls))
        keys += [r["key"] for r in rows]
        classes[cls]["objects"] = len(rows)
        classes[cls]["bytes"] = sum(r["size"] for r in rows)
    return Sample(keys, sum(c["bytes"] for c in classes.values()), classes)


def _sample_db(state: State, sample: Sample, path: Path) -> State:
    """A state DB holding just the sample, as if inventoried: what the engine needs to run."""
    copy = State(path, create=True)
    conn = copy.conn
    conn.execute("ATTACH DATABASE ? AS src", (str(state.path),))
    try:
        with copy.transaction() as tx:
            tx.execute("INSERT OR REPLACE INTO meta SELECT * FROM src.meta WHERE key IN "
                       "('source_url', 'endpoint_url', 'region')")
            tx.execute("INSERT INTO inventory_rounds SELECT * FROM src.inventory_rounds "
                       "WHERE status = 'complete' ORDER BY id DESC LIMIT 1")
            tx.execute("CREATE TEMP TABLE cx_sample(key TEXT PRIMARY KEY)")
            tx.executemany("INSERT OR IGNORE INTO cx_sample VALUES (?)", ((k,) for k in sample.keys))
            tx.execute("INSERT INTO objects SELECT * FROM src.objects WHERE key IN (SELECT key FROM cx_sample)")
    finally:
        conn.execute("DETACH DATABASE src")
    return copy


def steady_rate(samples: list[tuple[float, int]]) -> tuple[float, float, list[float]]:
    """(bytes/s, seconds observed, per-window rates) between STEADY_FROM and STEADY_TO of the
    bytes: start-up, a token bucket's burst and the tail are left out. `samples` are (time,
    bytes so far), in order; at least two points with bytes are needed."""
    points = [(t, b) for t, b in samples]
    total = points[-1][1] if points else 0
    if total <= 0 or len(points) < 2:
        return 0.0, 0.0, []

    def when(fraction: float) -> float:  # time the byte count crossed `fraction` of the total
        goal = fraction * total
        for (t0, b0), (t1, b1) in zip(points, points[1:]):
            if b1 >= goal:
                return t1 if b1 == b0 else t0 + (t1 - t0) * (goal - b0) / (b1 - b0)
        return points[-1][0]

    start, end = when(STEADY_FROM), when(STEADY_TO)
    if end - start < 0.5:  # too few steps (a few large objects): the whole run after start-up
        first = next(t for t, b in points if b > 0)
        begun = max((t for t, b in points if b == 0 and t < first), default=points[0][0])
        start, end = begun, points[-1][0]
        moved = total
    else:
        moved = int((STEADY_TO - STEADY_FROM) * total)
    seconds = max(end - start, 1e-6)
    return moved / seconds, seconds, _windows([p for p in points if start <= p[0] <= end])


def _windows(points: list[tuple[float, int]], least: float = WINDOW_S) -> list[float]:
    """Rates over consecutive spans of at least `least` seconds (progress arrives in steps,
    as objects finish: shorter spans would read as bursts and stalls that are not there)."""
    rates, (t0, b0) = [], points[0] if points else (0.0, 0)
    for t, b in points[1:]:
        if t - t0 >= least:
            rates.append((b - b0) / (t - t0))
            t0, b0 = t, b
    return rates


def measure_link(state: State, source: Source, config: MigrateConfig | None = None,
                 seconds: float = 20.0, max_bytes: int = 256 * 2**20,
                 progress: Callable[[int], None] | None = None) -> Measurement:
    """Migrate a stratified sample for up to `seconds`, record the result in the state DB and
    return it."""
    config = config or MigrateConfig()
    source.check()
    started = time.monotonic()
    sample = pick_sample(state, max_bytes, config.large_object)
    latencies = _latencies(source, state, sample.keys)
    tick = progress or (lambda n: None)
    work = Path(tempfile.mkdtemp(prefix=".cloudexit-measure-", dir=state.path.parent))
    try:
        points, requests, cut, engine_start = _run_sample(state, source, sample, config, seconds, work, tick)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    rate, steady_s, windows = steady_rate(points)
    moved = points[-1][1] if points else 0
    if rate <= 0:
        raise UsageError("the link measurement moved no data",
                         hint="check `cloudexit migrate` on this bucket, or give --bandwidth")
    low, high = _spread(windows, rate)
    result = Measurement(
        measured_at=now(), objects=len(sample.keys), bytes=moved,
        get_requests=requests + len(latencies), seconds=time.monotonic() - started,
        latency_s=statistics.median(latencies) if latencies else 0.05,
        latency_p90_s=_percentile(sorted(latencies), 0.90) if latencies else 0.05,
        throughput_low=min(low, rate), throughput_expected=rate, throughput_high=max(high, rate),
        concurrency=config.requests_in_flight(), steady_seconds=steady_s, complete=not cut,
        startup_s=engine_start + INTERPRETER_START_S,
        classes=sample.classes)
    state.set_meta(link_measurement=json.dumps(result.to_dict()))
    state.log("plan.measured", **result.to_dict())
    return result


def _spread(rates: list[float], rate: float) -> tuple[float, float]:
    """The low and high ends around `rate`: the 10th and 90th percentile of `rates` (windows or
    minutes), at least +-10% (+-20% from fewer than four)."""
    spread = sorted(rates)
    few = len(spread) < 4
    low = rate * (1 - 2 * MIN_SPREAD) if few else min(_percentile(spread, 0.10), rate * (1 - MIN_SPREAD))
    high = rate * (1 + MIN_SPREAD) if few else max(_percentile(spread, 0.90), rate * (1 + MIN_SPREAD))
    return max(low, rate / 4), high  # a window that caught a stall is not the link's rate for weeks


def _run_sample(state: State, source: Source, sample: Sample, config: MigrateConfig,
                seconds: float, work: Path, tick: Callable[[int], None]
                ) -> tuple[list[tuple[float, int]], int, bool, float]:
    """Run the migrate engine on the sample: (time, bytes) points, GET requests, whether it
    was cut short, and the seconds the engine took to start (to the first dispatch)."""
    from cloudexit.engine.migrate import Migration  # noqa: PLC0415 - the engine, only when measuring
    from cloudexit.stores.filesystem import FilesystemStore  # noqa: PLC0415

    sample_state = _sample_db(state, sample, work / "sample.db")
    points: list[tuple[float, int]] = []
    cut = False
    seen = 0
    started_at: float | None = None
    t0 = time.monotonic()

    def on_progress(p: Any) -> None:
        nonlocal seen, cut, started_at
        clock = time.monotonic()
        if p.in_flight and started_at is None:
            started_at = clock - t0
        # Bytes as they come off the wire (the workers' egress meters, read at every commit),
        # partial objects included: counted per finished object, a dozen 5 MB objects sharing a
        # slow link would show seconds of silence, then all at once.
        moved = p.bytes_downloaded
        points.append((clock - t0, moved))
        tick(moved - seen)
        seen = moved
        if clock - t0 >= seconds and not cut:
            cut = True
            migration.request_stop("the link measurement has enough")

    # Sizes interleaved, so that any stretch of the run has the bucket's mix.
    measured = replace(config, bwlimit=None, progress_interval=0.2, order="mixed")
    archive = work / "archive"
    migration = Migration(sample_state, source, FilesystemStore(archive, layout=config.layout),
                          measured, progress=on_progress)
    try:
        migration.run()
    except Interrupted:
        if not cut:
            raise  # the user's Ctrl-C, not our stop
    row = sample_state.query("SELECT coalesce(sum(get_requests), 0) AS g, "
                             "coalesce(sum(bytes_downloaded), 0) AS b FROM migration_runs")[0]
    sample_state.close()
    if not cut:
        points.append((time.monotonic() - t0, row["b"]))
    return points, row["g"], cut, started_at or 0.0


def _latencies(source: Source, state: State, keys: list[str]) -> list[float]:
    """Seconds to the first byte of one-byte ranged GETs over a kept-alive connection (the
    first request, which also opens the connection, is not counted)."""
    from cloudexit.s3.client import Counters, S3Reader  # noqa: PLC0415

    probe = keys[: LATENCY_PROBES + 1]
    if not probe:
        return []
    endpoint, credentials = source.lean_endpoint()
    reader = S3Reader(endpoint, credentials)
    times: list[float] = []
    try:
        for i, key in enumerate(probe):
            t = time.monotonic()
            resp = reader.request("GET", key, None, {"range": "bytes=0-0"}, Counters())
            resp.read()
            if i and resp.status in (200, 206):
                times.append(time.monotonic() - t)
    except Exception:  # noqa: BLE001 - latency is a detail: the engine run reports real faults
        pass
    finally:
        reader.close()
    return times


def recalibrated(state: State) -> Measurement:
    """The link as the migration's own runs saw it, recorded like a measurement and used by the
    next plans: the steady-state rate of the per-minute link series (`plan.actual.
    steady_minutes`: whole minutes, not a run's first or last, not in an outage, not held by
    the bandwidth limit); without such minutes (runs too short, a DB from before the series),
    bytes downloaded over the runs' active time."""
    from cloudexit.plan.actual import steady_minutes  # noqa: PLC0415

    steady = steady_minutes(state.conn)
    if steady is not None:
        moved, seconds = sum(m.bytes for m in steady.used), sum(m.seconds for m in steady.used)
        rate = moved / seconds
        low, high = _spread([m.rate for m in steady.used], rate)
        result = Measurement(
            measured_at=now(), objects=0, bytes=moved, get_requests=0, seconds=seconds, latency_s=0.05,
            throughput_low=low, throughput_expected=rate, throughput_high=high,
            concurrency=0, steady_seconds=seconds, method="runs", basis=steady.describe(),
            classes={"runs": {"count": len({m.run for m in steady.used}), "minutes": len(steady.used),
                              "limited": int(steady.limited_only)}})
        state.set_meta(link_measurement=json.dumps(result.to_dict()))
        state.log("plan.recalibrated", **result.to_dict())
        return result
    return _recalibrated_from_runs(state)


def _recalibrated_from_runs(state: State) -> Measurement:
    """Bytes downloaded over the runs' active time, less the time the link was down; runs under
    a bandwidth timetable only when there is no other (their rate is the limiter's)."""
    from datetime import datetime  # noqa: PLC0415

    runs = state.query("SELECT id, started_at, finished_at, heartbeat_at, bwlimit, bytes_downloaded, "
                       "get_requests FROM migration_runs WHERE bytes_downloaded > 0 ORDER BY id")
    if not runs:
        raise UsageError("no migration run has moved data yet: nothing to recalibrate from",
                         hint="run `cloudexit migrate` first, or measure the link with --measure")
    down: dict[int, float] = {}
    for row in state.query("SELECT detail FROM events WHERE kind = 'migrate.link_up'"):
        detail = json.loads(row["detail"] or "{}")
        down[detail.get("run", 0)] = down.get(detail.get("run", 0), 0.0) + float(detail.get("down_seconds") or 0)
    free = [r for r in runs if not r["bwlimit"]] or runs
    rates, moved, seconds, requests = [], 0, 0.0, 0
    for r in free:
        end = r["finished_at"] or r["heartbeat_at"] or r["started_at"]
        active = (datetime.fromisoformat(end) - datetime.fromisoformat(r["started_at"])).total_seconds()
        active -= down.get(r["id"], 0.0)
        if active <= 1:
            continue
        rates.append(r["bytes_downloaded"] / active)
        moved += r["bytes_downloaded"]
        seconds += active
        requests += r["get_requests"]
    if not rates:
        raise UsageError("the migration runs were too short to recalibrate from",
                         hint="run `cloudexit migrate` longer, or measure the link with --measure")
    rate = moved / seconds
    result = Measurement(
        measured_at=now(), objects=0, bytes=moved, get_requests=requests, seconds=seconds,
        latency_s=0.05, throughput_low=min(min(rates), rate * (1 - MIN_SPREAD)),
        throughput_expected=rate, throughput_high=max(max(rates), rate * (1 + MIN_SPREAD)),
        concurrency=0, steady_seconds=seconds, method="runs",
        basis=f"{len(rates)} run(s) as a whole: the link series holds no steady minute",
        classes={"runs": {"count": len(rates), "limited": int(free is runs and bool(runs[0]["bwlimit"]))}})
    state.set_meta(link_measurement=json.dumps(result.to_dict()))
    state.log("plan.recalibrated", **result.to_dict())
    return result


def stored_measurement(state: State) -> Measurement | None:
    text = state.meta("link_measurement")
    if not text:
        return None
    data = json.loads(text)
    known = {f.name for f in fields(Measurement)}
    data.setdefault("method", "boto3")  # measured before the engine timed it
    return Measurement(**{k: v for k, v in data.items() if k in known})


def _percentile(values: list[float], q: float) -> float:
    if not values:
        return 0.0
    index = min(len(values) - 1, max(0, round(q * (len(values) - 1))))
    return values[index]
