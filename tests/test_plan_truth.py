"""The plan meets the link: per run and per bandwidth-limit window, from the per-minute series.

The real test migrates from SeaweedFS through the fault proxy's token bucket (`shape`: a double
of a shaped link) under a `--bwlimit` timetable whose two entries meet at a minute boundary, so
the link series holds a window held by migrate's own limiter and a window held by the proxy.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from datetime import datetime, timedelta
from pathlib import Path

import pytest
from dbutil import rows

from cloudexit.plan.actual import plan_windows, steady_minutes
from cloudexit.state.db import State
from cloudexit.state.linkseries import LinkRecorder

SHAPED = 2_000_000  # bytes/s: the proxy's token bucket
LIMIT_LOW, LIMIT_HIGH = 2**20, 4 * 2**20  # the timetable's two limits: 1M (binds), 4M (the proxy binds)
OBJECT = 512 * 1024


def _iso(ts: float) -> str:
    return datetime.fromtimestamp(ts).astimezone().isoformat(timespec="seconds")


def test_windows_and_steady_minutes_from_a_recorded_series(tmp_path: Path) -> None:
    """A run of six minutes: start-up, a limit held, a live change mid-minute, an outage, the
    link's own rate, the tail. Each minute lands where it belongs."""
    t0 = 1_749_999_980.0  # 20 s into a minute
    clock = [t0]
    with State(tmp_path / "s.db", create=True) as state:
        plan = {"link": {"throughput_bytes_per_s": {"low": 1, "expected": 3e6, "high": 1},
                         "rate_model": {"cap_bytes_per_s": 3e6, "per_byte_overhead_s": 0.0,
                                        "limit_share": 1.0, "startup_s": 0.0}}}
        state.set_meta(plan=json.dumps(plan))
        with state.transaction() as tx:
            tx.execute("INSERT INTO migration_runs(started_at, finished_at, status, dest, options, bwlimit) "
                       "VALUES (?, ?, 'complete', 'file:///a', '{}', '1M')", (_iso(t0), _iso(t0 + 350)))
        rec = LinkRecorder("migrate", run_id=1, clock=lambda: clock[0])
        # (rate, limit) per 10 s from the run's start to its end (340 s)
        steps = ([(2**20, 2**20)] * 10  # 40 s of start-up minute + a whole minute held at 1M
                 + [(2**20, 2**20)] * 3 + [(2.5e6, None)] * 3  # the limit lifted at +30 s of a minute
                 + [(2.5e6, None)] * 6  # a whole free minute
                 + [(2.5e6, None)] * 2 + [(0, None)] * 2 + [(2.5e6, None)] * 2  # 20 s down (below)
                 + [(2.4e6, None)] * 6 + [(2.4e6, None)])  # a whole free minute, then the tail
        for i, (rate, limit) in enumerate(steps):
            if i == 13:  # `migrate --bwlimit off` on the running migration, at this moment
                state.log("migrate.bwlimit", run=1, bwlimit="off", live=True)
                with state.transaction() as tx:
                    tx.execute("UPDATE events SET at = ? WHERE kind = 'migrate.bwlimit'", (_iso(clock[0]),))
            rec.busy(4, limit)
            rec.traffic(int(rate * 10), get=2 if rate else 0)
            clock[0] += 10
            rec.busy(4, limit)
            if 24 <= i < 26:  # 20 s down in the fifth minute
                with state.transaction() as tx:
                    rec.down(tx, "unreachable", "ConnectionRefusedError: [Errno 111] Connection refused")
                    rec.minutes[max(rec.minutes)].counts["down_seconds"] += 10  # as busy() counts it
                    rec.up(tx)
            with state.transaction() as tx:
                rec.flush(tx)
        found = plan_windows(state.conn)
        steady = steady_minutes(state.conn)
    limited, free = found["windows"]
    assert limited["bwlimit"] == 2**20 and free["bwlimit"] is None
    assert limited["rate"] == pytest.approx(2**20, rel=0.01)  # start-up minute by its 40 s in the run
    assert limited["error"] == pytest.approx(0.0, abs=0.01)  # planned min(3e6, 1M) = 1M
    assert free["mixed_minutes"] == 1  # the minute of the live change counts for neither
    assert free["rate"] == pytest.approx(2.45e6, rel=0.02)  # outage time left out
    assert free["planned_rate"] == 3e6 and free["error"] == pytest.approx(free["rate"] / 3e6 - 1)
    assert steady is not None
    assert [m.rate for m in steady.used] == pytest.approx([2.5e6, 2.4e6])
    assert (steady.startup, steady.limited, steady.mixed, steady.outage, steady.tail) == (1, 1, 1, 1, 1)
    assert "2 steady minute(s)" in steady.describe() and "1 in an outage" in steady.describe()


@pytest.mark.slow
def test_the_plan_per_window_and_recalibration_on_a_shaped_link(cli, s3, bucket: str, db: Path, fault_proxy,
                                                                tmp_path: Path) -> None:
    """Two windows of one run: 1M (migrate's limiter holds it) then 4M (the proxy's 2 MB/s holds
    it). The link report's per-window rates are the shaped ones and the error is the plan's
    against them; `plan --recalibrate` takes the proxy's rate from the steady minute."""
    client = s3.client()
    block = os.urandom(OBJECT)
    for i in range(420):  # 220 MB: more than the run moves before it is stopped
        client.put_object(Bucket=bucket, Key=f"blobs/{i:04d}.bin", Body=i.to_bytes(4, "big") + block[4:])
    assert cli("inventory", f"s3://{bucket}", "--db", str(db), "-q").exit_code == 0
    plan = cli("plan", "--db", str(db), "--provider", "aws-s3", "--bandwidth", "16Mbit/s", "--json")
    assert plan.exit_code == 0, plan.output
    fault_proxy.shape(SHAPED)
    # The first window must be long enough for the limiter's slack (about a read per stream in
    # flight, ~1 MB here) to be a few percent: start in the first 20 s of a minute.
    while datetime.now().second > 20:
        time.sleep(0.2)
    now = datetime.now()
    edge = now.replace(second=0, microsecond=0) + timedelta(minutes=1)
    timetable = f"{now:%H:%M},1M {edge:%H:%M},4M"
    env = {**os.environ, **s3.env(), "PYTHONPATH": os.pathsep.join(sys.path)}
    env.pop("AWS_PROFILE", None)
    proc = subprocess.Popen([sys.executable, "-m", "cloudexit.cli", "migrate", "--to", str(tmp_path / "archive"),
                             "--db", str(db), "--endpoint-url", fault_proxy.endpoint_url, "--bwlimit", timetable,
                             "--processes", "1", "-q"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=env)
    try:
        # Stop once the run has recorded a few seconds of the minute after the whole 4M minute
        # (observed in the DB: its heartbeat and that minute's bytes).
        after = (edge + timedelta(minutes=1)).timestamp()

        def into_third_minute() -> bool:
            beat = rows(db, "SELECT heartbeat_at FROM migration_runs ORDER BY id DESC LIMIT 1")
            return bool(beat and beat[0][0] and datetime.fromisoformat(beat[0][0]).timestamp() >= after + 2
                        and rows(db, "SELECT 1 FROM link_series WHERE source = 'migrate' AND ts >= ? "
                                     "AND bytes > 0", (int(after),)))

        deadline = time.monotonic() + 200
        while not (db.exists() and into_third_minute()):
            assert proc.poll() is None, proc.communicate()[1][-2000:]
            assert time.monotonic() < deadline, "the run never reached its third minute"
            time.sleep(0.2)
        proc.send_signal(signal.SIGINT)
        time.sleep(0.5)
        proc.send_signal(signal.SIGINT)  # the second Ctrl-C stops at once
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, proc.stderr.read() if proc.stderr else ""
    report = tmp_path / "link"
    assert cli("link-report", "--db", str(db), "--out", str(report)).exit_code == 0
    found = json.loads((report / "link.json").read_text())["plan_windows"]
    first, second = found["windows"]
    assert (first["bwlimit"], second["bwlimit"]) == (LIMIT_LOW, LIMIT_HIGH)
    # Achieved: what held each window, within 10%. The limiter charges a read after it is made
    # (transfer/rate.py), so each of the 8 streams may be a read ahead of it; on a loaded machine
    # the kernel can have buffered a whole 512 KB object by the time a stream reads: up to ~4 MB more
    # (+8.5% measured over a 43 s window in a loaded CI run; an idle run +4.4% over 58.5 s). The
    # window's own arithmetic errs the other way (a start stamped to the second, cut; a start-up
    # that takes longer than the plan's 1.5 s under load): it is not what widened the bound.
    assert abs(first["rate"] / LIMIT_LOW - 1) < 0.10, first
    assert abs(second["rate"] / SHAPED - 1) < 0.10, second
    # The error is the plan's time against the shaped truth.
    for window, truth in ((first, LIMIT_LOW), (second, SHAPED)):
        assert window["error"] == pytest.approx(window["planned_seconds"] / window["seconds"] - 1)
        # 8%: the rate within 6% (above) and the limiter's burst (up to ~1 MB more in a
        # one-minute window) compound here; a full suite on 2 cores saw 6.2%.
        assert abs(window["error"] - (truth / window["planned_rate"] - 1)) < 0.08, window
    assert second["planned_rate"] < LIMIT_HIGH  # the plan's link (90% of 2 MB/s), not the 4M limit
    csv = (report / "link-plan-windows.csv").read_text().splitlines()
    assert len(csv) == 3 and csv[0].startswith("run,start_unix")
    assert 'class="plan-windows"' in (report / "link.html").read_text()
    zh = tmp_path / "link-zh"
    assert cli("link-report", "--db", str(db), "--out", str(zh), "--lang", "zh").exit_code == 0
    assert "计划与链路实际对比" in (zh / "link.html").read_text()
    # Recalibration: the steady minute is the whole 4M minute, held by the proxy.
    result = cli("plan", "--db", str(db), "--provider", "aws-s3", "--recalibrate")
    assert result.exit_code == 0, result.output
    assert "1 steady minute(s) of the link series" in result.stdout
    assert "left out: 1 start-up, 1 last of a run" in result.stdout
    link = json.loads(cli("plan", "--db", str(db), "--provider", "aws-s3", "--json").stdout)["link"]
    assert abs(link["throughput_bytes_per_s"]["expected"] / SHAPED - 1) < 0.05, link
    assert "steady minute(s)" in link["source"]
