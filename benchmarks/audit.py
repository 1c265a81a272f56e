"""Audit benchmark: `cloudexit audit` on a migration of N objects (default 1,000,000).

    python benchmarks/audit.py                      # 1M objects
    python benchmarks/audit.py --objects 200000 --out benchmarks/results/audit-200k.json

No S3 needed: the state DB is built directly with SQL, shaped like a real migration (studies of
100 instances in 2 series, 5 modalities over 10 study years, 3 storage classes, ~1% multipart,
an interrupted-and-resumed run with a link outage, and exceptions: 0.1% failed, 0.05%
quarantined, 0.02% conflicts, 0.01% changed at the source, 0.05% still queued, some deleted at
the source, plus a plan and a `cloudexit verify` that found 20 altered files). Then
`cloudexit audit --out DIR` runs in a child process, measured with wait4 (wall, CPU) and GNU
time (peak RSS), and `cloudexit audit verify DIR` after it. Bounded memory means the peak RSS
does not grow with N: run it at two sizes to see (the JSON has both).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cloudexit.state.db import State

MODALITIES = ("CT", "MR", "CR", "DX", "MG")
CLASSES = ("STANDARD", "STANDARD_IA", "GLACIER")


def build(db: Path, n: int, seed: int = 0) -> None:
    """A state DB holding a finished migration of `n` objects (see the module docstring)."""
    rnd = random.Random(seed)
    with State(db, create=True) as state:
        state.set_meta(source_url="s3://bench-pacs", endpoint_url="https://oss-cn-hangzhou.aliyuncs.com",
                       region="cn-hangzhou")
        state.log("inventory.started", round=1, source="s3://bench-pacs")
        conn = state.conn
        conn.execute("PRAGMA synchronous=OFF")
        t0 = 1_700_000_000
        dest = "file:///srv/pacs-archive"
        conn.execute("BEGIN")
        conn.execute("INSERT INTO inventory_rounds(id, started_at, finished_at, status, list_requests, "
                     "get_requests, header_bytes) VALUES (1, '2023-11-14T20:00:00+00:00', "
                     "'2023-11-14T21:30:00+00:00', 'complete', ?, ?, ?)", (n // 1000, n, n * 16384))
        batch_o, batch_t = [], []
        span = 36 * 3600  # the migration took a day and a half
        for i in range(n):
            study, within = divmod(i, 100)
            series = study * 2 + within // 50
            key = f"1.2.840.9999.{study}/1.2.840.9999.{study}.{series}/1.2.840.9999.{i}.dcm"
            modality = MODALITIES[study % 5]
            size = {"CT": 524_288, "MR": 400_000, "CR": 9_000_000, "DX": 12_000_000, "MG": 30_000_000}[modality]
            size += rnd.randrange(4096)
            multipart = rnd.random() < 0.01
            etag = f"{rnd.getrandbits(128):032x}" + ("-3" if multipart else "")
            year = 2015 + study % 10
            r = rnd.random()
            status = "deleted" if r < 0.0002 else "present"
            batch_o.append((key, size, etag, CLASSES[0 if r < 0.9 else (1 if r < 0.98 else 2)],
                            '{"x-oss-hash-crc64ecma": "123"}', status, "dicom",
                            f"1.2.840.9999.{study}", f"1.2.840.9999.{study}.{series}", f"1.2.840.9999.{i}",
                            modality, f"{year}0{1 + study % 9}15", f"{study % 50_000:020x}", 1, 1))
            if status == "deleted" and rnd.random() < 0.5:
                pass  # deleted before the migration reached it: no transfer
            else:
                state_ = "verified"
                reason = conflict = None
                t_etag = etag
                if r < 0.0010:
                    state_, reason = "failed", "HTTP 403 AccessDenied"
                elif r < 0.0015:
                    state_, reason = "quarantined", "truncated: pixel data declares 524288 bytes, object holds 262144"
                elif r < 0.0017:
                    state_, conflict = "quarantined", key + ".other"
                    reason = "conflict: SOP Instance UID also at another key with different content"
                elif r < 0.0018:
                    t_etag = "0" * 32  # changed at the source after the copy
                elif r < 0.0023:
                    state_ = "queued"
                done = state_ in ("verified", "quarantined")
                at = time.strftime("%Y-%m-%dT%H:%M:%S+00:00", time.gmtime(t0 + span * i // n))
                checks = "size," + ("etag-multipart" if multipart else "md5") + ",x-oss-hash-crc64ecma,dicom-sop-uid"
                batch_t.append((key, dest, i + 1, state_, t_etag, size, "dicom",
                                f"{key}" if done else None, f"{rnd.getrandbits(256):064x}" if done else None,
                                checks if done else None, reason, conflict, 1, 1, at if done else None,
                                at if done else None))
            if len(batch_o) >= 50_000:
                _flush(conn, batch_o, batch_t)
        _flush(conn, batch_o, batch_t)
        stats = conn.execute("SELECT sum(size), count(*) FROM transfers WHERE state = 'verified'").fetchone()
        conn.execute(
            "INSERT INTO migration_runs(id, started_at, finished_at, status, dest, options, resumed, pid, host, "
            "heartbeat_at, get_requests, head_requests, list_requests, bytes_downloaded, bytes_verified, "
            "objects_verified, retries, link_outages) VALUES (1, ?, ?, 'partial', ?, '{}', 1, 1, 'pacs-gw', ?, "
            "?, 10, 2, ?, ?, ?, 1234, 1)",
            (_iso(t0), _iso(t0 + span), dest, _iso(t0 + span), n + n // 100 * 2, int(stats[0] * 1.002),
             stats[0], stats[1]))
        conn.execute("COMMIT")
        state.log("inventory.complete", round=1)
        for at, kind, detail in ((t0, "migrate.started", {"user": "pacsadmin", "host": "pacs-gw"}),
                                 (t0 + span // 3, "migrate.link_down", {}),
                                 (t0 + span // 3 + 1800, "migrate.link_up", {"down_seconds": 1800}),
                                 (t0 + span // 2, "migrate.interrupted", {}),
                                 (t0 + span // 2 + 3600, "migrate.resumed", {}),
                                 (t0 + span, "migrate.finished", {"status": "partial"})):
            _log_at(state, _iso(at), kind, run=1, **detail)
        plan = {"provider": "aliyun-oss", "region": "cn-hangzhou", "currency": "CNY",
                "catalogue": "aliyun-oss catalogue", "link": {"source": "nominal 1 Gbit/s"},
                "workload": {"bytes": stats[0]},
                "scenarios": [{"key": "fastest", "title": "Fastest", "available": True,
                               "time_s": {"low": 1e5, "expected": 1.2e5, "high": 1.5e5},
                               "cost": {"low": 1e5, "expected": 1.1e5, "high": 1.2e5}, "complete": True}]}
        state.set_meta(plan=json.dumps(plan))
    add_verify(db)


def add_verify(db: Path) -> None:
    """A `cloudexit verify` of the archive after the migration, which found 20 files altered:
    the audit's decommission rule then has findings to look objects up in. Added to a DB
    built by an older version of this script too."""
    with State(db) as state:
        if state.scalar("SELECT count(*) FROM verify_runs"):
            return
        end = state.scalar("SELECT max(verified_at) FROM transfers")
        with state.transaction() as tx:
            cur = tx.execute(
                "INSERT INTO verify_runs(started_at, finished_at, dest, kind, options, status, summary) "
                "VALUES (?, ?, 'file:///srv/pacs-archive', 'filesystem', '{\"deep\": true}', 'failed', '{}')",
                (end, end))
            tx.execute("INSERT INTO verify_findings(run_id, level, problem, key, path, expected, found) "
                       "SELECT ?, 'file', 'sha256', key, path, sha256, '0' FROM transfers "
                       "WHERE state = 'verified' AND seq % 50000 = 7 LIMIT 20", (cur.lastrowid,))


def _iso(t: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S+00:00", time.gmtime(t))


def _log_at(state: State, at: str, kind: str, **detail: object) -> None:
    """Like State.log, with a given time (the benchmark's migration happened 'earlier')."""
    from cloudexit.state.db import GENESIS_HASH, event_hash

    text = json.dumps(detail, sort_keys=True)
    with state.transaction() as tx:
        row = tx.execute("SELECT hash FROM events ORDER BY id DESC LIMIT 1").fetchone()
        prev = row[0] if row else GENESIS_HASH
        tx.execute("INSERT INTO events(at, kind, detail, prev_hash, hash) VALUES (?, ?, ?, ?, ?)",
                   (at, kind, text, prev, event_hash(prev, at, kind, text)))


def _flush(conn, batch_o: list, batch_t: list) -> None:  # type: ignore[no-untyped-def]
    conn.executemany(
        "INSERT INTO objects(key, size, etag, storage_class, checksums, status, kind, study_uid, series_uid, "
        "sop_uid, modality, study_date, patient_hash, first_seen_round, last_seen_round) "
        "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", batch_o)
    conn.executemany(
        "INSERT INTO transfers(key, dest, seq, state, etag, size, kind, path, sha256, checks, reason, "
        "conflict_with, attempts, run_id, started_at, verified_at) "
        "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", batch_t)
    batch_o.clear()
    batch_t.clear()


TIME = "/usr/bin/time"  # GNU time: the child's own peak RSS


def measure(cmd: list[str]) -> dict[str, float]:
    """Wall, CPU (wait4) and peak RSS of a child. The RSS comes from GNU time when installed:
    wait4's ru_maxrss of a forked child also counts the harness's memory copied at the fork."""
    timed = os.path.exists(TIME)
    if timed:
        cmd = [TIME, "-f", "cx-maxrss-kb %M", *cmd]
    start = time.monotonic()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.monotonic() - start
    out, err = proc.stdout.read(), proc.stderr.read()  # type: ignore[union-attr]
    text = err.decode()
    rss_kb = float(usage.ru_maxrss)
    if timed and "cx-maxrss-kb " in text:
        text, _, tail = text.rpartition("cx-maxrss-kb ")
        rss_kb = float(tail.split()[0])
    return {"wall_s": round(wall, 2), "cpu_s": round(usage.ru_utime + usage.ru_stime, 2),
            "peak_rss_mb": round(rss_kb / 1024, 1), "exit": os.waitstatus_to_exitcode(status),
            "stdout": out.decode()[-500:], "stderr": text[-500:]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--objects", type=int, action="append",
                        help="objects in the synthetic migration (repeatable; default 1000000)")
    parser.add_argument("--workdir", type=Path, help="keep the DBs and audits here")
    parser.add_argument("--out", type=Path, help="write the results as JSON")
    args = parser.parse_args()
    sizes = args.objects or [1_000_000]
    work = args.workdir or Path(tempfile.mkdtemp(prefix="cx-audit-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    results = []
    exe = [sys.executable, "-m", "cloudexit.cli"]
    for n in sizes:
        db = work / f"audit-{n}.db"
        if not db.exists():
            t = time.monotonic()
            build(db, n)
            print(f"built {db} ({n:,} objects) in {time.monotonic() - t:.1f} s", file=sys.stderr)
        add_verify(db)
        out = work / f"audit-{n}"
        shutil.rmtree(out, ignore_errors=True)
        load = os.getloadavg()[0]  # other work on the machine: wall time depends on it, CPU hardly
        audit = measure([*exe, "audit", "--db", str(db), "--out", str(out), "-q"])
        assert audit["exit"] == 3, audit["stderr"]  # partial: the benchmark has exceptions
        verify = measure([*exe, "audit", "verify", str(out), "-q"])
        facts = json.loads((out / "audit.json").read_text())
        row = {"objects": n, "db_mb": round(db.stat().st_size / 2**20, 1),
               "audit": {k: v for k, v in audit.items() if k not in ("stdout", "stderr")},
               "verify": {k: v for k, v in verify.items() if k not in ("stdout", "stderr")},
               "manifest_rows": facts["manifest"]["rows"],
               "output_mb": round(sum(p.stat().st_size for p in out.iterdir()) / 2**20, 1),
               "verdict": facts["verdict"]["status"],
               "load_1min": [round(load, 1), round(os.getloadavg()[0], 1)]}  # before, after
        assert verify["exit"] == 0, verify["stderr"]
        assert row["manifest_rows"] == n, row
        results.append(row)
        print(json.dumps(row), flush=True)
    if args.out:
        args.out.write_text(json.dumps({"benchmark": "audit", "python": sys.version.split()[0],
                                        "cpus": os.cpu_count(), "results": results}, indent=2) + "\n")


if __name__ == "__main__":
    main()
