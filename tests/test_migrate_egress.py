"""Egress as the provider bills it, and large downloads that keep their progress, under repeated
kill -9 of a real `cloudexit migrate` subprocess. The fault proxy in front of SeaweedFS counts the
body bytes it sends; kills are placed on what the DB records and on bytes through the proxy."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from dbutil import rows

from cloudexit.s3.client import Counters, Credentials, Endpoint, FetchError, S3Reader

MiB = 2**20


def recorded_progress(db: Path) -> int:
    """Bytes of the large objects the DB says are on disk: ranges so far, objects verified."""
    ranges = rows(db, "SELECT coalesce(sum(bytes), 0) AS b FROM transfer_ranges")[0]["b"]
    done = rows(db, "SELECT coalesce(sum(size), 0) AS b FROM transfers WHERE state = 'verified'")[0]["b"]
    return int(ranges) + int(done)


@pytest.mark.slow
def test_kill_9_repeatedly_egress_matches_the_wire_and_ranges_resume_mid_range(
        cli, s3, bucket: str, db: Path, tmp_path: Path, fault_proxy) -> None:
    client = s3.client()
    bodies = {f"big/{i}.bin": os.urandom(32 * MiB) for i in range(3)}
    for key, body in bodies.items():
        client.put_object(Bucket=bucket, Key=key, Body=body)
    result = cli("inventory", f"s3://{bucket}", "--db", str(db), "-q")  # straight to the server
    assert result.exit_code == 0, result.output
    total = sum(len(b) for b in bodies.values())
    # A slow link (3 MiB/s per ranged GET, two 16 MiB ranges at once): every kill lands mid-range,
    # and what the proxy sent is what the client read, give or take one 16 KiB write.
    fault_proxy.pace(3 * MiB)
    dest = tmp_path / "archive"
    cmd = [sys.executable, "-m", "cloudexit.cli", "migrate", "--db", str(db), "--endpoint-url",
           fault_proxy.endpoint_url, "--processes", "1", "--threads", "1", "--large-object",
           str(16 * MiB), "--range-size", str(16 * MiB), "-q"]
    kills = mid_range = 0
    for round_ in range(8):
        before_db, before_wire = recorded_progress(db), fault_proxy.bytes_sent
        proc = subprocess.Popen(cmd + (["--to", str(dest)] if round_ == 0 else ["--resume"]),
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
        deadline = time.monotonic() + 60
        while proc.poll() is None and time.monotonic() < deadline:
            # Even rounds: once the DB recorded 5 MiB more; odd rounds: once 6 MiB more went
            # through the proxy, wherever the checkpoints are.
            if (round_ % 2 == 0 and recorded_progress(db) - before_db >= 5 * MiB) or \
                    (round_ % 2 == 1 and fault_proxy.bytes_sent - before_wire >= 6 * MiB):
                break
            time.sleep(0.02)
        if proc.poll() is not None:
            break  # finished before this kill
        os.killpg(proc.pid, signal.SIGKILL)  # the engine and its workers, as a power cut would
        proc.wait()
        kills += 1
        # What survives the kill: ranges recorded part-way (on disk and fsynced), to continue from.
        mid_range += bool(rows(db, "SELECT 1 FROM transfer_ranges WHERE bytes > 0 AND bytes < ?", (16 * MiB,)))
    result = subprocess.run(cmd + ["--resume"], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert kills >= 6 and mid_range >= kills // 2, (kills, mid_range)
    found = {r["key"]: r for r in rows(db, "SELECT * FROM transfers")}
    for key, body in bodies.items():
        assert found[key]["state"] == "verified", found[key]["reason"]
        assert (dest / found[key]["path"]).read_bytes() == body
    assert not rows(db, "SELECT * FROM transfer_ranges") and not rows(db, "SELECT * FROM meters")
    assert not Path(str(db) + "-egress").exists()  # every meter file counted and removed
    run = rows(db, "SELECT * FROM migration_runs")[0]
    wire = fault_proxy.bytes_sent
    recorded = run["bytes_downloaded"]
    print(f"\n{kills} kills: {total / MiB:.1f} MiB of objects, {wire / MiB:.1f} MiB through the proxy, "
          f"{recorded / MiB:.1f} MiB recorded ({(recorded - wire) / wire:+.3%})")
    # What the provider bills (bytes sent), recorded within 1% despite the kills...
    assert abs(recorded - wire) <= 0.01 * wire, (recorded, wire)
    # ...and little of it was thrown away: a resume continues mid-range, so a kill costs about
    # half a second of the download (the checkpoint interval), not the ranges in flight.
    assert wire - total <= kills * 2.5 * MiB, (wire, total)
    # Requests are counted too (every GET reached the proxy).
    assert run["get_requests"] >= 6  # 2 ranges per object at least
    assert run["get_requests"] <= fault_proxy.count("GET", bucket=bucket) + 1


def test_a_refused_connection_is_not_a_request() -> None:
    """Nothing listens on the port: no request reached a server, none is counted."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # closed again: connections are refused
    endpoint = Endpoint.from_url(f"http://127.0.0.1:{port}", "b", "us-east-1", True,
                                 connect_timeout=2.0, read_timeout=2.0)
    reader = S3Reader(endpoint, Credentials("a", "b"))
    counters = Counters()
    for _ in range(3):
        with pytest.raises(FetchError) as err:
            reader.request("GET", "k", None, None, counters)
        assert err.value.kind == "unreachable"
    assert counters == Counters()
