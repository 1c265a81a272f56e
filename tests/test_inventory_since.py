"""`inventory --since`, the lean ListObjectsV2 path and the table-fed listing plan, on SeaweedFS."""

from __future__ import annotations

import datetime as dt
import json
import sqlite3
from pathlib import Path
from urllib.parse import parse_qs

import pytest
from dbutil import rows as _rows

from cloudexit.core.paths import folder_dates, key_flags

DATED = [  # dcm4chee-style: YYYY/MM/DD/<study hash>/<series hash>/<instance hash>
    "2024/01/05/0A1B2C3D/11111111/AAAA0001",
    "2024/01/05/0A1B2C3D/11111111/AAAA0002",
    "2024/03/10/0B1B2C3D/22222222/BBBB0001",
    "2025/06/01/0C1B2C3D/33333333/CCCC0001",
    "2025/06/01/0C1B2C3D/33333333/CCCC0002",
    "2025/06/02/0D1B2C3D/44444444/DDDD0001",
    "20240105/flat-dated/x.dcm",  # YYYYMMDD folders work too
    "20250601/flat-dated/y.dcm",
    "README.txt",  # at the top: always listed
]


def _listed_prefixes(proxy, since: int = 0) -> list[str]:
    """The prefixes of the LIST pages the proxy saw (not the one-key check of the bucket)."""
    return [parse_qs(r.query).get("prefix", [""])[0] for r in proxy.requests[since:]
            if r.method == "GET" and "list-type" in r.query and not r.key
            and "max-keys=1&" not in r.query + "&"]


@pytest.mark.slow
def test_since_skips_old_folders_and_claims_deletions_only_where_it_listed(
        cli, s3, bucket: str, db: Path, fault_proxy) -> None:
    client = s3.client()
    for key in DATED:
        client.put_object(Bucket=bucket, Key=key, Body=b"not dicom " + key.encode())
    via = ("--endpoint-url", fault_proxy.endpoint_url)
    full = cli("inventory", f"s3://{bucket}", "--db", str(db), "--json", *via)
    assert full.exit_code == 0, full.output
    assert json.loads(full.stdout)["round"]["new"] == len(DATED)

    client.put_object(Bucket=bucket, Key="2025/06/02/0D1B2C3D/44444444/DDDD0002", Body=b"new")
    client.put_object(Bucket=bucket, Key="20250601/flat-dated/y.dcm", Body=b"changed")
    client.delete_object(Bucket=bucket, Key="2024/01/05/0A1B2C3D/11111111/AAAA0002")  # skipped
    client.delete_object(Bucket=bucket, Key="2025/06/01/0C1B2C3D/33333333/CCCC0002")  # listed
    seen = len(fault_proxy.requests)
    result = cli("inventory", f"s3://{bucket}", "--db", str(db), "--json", "--since", "2025-01-01",
                 *via)
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)["round"]
    assert (summary["new"], summary["changed"], summary["deleted"]) == (1, 1, 1)
    assert summary["since"] == "2025-01-01"
    assert summary["skipped_folders"] == 2  # 2024/ and 20240105/
    assert summary["not_listed"] == 4  # the objects under them, kept (one of them is gone)

    prefixes = _listed_prefixes(fault_proxy, seen)
    assert not [p for p in prefixes if p.startswith(("2024", "20240105"))], prefixes
    # One LIST per explored or grouped folder, none for the skipped ones.
    rounds = _rows(db, "SELECT * FROM inventory_rounds ORDER BY id")
    assert rounds[-1]["since"] == "2025-01-01" and rounds[-1]["list_requests"] == len(prefixes)

    rows = {r["key"]: r for r in _rows(db, "SELECT key, status, change FROM objects")}
    assert rows["2024/01/05/0A1B2C3D/11111111/AAAA0002"]["status"] == "present"  # not claimed
    assert rows["2025/06/01/0C1B2C3D/33333333/CCCC0002"]["status"] == "deleted"
    assert rows["2025/06/02/0D1B2C3D/44444444/DDDD0002"]["change"] == "new"
    assert rows["20250601/flat-dated/y.dcm"]["change"] == "changed"

    # A full round afterwards finds the deletion the partial one could not see.
    again = cli("inventory", f"s3://{bucket}", "--db", str(db), "--json", *via)
    assert json.loads(again.stdout)["round"]["deleted"] == 1
    assert _rows(db, "SELECT status FROM objects WHERE key = ?",
                 ("2024/01/05/0A1B2C3D/11111111/AAAA0002",))[0]["status"] == "deleted"


def test_since_last_and_bad_dates(cli, s3, bucket: str, db: Path) -> None:
    client = s3.client()
    for key in DATED:
        client.put_object(Bucket=bucket, Key=key, Body=b"x")
    # No complete round yet: `last` lists everything.
    first = cli("inventory", f"s3://{bucket}", "--db", str(db), "--json", "--since", "last")
    assert first.exit_code == 0, first.output
    assert json.loads(first.stdout)["round"]["new"] == len(DATED)
    second = cli("inventory", f"s3://{bucket}", "--db", str(db), "--since", "last")
    assert second.exit_code == 0, second.output
    day = dt.date.today() - dt.timedelta(days=1)
    assert f"Partial round (--since {day.isoformat()}): 4 dated folder(s) not listed" in second.stdout
    bad = cli("inventory", f"s3://{bucket}", "--db", str(db), "--since", "yesterday")
    assert bad.exit_code == 2 and "--since 'yesterday' is not a date" in bad.stderr


@pytest.mark.slow
def test_groups_of_folders_list_every_key_once(cli, s3, bucket: str, db: Path, fault_proxy) -> None:
    """Folders are listed in groups bounded by folders the server returned: every key, few LISTs,
    including folder names where S3's key order and a folder walk disagree."""
    client = s3.client()
    keys = [f"1.2.{i}/{j}.dcm" for i in range(90) for j in range(3)]
    keys += [f"1.2.{i}.5/x.dcm" for i in range(0, 90, 7)]  # "1.2.3/" vs "1.2.3.5/"
    keys += ["1.2.top.txt", "zz-last.txt"]  # keys between folders, at the top
    for key in keys:
        client.put_object(Bucket=bucket, Key=key, Body=b"x")
    result = cli("inventory", f"s3://{bucket}", "--db", str(db), "--json", "--list-workers", "2",
                 "--endpoint-url", fault_proxy.endpoint_url)
    assert result.exit_code == 0, result.output
    assert {r["key"] for r in _rows(db, "SELECT key FROM objects")} == set(keys)
    tasks = _rows(db, "SELECT * FROM list_tasks")
    assert sum(t["keys"] for t in tasks) == len(keys)  # no key committed twice
    assert len(tasks) <= 9  # 1 explore + 8 groups (2 workers x 4), not one task per folder
    assert len(_listed_prefixes(fault_proxy)) == sum(t["pages"] for t in tasks)


def test_folder_dates_and_key_flags_fast_path() -> None:
    assert folder_dates("2024/") == (dt.date(2024, 1, 1), dt.date(2025, 1, 1))
    assert folder_dates("x/2024/12/") == (dt.date(2024, 12, 1), dt.date(2025, 1, 1))
    assert folder_dates("2024/02/29/AB12CD34/") == (dt.date(2024, 2, 29), dt.date(2024, 3, 1))
    assert folder_dates("20240229/") == (dt.date(2024, 2, 29), dt.date(2024, 3, 1))
    assert folder_dates("1.2.840.10008/") is None and folder_dates("ABCDEF12/") is None
    for key, flags in [("a/b.dcm", []), ("a/./b", ["dot-segment"]), ("a/../b", ["dot-segment"]),
                       ("/a", ["absolute", "empty-segment"]), ("a//b", ["empty-segment"]),
                       ("C:x", ["absolute"]), ("a\\b", ["backslash"]), ("a\x7fb", ["control-char"]),
                       ("a" * 256, ["too-long"]), ("é" * 200, ["too-long"]), ("..x/y", [])]:
        assert key_flags(key) == flags, key


@pytest.mark.parametrize("code", ["SlowDown", "InternalError"])
def test_lean_listing_retries_throttling(cli, s3, bucket: str, db: Path, fault_proxy, code) -> None:
    client = s3.client()
    for i in range(5):
        client.put_object(Bucket=bucket, Key=f"k/{i}", Body=b"x")
    fault_proxy.status(503 if code == "SlowDown" else 500, code, method="GET",
                       query="encoding-type=url", times=2)
    result = cli("inventory", f"s3://{bucket}", "--db", str(db), "--json",
                 "--endpoint-url", fault_proxy.endpoint_url)
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["inventory"]["objects"] == 5


@pytest.mark.slow
def test_kill_9_while_listing_groups_resumes_exactly(s3_env, bucket: str, db: Path,
                                                      fault_proxy) -> None:
    """kill -9 between the pages of a listing plan kept in `list_tasks`: the resumed round lists
    each group once, loses no key and commits none twice."""
    import os
    import signal
    import subprocess
    import sys
    import time

    client = s3_env.client()
    keys = [f"1.2.{i}/{j}.dcm" for i in range(80) for j in range(3)]
    for key in keys:
        client.put_object(Bucket=bucket, Key=key, Body=b"x")
    slow = fault_proxy.delay(0.6, method="GET", query="list-type=2&encoding-type=url")
    args = [sys.executable, "-m", "cloudexit.cli", "inventory", f"s3://{bucket}", "--db", str(db),
            "-q", "--list-workers", "2", "--endpoint-url", fault_proxy.endpoint_url]
    env = {**os.environ, **s3_env.env()}
    proc = subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline, done = time.monotonic() + 60, 0
    while time.monotonic() < deadline and proc.poll() is None:
        try:  # only once the CLI made the file: connecting first would create a foreign one
            done = db.exists() and _rows(
                db, "SELECT count(*) AS n FROM list_tasks WHERE done = 1 AND explore = 0")[0]["n"]
        except sqlite3.Error:  # not migrated yet
            done = 0
        if done >= 3:
            break
        time.sleep(0.05)
    assert proc.poll() is None, proc.stderr.read().decode() if proc.stderr else ""
    proc.send_signal(signal.SIGKILL)
    proc.wait(30)
    tasks = _rows(db, "SELECT * FROM list_tasks")
    assert 3 <= sum(t["done"] for t in tasks) < len(tasks)

    fault_proxy.remove(slow)
    resumed = subprocess.run(args, env=env, capture_output=True, timeout=120, check=False)
    assert resumed.returncode == 0, resumed.stderr.decode()
    assert {r["key"] for r in _rows(db, "SELECT key FROM objects")} == set(keys)
    tasks = _rows(db, "SELECT * FROM list_tasks")
    assert all(t["done"] for t in tasks) and sum(t["keys"] for t in tasks) == len(keys)
    assert dict(_rows(db, "SELECT resumed, status FROM inventory_rounds")[0]) == {
        "resumed": 1, "status": "complete"}
