"""The migration audit, end to end: a synthetic PACS in SeaweedFS, the real `cloudexit inventory`,
`plan` and `migrate`, then `cloudexit audit`. Every figure is checked against the synthetic
PACS's ground truth; the HTML is rendered in headless Chromium."""

from __future__ import annotations

import csv
import hashlib
import json
import os
import re
import shutil
import sqlite3
import stat
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner, Result

from cloudexit.testing import synthetic
from cloudexit.report.audit import MANIFEST_COLUMNS, audit_facts, open_state
from cloudexit.report.html import render_html
from cloudexit.cli import main
from cloudexit.testing.s3server import SeaweedServer

ROOT = Path(__file__).resolve().parents[1]


def run(*args: Any) -> Result:
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


@pytest.fixture(scope="module")
def migrated(s3: SeaweedServer, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The tiny synthetic PACS inventoried, planned and migrated by the real commands."""
    mp = pytest.MonkeyPatch()
    for name, value in s3.env().items():
        mp.setenv(name, value)
    mp.delenv("AWS_PROFILE", raising=False)
    bucket = f"audit-{os.getpid()}-{os.urandom(4).hex()}"  # the fixture is also imported by test_audit_sign
    s3.client().create_bucket(Bucket=bucket)
    truth = synthetic.upload(s3.client(), bucket, synthetic.generate(synthetic.Profile.tiny()))
    root = tmp_path_factory.mktemp("audit")
    db, archive = root / "state" / "cloudexit.db", root / "archive"
    r = run("inventory", f"s3://{bucket}", "--db", db, "-q")
    assert r.exit_code == 0, r.output
    r = run("plan", "--db", db, "--provider", "aliyun-oss", "--region", "cn-hangzhou",
            "--bandwidth", "100Mbit/s", "-q")
    assert r.exit_code == 0, r.output
    r = run("migrate", "--to", archive, "--db", db, "--processes", "1", "--threads", "4", "-q")
    assert r.exit_code == 3, r.output  # the truncated object and the SOP UID conflict: quarantined
    out = root / "audit"
    r = run("audit", "--db", db, "--out", out)
    assert r.exit_code == 3, r.output  # complete, with exceptions to review
    yield {"truth": truth, "db": db, "archive": archive, "out": out, "root": root, "bucket": bucket,
           "output": r.output}
    mp.undo()


def facts_of(m: dict[str, Any]) -> dict[str, Any]:
    return json.loads((m["out"] / "audit.json").read_text())


def test_figures_match_the_synthetic_pacs(migrated) -> None:
    truth, f = migrated["truth"], facts_of(migrated)
    dicom = [o for o in truth if o.kind == "dicom"]
    conflict = [o for o in truth if o.case == "dup-sop-conflict"]
    truncated = [o for o in truth if o.case == "truncated"]
    src = f["source"]
    assert src["objects"] == len(truth)
    assert src["bytes"] == sum(o.size for o in truth)
    assert src["dicom_objects"] == len(dicom)
    assert src["instances"] == len({o.sop_uid for o in dicom})
    assert src["studies"] == len({o.study_uid for o in dicom})
    assert src["series"] == len({o.series_uid for o in dicom})
    assert src["patients"] == len({o.patient_id for o in dicom})
    assert src["non_dicom"] == sum(o.kind == "other" for o in truth)
    assert src["unreadable"] == sum(o.kind == "unreadable" for o in truth) == len(truncated) == 1
    assert src["duplicate_sop_uids"] == 1 and len(conflict) == 2

    [dest] = f["destinations"]
    assert dest["dest"] == f"file://{migrated['archive']}"
    # Every instance arrived (the conflicting second copy is kept in quarantine).
    for field in ("instances", "studies", "series", "patients"):
        assert dest[field] == src[field], field
    assert dest["studies_complete"] == src["studies"]
    assert dest["objects"] == len(truth) - 2
    assert dest["quarantined"]["objects"] == 2
    assert dest["quarantined"]["bytes"] == truncated[0].size + conflict[1].size or \
        dest["quarantined"]["bytes"] == truncated[0].size + conflict[0].size
    assert dest["bytes"] + dest["quarantined"]["bytes"] == src["bytes"]

    x = f["exceptions"]
    assert [i["key"] for i in x["quarantined"]["items"]] == [truncated[0].key]
    assert "truncated" in x["quarantined"]["items"][0]["reason"]
    assert x["conflicts"]["count"] == 1 and x["conflicts"]["items"][0]["key"] in {o.key for o in conflict}
    assert x["conflicts"]["items"][0]["conflict_with"] in {o.key for o in conflict}
    for empty in ("failed", "unfinished", "not_migrated", "changed", "missing", "deleted", "skipped",
                  "duplicates"):
        assert x[empty]["count"] == 0 and x[empty]["items"] == [], empty

    v = f["verification"]
    assert v["objects_checked"] == v["methods"]["size"] == v["methods"]["sha256"] == len(truth)
    assert v["methods"]["multipart"] == sum(o.multipart for o in truth)
    assert v["methods"]["md5"] == len(truth) - sum(o.multipart for o in truth)
    assert v["methods"]["dicom"] == len(dicom)  # both copies of the conflict parse; the truncated one does not
    assert f["verdict"]["status"] == "complete_with_exceptions"
    assert f["verdict"]["reasons"] == [{"code": "quarantined", "n": 2}]
    assert f["verdict"]["notes"] == [{"code": "verify_not_run"}]

    # Verified copies, but no `cloudexit verify` since: nothing is safe to delete yet (the rule
    # `cloudexit decommission` applies, tests/test_audit_decommission.py).
    d = f["decommission"]["totals"]
    assert d["keep"] == {"objects": len(truth) - 2, "bytes": dest["bytes"]}
    assert [r["reason"] for r in f["decommission"]["rows"] if r["decision"] == "keep"] == ["no_verify"]
    assert d["review"] == {"objects": 2, "bytes": dest["quarantined"]["bytes"]}
    assert d["safe"]["objects"] == d["gone"]["objects"] == 0
    # Inventoried once, nothing deleted from the cloud: both sections say "none".
    assert f["delta_rounds"] == {"rounds": [], "count": 0}
    assert f["deletion"]["executed"] is False and f["deletion"]["runs"] == []
    assert f["deletion"]["totals"]["deleted"] == 0 and f["deletion"]["still_present"] is None

    by_modality = Counter()
    for o in dicom:
        by_modality[o.modality] += o.size
    assert {r["name"]: r["bytes"] for r in f["charts"]["by_modality"]} == dict(by_modality)
    years = Counter()
    for o in dicom:
        years[o.study_date[:4]] += o.size
    assert {r["name"]: r["bytes"] for r in f["charts"]["by_study_year"]} == dict(years)
    assert sum(p[1] for p in f["charts"]["throughput"]["points"]) == src["bytes"]

    assert f["usage"]["bytes_downloaded"] >= src["bytes"]
    assert f["usage"]["requests"]["GET"] >= len(truth)
    assert f["runs"][0]["sessions"][0]["how"] == "finished"
    assert f["custody"]["operators"] and f["custody"]["hosts"]
    est, act = f["cost"]["estimated"], f["cost"]["actual"]
    assert est["provider"] == "aliyun-oss" and est["currency"] == "CNY"
    assert any(s["available"] and s["cost"]["expected"] >= 0 for s in est["scenarios"])
    assert act["cost"] is not None and act["cost"] >= 0 and act["why_not"] is None
    assert act["time_s"] is not None and act["time_s"] >= 0
    assert f["event_chain"]["intact"] and f["event_chain"]["events"] == f["events_export"]["events"]


def test_manifest_has_every_object_with_its_checksums(migrated) -> None:
    truth = {o.key: o for o in migrated["truth"]}
    with open(migrated["out"] / "manifest.csv", newline="", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    assert list(rows[0]) == list(MANIFEST_COLUMNS)
    assert sorted(r["key"] for r in rows) == sorted(truth)
    for r in rows:
        o = truth[r["key"]]
        assert int(r["size"]) == o.size and r["kind"] == o.kind
        assert r["sha256"] == hashlib.sha256(o.body()).hexdigest(), r["key"]
        assert r["state"] in ("verified", "quarantined")
        assert r["checks"].startswith("size,")
        assert r["decommission"] == ("keep: no_verify" if r["state"] == "verified" else "review: quarantined")
        if o.kind == "dicom":
            assert r["sop_uid"] == o.sop_uid and r["patient_hash"] and r["patient_hash"] != o.patient_id
    facts = facts_of(migrated)
    counted = Counter(r["decommission"].split(":")[0] for r in rows)
    for decision in ("safe", "review", "keep"):
        assert counted[decision] == facts["decommission"]["totals"][decision]["objects"]
    assert facts["manifest"]["rows"] == len(rows)


def test_no_patient_identity_unless_asked(migrated) -> None:
    truth = migrated["truth"]
    ids = {o.patient_id for o in truth if o.patient_id}
    for name in os.listdir(migrated["out"]):
        text = (migrated["out"] / name).read_text(encoding="utf-8")
        for pid in ids:
            assert pid not in text, (name, pid)
        for patient in synthetic.PATIENT_NAMES:
            assert patient not in text, (name, patient)
    html = (migrated["out"] / "audit.html").read_text()
    assert "PHI" not in html.split("<body>", 1)[1][:400]


def test_include_phi_is_said_on_every_page(migrated) -> None:
    out = migrated["root"] / "audit-phi"
    r = run("audit", "--db", migrated["db"], "--out", out, "--include-phi", "-q")
    assert r.exit_code == 3, r.output
    with open(out / "manifest.csv", newline="", encoding="utf-8") as fh:
        rows = {r["key"]: r for r in csv.DictReader(fh)}
    for o in migrated["truth"]:
        if o.kind == "dicom" and rows[o.key]["state"] == "verified":
            assert rows[o.key]["patient_id"] == o.patient_id
            assert rows[o.key]["patient_name"]
    html = (out / "audit.html").read_text()
    assert 'class="phi"' in html  # the banner on screen
    assert '@top-right{content:"Contains patient identity (PHI)"' in html  # every printed page
    assert json.loads((out / "audit.json").read_text())["phi_included"] is True


def test_files_are_private(migrated) -> None:
    out = migrated["out"]
    assert stat.S_IMODE(out.stat().st_mode) == 0o700
    assert sorted(os.listdir(out)) == sorted(["audit.html", "audit.json", "manifest.csv", "events.jsonl", "SHA256SUMS"])
    for name in os.listdir(out):
        assert stat.S_IMODE((out / name).stat().st_mode) == 0o600, name


def test_chinese_and_english_show_the_same_numbers(migrated) -> None:
    with open_state(migrated["db"]) as state:
        facts = audit_facts(state)
    facts["manifest"] = {"rows": 31}
    facts["events_export"] = {"events": 7}
    numbers = {lang: re.findall(r'class="n" data-v="([^"]*)"', render_html(facts, lang, "0" * 64))
               for lang in ("en", "zh")}
    assert len(numbers["en"]) > 80
    assert numbers["en"] == numbers["zh"]
    out = migrated["root"] / "audit-zh"
    assert run("audit", "--db", migrated["db"], "--out", out, "--lang", "zh", "-q").exit_code == 3
    html = (out / "audit.html").read_text()
    assert '<html lang="zh-CN">' in html and "数据迁移审计报告" in html and "签字确认" in html


def test_audit_verify_ok_and_each_kind_of_tampering(migrated, tmp_path: Path) -> None:
    good = migrated["out"]
    r = run("audit", "verify", good, "--db", migrated["db"])
    assert r.exit_code == 0, r.output
    assert r.output.startswith("OK: 4 files match SHA256SUMS; event chain intact (")

    def tampered(change) -> list[str]:
        copy = tmp_path / f"copy{len(os.listdir(tmp_path))}"
        shutil.copytree(good, copy)
        change(copy)
        res = run("audit", "verify", copy)
        assert res.exit_code == 1
        lines = res.output.splitlines()
        assert lines[0] == f"TAMPERED: {copy}"
        return [line.strip() for line in lines[1:]]

    def edit_manifest(d: Path) -> None:
        text = (d / "manifest.csv").read_text()
        (d / "manifest.csv").write_text(text.replace(',"verified",', ',"failed",', 1))

    assert tampered(edit_manifest) == ["manifest.csv: altered (SHA-256 differs from SHA256SUMS)"]
    assert tampered(lambda d: (d / "extra.txt").write_text("x")) == ["extra.txt: added (not in SHA256SUMS)"]
    assert tampered(lambda d: (d / "events.jsonl").unlink()) == ["events.jsonl: removed (listed in SHA256SUMS)"]

    def resum(d: Path) -> None:  # a careful forger also rewrites SHA256SUMS
        lines = []
        for name in ("audit.html", "audit.json", "manifest.csv", "events.jsonl"):
            lines.append(f"{hashlib.sha256((d / name).read_bytes()).hexdigest()}  {name}\n")
        (d / "SHA256SUMS").write_text("".join(lines))

    assert tampered(lambda d: (edit_manifest(d), resum(d))) == [
        ("audit.html: its fingerprint does not match manifest.csv, events.jsonl and audit.json "
        "(one of them was replaced)")]

    def edit_event(d: Path) -> None:
        lines = (d / "events.jsonl").read_text().splitlines(keepends=True)
        ev = json.loads(lines[2])
        ev["at"] = "2020-01-01T00:00:00+00:00"
        lines[2] = json.dumps(ev, ensure_ascii=False) + "\n"
        (d / "events.jsonl").write_text("".join(lines))
        resum(d)

    assert tampered(edit_event) == [
        (f"events.jsonl: event 3 ({json.loads((good / 'events.jsonl').read_text().splitlines()[2])['kind']}): "
        "content altered"),
        ("audit.html: its fingerprint does not match manifest.csv, events.jsonl and audit.json "
        "(one of them was replaced)")]


def test_output_folder_in_use_is_refused_unless_forced(migrated, tmp_path: Path) -> None:
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "notes.txt").write_text("mine")
    r = run("audit", "--db", migrated["db"], "--out", busy)
    assert r.exit_code == 1
    assert r.output == (f"Error: {busy} exists and holds other files (notes.txt)\n"
                        "  hint: write the audit into a new or empty folder, or pass --force\n")
    r = run("audit", "--db", migrated["db"], "--out", migrated["out"])
    assert r.exit_code == 1
    assert r.output == (f"Error: {migrated['out']} already holds an audit\n"
                        "  hint: keep it: choose another folder; replace it: pass --force\n")
    r = run("audit", "--db", migrated["db"], "--out", busy, "--force", "-q")
    assert r.exit_code == 3
    assert (busy / "notes.txt").read_text() == "mine" and (busy / "SHA256SUMS").exists()
    assert "1 other file(s)" in r.output
    v = run("audit", "verify", busy)
    assert v.exit_code == 1 and "notes.txt: added (not in SHA256SUMS)" in v.output


def test_no_migration_unreadable_and_foreign_db(migrated, tmp_path: Path) -> None:
    inventory_only = tmp_path / "inv.db"
    shutil.copy(migrated["db"], inventory_only)
    with sqlite3.connect(inventory_only) as conn:
        conn.execute("DELETE FROM transfers")
        conn.execute("DELETE FROM migration_runs")
    r = run("audit", "--db", inventory_only, "--out", tmp_path / "a")
    assert r.exit_code == 1
    assert r.output == (f"Error: no migration in {inventory_only}: nothing to audit yet\n"
                        "  hint: run `cloudexit migrate --to DIR` first; `cloudexit status` shows where things stand\n")
    garbage = tmp_path / "garbage.db"
    garbage.write_bytes(os.urandom(4096))
    r = run("audit", "--db", garbage, "--out", tmp_path / "b")
    assert r.exit_code == 1
    assert r.output == (f"Error: {garbage} is not a cloudexit state database (not an SQLite file)\n"
                        "  hint: pass --db with a new file name for a new migration\n")
    foreign = tmp_path / "foreign.db"
    with sqlite3.connect(foreign) as conn:
        conn.execute("CREATE TABLE t (x)")
    r = run("audit", "--db", foreign, "--out", tmp_path / "c")
    assert r.exit_code == 1
    assert r.output == (f"Error: {foreign} is not a cloudexit state database (another SQLite database)\n"
                        "  hint: pass --db with a new file name for a new migration\n")
    r = run("audit", "--db", tmp_path / "none.db", "--out", tmp_path / "d")
    assert r.exit_code == 1 and r.output.startswith(f"Error: no state database at {tmp_path / 'none.db'}")
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
    r = run("audit", "--db", migrated["db"])
    assert r.exit_code == 2 and r.output.startswith("Error: say where to write the audit: --out DIR")


def test_unfinished_migration_is_reported_as_not_complete(migrated, tmp_path: Path) -> None:
    db = tmp_path / "unfinished.db"
    shutil.copy(migrated["db"], db)
    with sqlite3.connect(db) as conn:  # as a kill -9 halfway would leave it
        conn.execute("UPDATE transfers SET state = 'queued', sha256 = NULL, verified_at = NULL "
                     "WHERE seq > 20")
        conn.execute("UPDATE transfers SET state = 'failed', reason = 'HTTP 403 AccessDenied' WHERE seq = 20")
        conn.execute("UPDATE migration_runs SET status = 'running', finished_at = NULL, pid = 999999999")
        # Someone also removes the run's last event: the hash chain shows it.
        gone = conn.execute("SELECT id FROM events WHERE kind = 'migrate.finished'").fetchone()[0]
        conn.execute("DELETE FROM events WHERE id = ?", (gone,))
    r = run("audit", "--db", db, "--out", tmp_path / "a", "--json")
    assert r.exit_code == 3
    verdict = json.loads(r.output)["verdict"]
    assert verdict["status"] == "incomplete"
    codes = {x["code"]: x for x in verdict["reasons"]}
    assert codes["unfinished"]["n"] == 11 and codes["failed"]["n"] == 1
    assert codes["not_finished"]["status"] == "interrupted"
    assert codes["chain_broken"]["n"] == 1
    html = (tmp_path / "a" / "audit.html").read_text()
    assert "NOT complete" in html and "HTTP 403 AccessDenied" in html
    facts = json.loads((tmp_path / "a" / "audit.json").read_text())
    held_back = {r["reason"]: r["objects"] for r in facts["decommission"]["rows"] if r["decision"] == "keep"}
    assert held_back["unfinished"] + held_back["failed"] == 12
    assert facts["runs"][0]["sessions"][-1]["how"] == "killed"
    assert facts["event_chain"]["problems"] == [
        f"event {gone + 1}: does not follow the event before it (an event was removed or inserted)"]


@pytest.mark.needs("chromium")
@pytest.mark.slow
def test_chromium_renders_it_with_no_errors_and_no_requests(migrated, tmp_path: Path) -> None:
    from chromium_pipe import render

    shot = tmp_path / "audit.png"
    url = (migrated["out"] / "audit.html").as_uri()
    seen = render(url, screenshot=shot)
    assert seen["errors"] == [] and seen["console"] == []
    assert seen["requests"] == [url]  # the page itself, nothing else
    assert shot.stat().st_size > 50_000 and seen["height"] > 3000
    assert 3 <= seen["pdf_pages"] <= 12  # prints on A4
    # The harness itself notices errors and requests (so the empty lists above mean something).
    bad = tmp_path / "bad.html"
    bad.write_text('<html><body><img src="http://127.0.0.1:9/x.png"><script>console.error("boom")</script></body></html>')
    seen = render(bad.as_uri())
    assert any("boom" in json.dumps(e) for e in seen["errors"])
    assert "http://127.0.0.1:9/x.png" in seen["requests"]
