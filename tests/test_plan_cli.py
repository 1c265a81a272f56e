"""`cloudexit plan` over a real inventory: workload from the DB, --measure, outputs, bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from cloudexit.testing import synthetic


@pytest.fixture
def inventoried(cli, s3, bucket: str, db: Path) -> tuple[Path, list[synthetic.SyntheticObject]]:
    truth = synthetic.upload(s3.client(), bucket, synthetic.generate(synthetic.Profile.tiny()))
    assert cli("inventory", f"s3://{bucket}", "--db", str(db)).exit_code == 0
    return db, truth


def test_plan_from_inventory(cli, inventoried, tmp_path: Path) -> None:
    db, truth = inventoried
    outs = [tmp_path / f"plan.{ext}" for ext in ("md", "html", "json")]
    result = cli("plan", "--db", str(db), "--provider", "aws-s3", "--bandwidth", "100Mbit/s",
                 "--json", *[a for o in outs for a in ("--out", str(o))])
    assert result.exit_code == 0, result.output
    plan = json.loads(result.stdout)
    assert plan["workload"]["objects"] == len(truth)
    assert plan["workload"]["bytes"] == sum(o.size for o in truth)
    keys = [s["key"] for s in plan["scenarios"]]
    assert "fastest" in keys and "cheapest" in keys and "free_exit" in keys
    fastest = next(s for s in plan["scenarios"] if s["key"] == "fastest")
    # 6.7 MB over 100 Mbit/s at 60-95% usable: about a second, never an hour.
    assert 0 < fastest["time_s"]["expected"] < 60
    assert json.loads(outs[2].read_text())["workload"]["bytes"] == plan["workload"]["bytes"]
    html = outs[1].read_text()
    assert "<svg" in html and "http://" not in html.replace("http://www.w3.org/2000/svg", "")
    assert outs[0].read_text().startswith("#")
    assert all(o.stat().st_mode & 0o777 == 0o600 for o in outs)


def test_plan_measure_stores_and_uses_the_link(cli, inventoried) -> None:
    db, _ = inventoried
    result = cli("plan", "--db", str(db), "--provider", "aws-s3", "--measure")
    assert result.exit_code == 0, result.output
    assert "Measured the link by migrating" in result.stdout and "The sample cost" in result.stdout
    # The stored measurement is used by the next plan without --measure or --bandwidth.
    again = cli("plan", "--db", str(db), "--provider", "aws-s3", "--json")
    assert again.exit_code == 0, again.output
    link = json.loads(again.stdout)["link"]
    assert link["source"].startswith("measured")
    rates = link["throughput_bytes_per_s"]
    assert 0 < rates["low"] <= rates["expected"] <= rates["high"]


def test_plan_without_inventory(cli, tmp_path: Path) -> None:
    result = cli("plan", "--db", str(tmp_path / "none.db"), "--bandwidth", "1Gbit/s")
    assert result.exit_code == 1 and "run `cloudexit inventory s3://BUCKET` first" in result.stderr


def test_plan_on_empty_bucket(cli, bucket: str, db: Path) -> None:
    assert cli("inventory", f"s3://{bucket}", "--db", str(db)).exit_code == 0
    result = cli("plan", "--db", str(db), "--provider", "aws-s3", "--bandwidth", "1Gbit/s")
    assert result.exit_code == 2
    assert "the inventory is empty" in result.stderr


def test_plan_bad_input(cli, inventoried, tmp_path: Path) -> None:
    db, _ = inventoried
    unknown = cli("plan", "--db", str(db), "--provider", "dropbox", "--bandwidth", "1Gbit/s")
    assert unknown.exit_code == 2
    assert "unknown provider 'dropbox'; known providers: aliyun-oss, aws-s3" in unknown.stderr
    no_provider = cli("plan", "--db", str(db), "--bandwidth", "1Gbit/s")
    assert no_provider.exit_code == 2 and "give --provider" in no_provider.stderr
    ambiguous = cli("plan", "--db", str(db), "--provider", "aws-s3", "--bandwidth", "200M")
    assert ambiguous.exit_code == 2 and "write 200Mbit/s or 200MB/s" in ambiguous.stderr
    never = cli("plan", "--db", str(db), "--provider", "aws-s3", "--bandwidth", "1Gbit/s",
                "--schedule", "00:00,0")
    assert never.exit_code == 2 and "never allows transfer" in never.stderr
    no_link = cli("plan", "--db", str(db), "--provider", "aws-s3")
    assert no_link.exit_code == 2 and "give --bandwidth" in no_link.stderr
    price = tmp_path / "contract.json"
    text = json.loads((Path(__file__).parents[1] / "cloudexit/plan/pricing/data/aws-s3.json").read_text())
    del text["egress"]["tiers"][0]["price_per_gb"]["source"]
    price.write_text(json.dumps(text, indent=2))
    bad = cli("plan", "--db", str(db), "--price-file", str(price), "--bandwidth", "1Gbit/s")
    assert bad.exit_code == 2
    assert "contract.json, line" in bad.stderr and "egress.tiers[0].price_per_gb.source" in bad.stderr


def test_measure_with_the_bucket_unreachable(cli, inventoried, fault_proxy) -> None:
    db, _ = inventoried
    fault_proxy.down()
    result = cli("plan", "--db", str(db), "--provider", "aws-s3", "--measure", "--retries", "2",
                 "--endpoint-url", fault_proxy.endpoint_url)
    assert result.exit_code == 1
    assert "cannot reach" in result.stderr and fault_proxy.endpoint_url in result.stderr


def test_plan_assume_size_is_labelled_everywhere_and_not_kept(cli, inventoried, tmp_path: Path) -> None:
    """`--assume-size 40TB` scales the inventory's mix to 40 TB; text, Markdown, HTML (both
    languages) and JSON all say it is an assumption, and the real plan stays the audit's."""
    db, truth = inventoried
    real = cli("plan", "--db", str(db), "--provider", "aliyun-oss", "--region", "cn-hangzhou", "--bandwidth", "1Gbit/s", "--json")
    assert real.exit_code == 0, real.output
    outs = {ext: tmp_path / f"p40.{ext}" for ext in ("md", "html", "json")}
    result = cli("plan", "--db", str(db), "--provider", "aliyun-oss", "--region", "cn-hangzhou", "--bandwidth", "1Gbit/s",
                 "--assume-size", "40TB", *[a for o in outs.values() for a in ("--out", str(o))])
    assert result.exit_code == 0, result.output
    assert "\nASSUMPTION: sized as 40.0 TB, not as the bucket inventoried" in result.stdout
    plan = json.loads(outs["json"].read_text())
    assert plan["workload"]["bytes"] == pytest.approx(40e12, rel=1e-3)
    assert plan["assumed_size"]["bytes"] == sum(o.size for o in truth)
    # One LIST page per 1,000 objects, not the tiny bucket's prefix walk scaled up.
    assert plan["workload"]["inventory"]["list_requests"] == -(-plan["workload"]["objects"] // 1000)
    assert plan["assumptions"][0].startswith("assumed size: 40.0 TB")
    assert "ASSUMPTION" in outs["md"].read_text() and 'class="assumed"' in outs["html"].read_text()
    zh = tmp_path / "p40-zh.html"
    assert cli("plan", "--db", str(db), "--provider", "aliyun-oss", "--region", "cn-hangzhou", "--bandwidth", "1Gbit/s",
               "--assume-size", "40TB", "--lang", "zh", "--out", str(zh), "-q").exit_code == 0
    assert "假设：按 40.0 TB 估算" in zh.read_text()
    from cloudexit.state.db import State

    with State(db) as state:  # the plan the audit compares with is still the real bucket's
        assert json.loads(state.meta("plan"))["workload"]["bytes"] == sum(o.size for o in truth)
    bad = cli("plan", "--db", str(db), "--provider", "aliyun-oss", "--region", "cn-hangzhou", "--bandwidth", "1Gbit/s",
              "--assume-size", "40T")
    assert bad.exit_code == 2 and "Traceback" not in bad.output


def test_status_shows_the_plan_against_the_run(cli, inventoried, tmp_path: Path) -> None:
    """After a migration, status says how far the plan was from what happened."""
    db, truth = inventoried
    assert cli("plan", "--db", str(db), "--provider", "aws-s3", "--bandwidth", "1Gbit/s").exit_code == 0
    before = json.loads(cli("status", "--db", str(db), "--json").stdout)
    assert before["plan_vs_actual"] is None  # no run yet
    # Held at 2 MiB/s: the run takes seconds (run times are recorded to the second).
    assert cli("migrate", "--db", str(db), "--to", str(tmp_path / "archive"), "-q",
               "--bwlimit", "00:00,2M").exit_code in (0, 3)
    status = cli("status", "--db", str(db), "--json")
    versus = json.loads(status.stdout)["plan_vs_actual"]
    assert versus["scenario"] == "fastest" and versus["complete"] is True
    assert versus["actual_bytes"] >= sum(o.size for o in truth) * 0.9
    assert versus["error"] == pytest.approx((versus["planned_s"]["expected"] - versus["actual_s"])
                                            / versus["actual_s"])
    assert "Plan vs actual (fastest" in cli("status", "--db", str(db)).stdout


def test_recalibrate_takes_the_rate_from_the_runs(cli, inventoried, tmp_path: Path) -> None:
    """The rate of the runs so far (here held at 2 MiB/s by a timetable) plans the rest."""
    db, _ = inventoried
    refused = cli("plan", "--db", str(db), "--provider", "aws-s3", "--recalibrate")
    assert refused.exit_code == 2 and "nothing to recalibrate from" in refused.stderr
    assert cli("migrate", "--db", str(db), "--to", str(tmp_path / "archive"), "-q",
               "--bwlimit", "00:00,2M").exit_code in (0, 3)
    result = cli("plan", "--db", str(db), "--provider", "aws-s3", "--recalibrate", "--json")
    assert result.exit_code == 0, result.output
    link = json.loads(result.stdout)["link"]
    assert "from the migration's runs" in link["source"]
    assert abs(link["throughput_bytes_per_s"]["expected"] - 2 * 2**20) < 0.35 * 2 * 2**20


def test_plan_counts_the_gets_migrate_makes(cli, s3, bucket: str, db: Path, tmp_path: Path) -> None:
    """The plan's GET count is migrate's for the same objects: one per small object, one per
    range of a large one, at the migration's own threshold and range size (the plan used to
    assume its own, and counted 4x fewer ranges than migrate made at the defaults)."""
    import os

    sizes = {"small.bin": 100_000, "large.bin": 3 * 2**20 + 1, "larger.bin": 5 * 2**20}
    for key, size in sizes.items():
        s3.client().put_object(Bucket=bucket, Key=key, Body=os.urandom(size))
    assert cli("inventory", f"s3://{bucket}", "--db", str(db), "-q").exit_code == 0
    moved = cli("migrate", "--db", str(db), "--to", str(tmp_path / "archive"), "--json",
                "--large-object", str(2**20), "--range-size", str(256 * 1024))
    assert moved.exit_code == 0, moved.output
    made = json.loads(moved.output)["requests"]["GET"]
    assert made == 1 + 13 + 20  # 100 kB whole; 3 MiB + 1 and 5 MiB in 256 KiB ranges
    planned = cli("plan", "--db", str(db), "--provider", "aws-s3", "--bandwidth", "1Gbit/s", "--json")
    assert planned.exit_code == 0, planned.output
    assert json.loads(planned.output)["workload"]["get_requests"] == made
