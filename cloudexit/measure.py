"""Calibrate the link: download a stratified sample from the bucket and time it.

Small objects give the per-request latency (time to first byte); large objects downloaded in
parallel give the throughput, sampled every half second so the plan gets a range, not one
number. The sample's own cost (bytes and requests) is reported with the result.
"""

from __future__ import annotations

import json
import statistics
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from typing import Any, Callable

from .errors import UsageError
from .source import Source
from .state import State, now

WINDOW_S = 0.5


@dataclass
class Measurement:
    measured_at: str
    objects: int
    bytes: int
    get_requests: int
    seconds: float
    latency_s: float  # median time to first byte of small objects
    throughput_low: float  # bytes/s: 10th percentile of the half-second windows
    throughput_expected: float  # bytes/s: the whole large-object phase
    throughput_high: float  # bytes/s: 90th percentile of the windows
    concurrency: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def pick_sample(state: State, small: int, large: int, max_bytes: int) -> tuple[list[Any], list[Any]]:
    """Small objects from below the median size, and the largest objects within `max_bytes`."""
    present = "FROM objects WHERE status = 'present' AND size > 0"
    count = state.scalar(f"SELECT count(*) {present}") or 0
    if count == 0:
        raise UsageError("the inventory is empty: nothing to measure",
                         hint="run `cloudexit inventory s3://BUCKET` first")
    median = state.scalar(f"SELECT size {present} ORDER BY size LIMIT 1 OFFSET ?", (count // 2,))
    smalls = state.query(f"SELECT key, size, etag {present} AND size <= ? ORDER BY random() LIMIT ?",
                         (median, small))
    larges, total = [], 0
    for row in state.query(f"SELECT key, size, etag {present} AND size > ? ORDER BY size DESC "
                           "LIMIT ?", (median, large * 4)):
        if len(larges) >= large:
            break
        if total + row["size"] <= max_bytes or not larges:
            larges.append(row)
            total += row["size"]
    return smalls, larges


class _Meter:
    """Bytes received, bucketed into half-second windows."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.windows: dict[int, int] = {}
        self.start = time.monotonic()

    def add(self, n: int) -> None:
        slot = int((time.monotonic() - self.start) / WINDOW_S)
        with self.lock:
            self.windows[slot] = self.windows.get(slot, 0) + n


def measure_link(state: State, source: Source, small: int = 24, large: int = 8,
                 max_bytes: int = 512 * 2**20, concurrency: int = 8,
                 progress: Callable[[int], None] | None = None) -> Measurement:
    """Download the sample, record the result in the state DB and return it."""
    source.check()
    smalls, larges = pick_sample(state, small, large, max_bytes)
    tick = progress or (lambda n: None)
    started = time.monotonic()

    def first_byte(row: Any) -> tuple[float, int]:
        t0 = time.monotonic()
        body = source.get_stream(row["key"], row["etag"])
        first = body.read(1)
        ttfb = time.monotonic() - t0
        n = len(first) + sum(len(c) for c in iter(lambda: body.read(1 << 20), b""))
        tick(n)
        return ttfb, n

    def guarded(fn: Callable[[Any], Any]) -> Callable[[Any], Any]:
        def run(row: Any) -> Any:
            try:
                return fn(row)
            except Exception as exc:  # noqa: BLE001 - botocore errors mid-stream, translated
                raise source.translate(exc, f"measuring the link with {row['key']!r}") from exc
        return run

    with ThreadPoolExecutor(concurrency) as pool:
        small_results = list(pool.map(guarded(first_byte), smalls))
    meter = _Meter()

    def whole(row: Any) -> int:
        body = source.get_stream(row["key"], row["etag"])
        n = 0
        for chunk in iter(lambda: body.read(256 * 1024), b""):
            meter.add(len(chunk))
            tick(len(chunk))
            n += len(chunk)
        return n

    large_started = time.monotonic()
    with ThreadPoolExecutor(concurrency) as pool:
        large_bytes = sum(pool.map(guarded(whole), larges))
    large_seconds = max(time.monotonic() - large_started, 1e-6)

    latencies = [t for t, _ in small_results]
    if large_bytes:
        expected = large_bytes / large_seconds
        full = sorted(v / WINDOW_S for k, v in meter.windows.items()
                      if (k + 1) * WINDOW_S <= large_seconds)  # complete windows only
    else:  # only small objects: throughput from them, pessimistic
        small_bytes = sum(n for _, n in small_results)
        expected = small_bytes / max(sum(latencies), 1e-6) * concurrency
        full = []
    low = _percentile(full, 0.10) if len(full) >= 4 else expected * 0.8
    high = _percentile(full, 0.90) if len(full) >= 4 else expected * 1.1
    result = Measurement(
        measured_at=now(), objects=len(smalls) + len(larges),
        bytes=sum(n for _, n in small_results) + large_bytes,
        get_requests=len(smalls) + len(larges), seconds=time.monotonic() - started,
        latency_s=statistics.median(latencies) if latencies else 0.05,
        throughput_low=min(low, expected), throughput_expected=expected,
        throughput_high=max(high, expected), concurrency=concurrency)
    state.set_meta(link_measurement=json.dumps(result.to_dict()))
    state.log("plan.measured", **result.to_dict())
    return result


def stored_measurement(state: State) -> Measurement | None:
    text = state.meta("link_measurement")
    return Measurement(**json.loads(text)) if text else None


def _percentile(values: list[float], q: float) -> float:
    index = min(len(values) - 1, max(0, round(q * (len(values) - 1))))
    return values[index]
