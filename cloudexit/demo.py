"""`cloudexit demo`: the whole job on an embedded S3 server holding a synthetic PACS."""

from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable

from cloudexit import app
from cloudexit.core.config import SourceConfig
from cloudexit.core.files import make_private_dirs
from cloudexit.testing.s3server import SeaweedServer
from cloudexit.s3.source import Source
from cloudexit.state.db import State
from cloudexit.report.status import inventory_summary

DEMO_BUCKET = "branch-hospital-pacs"


def run_demo(workdir: str | None = None, size: str = "demo",
             say: Callable[[str], None] = print,
             show: Callable[[str, Any], None] = lambda step, data: None) -> dict[str, Any]:
    """Start SeaweedFS, upload a synthetic PACS, inventory it; return what was found.

    `workdir` keeps the state DB (and what later steps write) after the demo; it is reset at
    the start of each run. None: a temporary directory, removed after. `say` prints a line;
    `show(step, data)` renders a step's result ("inventory": totals, "plan": a Plan).
    """
    from cloudexit.testing import synthetic

    own = workdir is None
    root = Path(workdir or tempfile.mkdtemp(prefix="cloudexit-demo-"))
    for stale in ("s3", "archive", "plan.html", "plan-40TB.html", "cloudexit.db", "cloudexit.db-wal", "cloudexit.db-shm",
                  "cloudexit.db.lock"):
        target = root / stale
        if target.is_dir():
            shutil.rmtree(target)
        elif target.exists():
            target.unlink()
    make_private_dirs(root)
    try:
        with SeaweedServer(root / "s3") as server:
            say(f"Embedded S3 server (SeaweedFS) at {server.endpoint_url}")
            profile = synthetic.Profile.demo() if size == "demo" else synthetic.Profile.tiny()
            objects = synthetic.upload(server.client(), DEMO_BUCKET, synthetic.generate(profile))
            total = sum(o.size for o in objects)
            say(f"Uploaded a synthetic PACS: {len(objects)} objects, {total / 1e6:.1f} MB "
                f"into s3://{DEMO_BUCKET}")
            db_path = root / "cloudexit.db"
            url = f"s3://{DEMO_BUCKET}"
            os.environ.update(server.env())
            source = Source(url, SourceConfig(endpoint_url=server.endpoint_url))
            with State(db_path, create=True) as state:
                say(f"$ cloudexit inventory {url} --endpoint-url {server.endpoint_url} --db {db_path}")
                summary = app.inventory(state, source)
                totals = inventory_summary(state)
                show("inventory", totals)
                plan = _plan(state, root, say)
                show("plan", plan)
                migration = _migrate(state, source, root, say)
                _verify_and_audit(state, root, say)
            say(f"State database: {db_path if not own else '(temporary)'}"
                + (f"  (look again with: cloudexit status --db {db_path})" if not own else ""))
            return {"bucket": DEMO_BUCKET, "uploaded": len(objects), "round": summary.__dict__,
                    "inventory": totals, "plan": plan.to_dict(), "migration": migration}
    finally:
        if own:
            shutil.rmtree(root, ignore_errors=True)


def _plan(state: State, root: Path, say: Callable[[str], None]) -> Any:
    """The branch hospital's question: what does leaving Alibaba OSS cost on a 100 Mbit/s link,
    moving only at night so clinical hours keep their bandwidth?"""
    from datetime import timedelta

    from cloudexit.engine.schedule import parse_schedule

    request = app.PlanRequest(provider="aliyun-oss", bandwidth=100e6 / 8,
                              schedule=parse_schedule("Mon-Sun 07:30,0 19:00,off"),
                              offline_threshold=timedelta(days=7))
    out = root / "plan.html"
    say(f'$ cloudexit plan --db {root / "cloudexit.db"} --provider aliyun-oss --bandwidth 100Mbit/s '
        f'--schedule "Mon-Sun 07:30,0 19:00,off" --out {out}')
    plan = app.make_plan(state, request)
    app.write_plan(plan, out)
    say(f"Plan written to {out}")
    # The demo bucket is tiny; what the same exit costs at a hospital's size, labelled as such.
    out = root / "plan-40TB.html"
    say(f'$ cloudexit plan --db {root / "cloudexit.db"} --provider aliyun-oss --bandwidth 100Mbit/s '
        f'--schedule "Mon-Sun 07:30,0 19:00,off" --assume-size 40TB --out {out}')
    app.write_plan(app.make_plan(state, replace(request, assume_bytes=40 * 10**12)), out)
    say(f"Plan at an assumed 40 TB written to {out}")
    return plan


def _migrate(state: State, source: Source, root: Path, say: Callable[[str], None]) -> dict[str, Any]:
    """Bring everything home into <workdir>/archive, verified, and say what happened."""
    from cloudexit.core.units import format_bytes, format_duration

    archive = root / "archive"
    say(f"$ cloudexit migrate --db {state.path} --to {archive}")
    summary = app.migrate(state, source, app.choose_run(state, [str(archive)]))
    say(f"Migrated in {format_duration(summary.elapsed)}: {summary.verified} objects verified "
        f"({format_bytes(summary.bytes_verified)}), {summary.quarantined} quarantined, "
        f"{summary.duplicates} duplicates, {summary.failed} failed; "
        f"{summary.requests['GET']} GET requests, {format_bytes(summary.bytes_downloaded)} downloaded.")
    for key, what, reason in summary.failures[:5]:
        say(f"  {what}: {key!r}: {reason}")
    say(f"Archive: {archive}  (STUDY/SERIES/SOP.dcm; side areas _non-dicom/ and _quarantine/)")
    data = dict(summary.__dict__)
    data["exit_code"] = summary.exit_code
    return data


def _verify_and_audit(state: State, root: Path, say: Callable[[str], None]) -> None:
    """Re-check the archive against the inventory (SHA-256 too), then write the audit."""
    from cloudexit.app import open_target
    from cloudexit.report.audit import write_audit
    from cloudexit.verify import verify

    archive = root / "archive"
    say(f"$ cloudexit verify --db {state.path} --deep")
    store = open_target(str(archive.resolve()))
    try:
        report = verify(state, store, deep=True)
    finally:
        store.close()
    findings = len(report.findings)
    say(f"Verified {archive}: {findings} finding(s)" + (" (see the audit's exceptions)" if findings else ""))
    out = root / "audit"
    say(f"$ cloudexit audit --db {state.path} --out {out} --force")  # the demo replaces its last audit
    result = write_audit(state, out, force=True)
    say(f"Audit written to {out / 'audit.html'} (migration {result.verdict['status']}); "
        f"check it any time with: cloudexit audit verify {out}")
