"""`plan --measure` times what migrate will do, on a link shaped by the fault proxy's pacer.

The pacer is a token bucket over every response body (a double of a `tc ... tbf` link, which
needs root and a network namespace); the S3 server behind it is the real SeaweedFS.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest

from cloudexit.testing import synthetic

RATE = 4_000_000  # bytes/s through the pacer


def _ct(bucket: str, s3: Any, n: int, matrix: int = 256) -> None:
    """n CT slices of the same size (~128 KB at matrix 256): the most common PACS content."""
    synthetic.upload(s3.client(), bucket, synthetic.generate(synthetic.Profile.ct_bench(n, matrix=matrix)))


def _measured(cli: Any, db: Path, proxy: Any, *extra: str) -> dict[str, Any]:
    result = cli("plan", "--db", str(db), "--provider", "aws-s3", "--measure", "--json",
                 "--endpoint-url", proxy.endpoint_url, *extra)
    assert result.exit_code == 0, result.output
    assert not list(db.parent.glob(".cloudexit-measure-*")), "the sample's archive is removed"
    return json.loads(result.stdout)


@pytest.mark.slow
def test_uniform_ct_slices_measure_the_paced_rate(cli, s3, bucket: str, db: Path, fault_proxy) -> None:
    """Equal-sized slices: the old sample had no 'large' object and divided bytes by the sum of
    times to first byte, about 3x too fast."""
    _ct(bucket, s3, 240)
    assert cli("inventory", f"s3://{bucket}", "--db", str(db)).exit_code == 0
    fault_proxy.shape(RATE)
    plan = _measured(cli, db, fault_proxy, "--measure-seconds", "5")
    rates = plan["link"]["throughput_bytes_per_s"]
    assert abs(rates["expected"] - RATE) / RATE < 0.15, rates
    assert rates["low"] <= rates["expected"] <= rates["high"], rates
    assert plan["link"]["source"].startswith("measured") and "migrating a sample" in plan["link"]["source"]
    # The measurement's own egress is what went through the pacer for it, and it is recorded.
    with __import__("sqlite3").connect(db) as conn:
        stored = json.loads(conn.execute("SELECT value FROM meta WHERE key = 'link_measurement'").fetchone()[0])
    assert stored["method"] == "engine" and stored["bytes"] > 0
    assert stored["bytes"] <= fault_proxy.bytes_sent


@pytest.mark.slow
def test_burst_then_throttle_measures_the_throttled_rate(cli, s3, bucket: str, db: Path,
                                                         fault_proxy) -> None:
    """A link that lets the first 8 MB through at full speed, then holds 4 MB/s (a provider's
    or a firewall's token bucket): the plan must take the throttled rate."""
    _ct(bucket, s3, 200)
    assert cli("inventory", f"s3://{bucket}", "--db", str(db)).exit_code == 0
    fault_proxy.shape(RATE, burst=8 * 2**20)
    plan = _measured(cli, db, fault_proxy, "--measure-seconds", "10")
    expected = plan["link"]["throughput_bytes_per_s"]["expected"]
    assert abs(expected - RATE) / RATE < 0.15, expected


@pytest.mark.slow
def test_mixed_sizes_plan_meets_the_migration(cli, s3, bucket: str, db: Path, fault_proxy,
                                              tmp_path: Path) -> None:
    """Tiny objects, CT slices and multi-MB objects together: the plan's expected time for the
    whole bucket is within 15% of migrating it through the same link, and inside the range."""
    client = s3.client()
    _ct(bucket, s3, 100)
    synthetic.upload(client, bucket, synthetic.generate(synthetic.Profile(  # 12 CRs of 5 MB
        patients=4, studies_per_patient=3, ct_series_per_study=0, cr_per_study=1, cr_matrix=1600,
        multiframe_objects=0, awkward=False, seed=3)))
    for i in range(300):  # request-bound: sidecars of a few hundred bytes
        client.put_object(Bucket=bucket, Key=f"sidecars/{i:04d}.json", Body=b"{}" * 200)
    assert cli("inventory", f"s3://{bucket}", "--db", str(db)).exit_code == 0
    fault_proxy.shape(2 * RATE)
    plan = _measured(cli, db, fault_proxy, "--measure-seconds", "15")
    fastest = next(s for s in plan["scenarios"] if s["key"] == "fastest")["time_s"]
    started = time.monotonic()
    run = cli("migrate", "--db", str(db), "--to", str(tmp_path / "archive"),
              "--endpoint-url", fault_proxy.endpoint_url, "-q")
    actual = time.monotonic() - started
    assert run.exit_code == 0, run.output
    assert abs(actual - fastest["expected"]) / actual < 0.15, (actual, fastest)
    assert fastest["low"] <= actual <= fastest["high"], (actual, fastest)
