"""The audit's queries on small state DBs written with SQL (no S3): every decommission case,
several destinations, runs with resumes and outages, `cloudexit verify` results."""

from __future__ import annotations

import csv
import io
import json
import os
import stat
from pathlib import Path

import pytest

from cloudexit.core import deletion
from cloudexit.decommission import _Judge
from cloudexit.report.audit import audit_facts, verify_audit, write_audit
from cloudexit.report.cost import bucket_size
from cloudexit.report.exceptions import exceptions
from cloudexit.report.groups import Rule, grouped, groups_of_walk
from cloudexit.report.manifest import manifest_lines
from cloudexit.state.db import State

ARCHIVE, PACS = "file:///srv/archive", "dicom://ORTHANC@pacs:4242"

# key: (object status, object etag, {dest: (state, transfer etag)}), expected decision
CASES = {
    "ok": ("present", "e1", {ARCHIVE: ("verified", "e1")}, "safe: verified"),
    "dup": ("present", "e1", {ARCHIVE: ("duplicate", "e1")}, "safe: verified"),
    "quar": ("present", "e1", {ARCHIVE: ("quarantined", "e1")}, "review: quarantined"),
    "stale": ("present", "e2", {ARCHIVE: ("verified", "e1")}, "keep: stale"),
    "failed": ("present", "e1", {ARCHIVE: ("failed", "e1")}, "keep: failed"),
    "missing": ("present", "e1", {ARCHIVE: ("missing", "e1")}, "keep: missing"),
    "skipped": ("present", "e1", {ARCHIVE: ("skipped", "e1")}, "keep: skipped"),
    "queued": ("present", "e1", {ARCHIVE: ("queued", "e1")}, "keep: unfinished"),
    "restoring": ("present", "e1", {ARCHIVE: ("restoring", "e1")}, "keep: unfinished"),
    "new": ("present", "e1", {}, "keep: not_migrated"),
    "deleted": ("deleted", "e1", {ARCHIVE: ("verified", "e1")}, "gone: deleted"),
}
# With a PACS as a second destination.
CASES_2 = {
    "both": ("present", "e1", {ARCHIVE: ("verified", "e1"), PACS: ("stored", "e1")}, "safe: verified"),
    "pacs-warning": ("present", "e1", {ARCHIVE: ("verified", "e1"), PACS: ("warning", "e1")}, "safe: verified"),
    "pacs-conflict": ("present", "e1", {ARCHIVE: ("verified", "e1"), PACS: ("conflict", "e1")}, "review: quarantined"),
    "pacs-failed": ("present", "e1", {ARCHIVE: ("verified", "e1"), PACS: ("failed", "e1")}, "keep: failed"),
    "archive-only": ("present", "e1", {ARCHIVE: ("verified", "e1")}, "keep: not_migrated"),
    "none": ("present", "e1", {}, "keep: not_migrated"),
    "gone": ("deleted", "e1", {}, "gone: deleted"),
}


def make_db(path: Path, cases: dict, dests: list[str], verified: bool = True) -> State:
    """Objects and transfers as `cases` say; `verified`: then a passed `cloudexit verify` of
    each destination (a PACS counted study st1 ok)."""
    state = State(path, create=True)
    state.set_meta(source_url="s3://unit", endpoint_url="https://oss-cn-beijing.aliyuncs.com", region="cn-beijing")
    with state.transaction() as tx:
        tx.execute("INSERT INTO inventory_rounds(started_at, finished_at, status) VALUES "
                   "('2025-01-01T00:00:00+00:00', '2025-01-01T01:00:00+00:00', 'complete')")
        for i, dest in enumerate(dests, 1):
            tx.execute("INSERT INTO migration_runs(id, started_at, finished_at, status, dest, options, host) "
                       "VALUES (?, '2025-01-02T00:00:00+00:00', '2025-01-02T02:00:00+00:00', 'partial', ?, '{}', 'gw')",
                       (i, dest))
        for n, (key, (status, etag, rows, _)) in enumerate(sorted(cases.items())):
            tx.execute("INSERT INTO objects(key, size, etag, status, kind, study_uid, series_uid, sop_uid, "
                       "modality, study_date, patient_hash, first_seen_round, last_seen_round) VALUES "
                       "(?, ?, ?, ?, 'dicom', 'st1', 'se1', ?, 'CT', '20200101', 'p1', 1, 1)",
                       (key, 1000 + n, etag, status, f"sop-{key}"))
            for dest, (tstate, tetag) in rows.items():
                done = tstate in ("verified", "duplicate", "quarantined", "stored", "warning", "conflict")
                tx.execute("INSERT INTO transfers(key, dest, seq, state, etag, size, kind, path, checks, reason, "
                           "verified_at, conflict_with) VALUES (?, ?, ?, ?, ?, ?, 'dicom', ?, ?, ?, ?, ?)",
                           (key, dest, n, tstate, tetag, 1000 + n, f"p/{key}" if dest == ARCHIVE else None,
                            "size,md5,dicom-sop-uid" if done else None, None if done else f"{tstate} here",
                            "2025-01-02T01:00:00+00:00" if done else None,
                            "ok" if tstate == "duplicate" else None))  # a duplicate of the verified `ok`
        for i, dest in enumerate(dests if verified else [], 1):
            tx.execute("INSERT INTO verify_runs(id, started_at, finished_at, dest, kind, options, status) "
                       "VALUES (?, '2025-01-03T00:00:00+00:00', '2025-01-03T01:00:00+00:00', ?, ?, '{}', 'passed')",
                       (i, dest, "dicom" if dest == PACS else "filesystem"))
            if dest == PACS:
                tx.execute("INSERT INTO verify_studies VALUES (?, 'st1', 99, 99, 1, 1, 'ok')", (i,))
    return state


def decisions(state: State, multi: bool = False) -> dict[str, str]:
    """Each object's decision by the audit's SQL (`multi`: the several-destination form)."""
    rule = Rule.of(state)
    if multi:
        return {r[0]: r[1] for r in state.query(f"SELECT o.key, {deletion.subquery_sql(rule.dests)} FROM objects o",
                                                deletion.params(rule.dests, rule.runs))}
    decision, source, params = rule.sql()
    return {r[0]: r[1] for r in state.query(f"SELECT o.key, {decision} FROM {source}", params)}


def deletable_by_decommission(state: State) -> set[str]:
    judge = _Judge(state, list(Rule.of(state).dests))
    return {r["key"] for r in state.query("SELECT key, etag FROM objects WHERE status = 'present'")
            if judge.judge(r["key"], r["etag"])[0]}


def test_decisions_single_destination(tmp_path: Path) -> None:
    with make_db(tmp_path / "one.db", CASES, [ARCHIVE]) as state:
        for multi in (False, True):
            assert decisions(state, multi) == {k: v[3] for k, v in CASES.items()}
        assert deletable_by_decommission(state) == {k for k, v in CASES.items() if v[3].startswith("safe")}
        facts = audit_facts(state)
        lines = "".join(text for text, _ in manifest_lines(state, Rule.of(state)))
    rows = list(csv.reader(io.StringIO(lines)))
    assert {r[0]: r[-1] for r in rows} == {k: v[3] for k, v in CASES.items()}
    totals = facts["decommission"]["totals"]
    assert totals["safe"]["objects"] == 2 and totals["review"]["objects"] == 1
    assert totals["gone"]["objects"] == 1 and totals["keep"]["objects"] == 7
    x = facts["exceptions"]
    assert (x["failed"]["count"], x["missing"]["count"], x["skipped"]["count"], x["unfinished"]["count"],
            x["changed"]["count"], x["not_migrated"]["count"], x["deleted"]["count"]) == (1, 1, 1, 2, 1, 1, 1)
    assert x["changed"]["items"][0]["remedy"] == "stale"
    assert facts["verdict"]["status"] == "incomplete"
    assert {r["code"] for r in facts["verdict"]["reasons"]} == {
        "not_migrated", "unfinished", "failed", "stale", "missing", "quarantined", "skipped"}


def test_decisions_two_destinations(tmp_path: Path) -> None:
    with make_db(tmp_path / "two.db", CASES_2, [ARCHIVE, PACS]) as state:
        assert decisions(state, multi=True) == {k: v[3] for k, v in CASES_2.items()}
        assert deletable_by_decommission(state) == {k for k, v in CASES_2.items() if v[3].startswith("safe")}
        facts = audit_facts(state)
        lines = "".join(text for text, _ in manifest_lines(state, Rule.of(state)))
    rows = list(csv.reader(io.StringIO(lines)))
    # One row per object and destination; an object in no destination has one row.
    assert len(rows) == sum(max(len(v[2]), 1) for v in CASES_2.values())
    assert {r[0]: r[-1] for r in rows} == {k: v[3] for k, v in CASES_2.items()}
    archive, pacs = facts["destinations"]
    assert archive["dest"] == ARCHIVE and pacs["dest"] == PACS
    assert pacs["objects"] == 2  # stored + warning
    assert facts["exceptions"]["conflicts"]["count"] == 1
    assert facts["exceptions"]["not_migrated"]["count"] == 2


@pytest.mark.parametrize("cases,dests", [(CASES, [ARCHIVE]), ({**CASES, **CASES_2}, [ARCHIVE, PACS])])
def test_groups_added_up_by_the_manifest_walk_are_the_grouped_queries(tmp_path: Path, cases: dict,
                                                                      dests: list[str]) -> None:
    # write_audit takes the report's groups from the manifest walk; audit_facts alone queries them.
    with make_db(tmp_path / "g.db", cases, dests) as state:
        with state.transaction() as tx:  # NULL and '' apart, a hostile key, a second study year
            tx.execute("UPDATE transfers SET not_checked = '' WHERE key = 'ok'")
            tx.execute("UPDATE objects SET key_flags = 'dotdot', study_date = '20190101' WHERE key = 'failed'")
        rule = Rule.of(state)
        walked: dict = {}
        changed: dict = {}
        lines = sum(n for _, n in manifest_lines(state, rule, walked=walked, changed=changed))
        groups = groups_of_walk(walked, len(dests) == 1)
        assert groups == grouped(state, rule)
        # The "changed" exceptions the walk found are the ones their query lists.
        assert changed and exceptions(state, dests, *groups, 200, changed) == exceptions(state, dests, *groups, 200)
        assert lines == sum(len(rows) or 1 for _, _, rows, _ in cases.values())


def test_an_audit_reads_the_destinations_and_verify_runs_once(tmp_path: Path) -> None:
    # The manifest's rule, the facts and the verification figures judge by one reading (a scan
    # of every transfer row for the destinations); queried again, they could also disagree.
    seen: list[str] = []
    with make_db(tmp_path / "d.db", {**CASES, **CASES_2}, [ARCHIVE, PACS]) as state:
        state.conn.set_trace_callback(seen.append)
        write_audit(state, tmp_path / "out")
        state.conn.set_trace_callback(None)
    assert sum("SELECT DISTINCT dest FROM transfers" in q for q in seen) == 1
    assert sum("SELECT id, dest, kind, started_at FROM verify_runs" in q for q in seen) == 1


def test_forced_audit_makes_files_left_readable_by_others_private(tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    for name in ("audit.json", "manifest.csv", ".audit-tmp-audit.html"):  # one left by a crashed run
        (out / name).write_text("old")
        os.chmod(out / name, 0o644)
    with make_db(tmp_path / "m.db", CASES, [ARCHIVE]) as state:
        write_audit(state, out, force=True)
    assert sorted(os.listdir(out)) == sorted(["audit.html", "audit.json", "manifest.csv", "events.jsonl",
                                              "SHA256SUMS"])
    for name in os.listdir(out):
        assert stat.S_IMODE((out / name).stat().st_mode) == 0o600, name


def test_runs_resumes_and_outages_from_the_event_log(tmp_path: Path) -> None:
    with make_db(tmp_path / "r.db", {"ok": CASES["ok"]}, [ARCHIVE]) as state:
        for kind, detail in (("migrate.started", {"user": "li.wei", "host": "gw"}), ("migrate.link_down", {}),
                             ("migrate.link_up", {"down_seconds": 30}), ("migrate.interrupted", {}),
                             ("migrate.resumed", {}), ("migrate.resumed", {}),  # a kill -9 in between
                             ("migrate.finished", {"status": "complete"})):
            state.log(kind, run=1, **detail)
        facts = audit_facts(state)
    [run] = facts["runs"]
    assert [(s["kind"], s["how"]) for s in run["sessions"]] == [
        ("started", "interrupted"), ("resumed", "killed"), ("resumed", "finished")]
    assert run["user"] == "li.wei" and len(run["outages"]) == 1 and run["outages"][0]["to"]
    assert facts["custody"]["operators"] == ["li.wei"]
    assert facts["residency"]["source"]["provider"] == "aliyun-oss"
    assert facts["residency"]["source"]["region"] == "cn-beijing"


def test_verify_results_are_reported(tmp_path: Path) -> None:
    with make_db(tmp_path / "v.db", {"ok": CASES["ok"], "quar": CASES["quar"]}, [ARCHIVE], verified=False) as state:
        if "verify_runs" not in {r[0] for r in state.query("SELECT name FROM sqlite_master")}:
            pytest.skip("this state schema has no verify tables yet")
        before = audit_facts(state)
        assert before["verification"]["verify"]["run"] is False
        assert before["exceptions"]["pacs"]["checked"] is False
        assert before["verdict"]["notes"] == [{"code": "verify_not_run"}]
        with state.transaction() as tx:
            tx.execute("INSERT INTO verify_runs(id, started_at, finished_at, dest, kind, options, status, summary) "
                       "VALUES (1, 'a', '2025-01-03T00:00:00+00:00', ?, 'filesystem', '{\"deep\": true}', 'failed', "
                       "'{\"files_rehashed\": 2}')", (ARCHIVE,))
            tx.execute("INSERT INTO verify_studies VALUES (1, 'st1', 2, 1, 1, 1, 'mismatch')")
            tx.execute("INSERT INTO verify_findings(run_id, level, problem, key, path, expected, found) "
                       "VALUES (1, 'file', 'sha256', 'ok', 'p/ok', 'aa', 'bb')")
        after = audit_facts(state)
    v = after["verification"]["verify"]
    assert v["run"] is True and v["unverified"] == []
    assert v["runs"][0]["findings_total"] == 1 and v["runs"][0]["deep"] is True
    pacs = after["exceptions"]["pacs"]
    assert pacs["checked"] and pacs["count"] == 1
    assert pacs["items"][0]["reason"] == "file sha256 (expected aa, found bb)"
    assert {"code": "verify_problems", "n": 1} in after["verdict"]["reasons"]
    assert after["verdict"]["status"] == "incomplete" and after["verdict"]["notes"] == []


def test_write_and_verify_on_a_sql_db(tmp_path: Path) -> None:
    with make_db(tmp_path / "w.db", CASES, [ARCHIVE]) as state:
        result = write_audit(state, tmp_path / "out", lang="zh")
        logged = state.query("SELECT detail FROM events WHERE kind = 'audit.written'")
    assert result.manifest_rows == len(CASES) and result.verdict["status"] == "incomplete"
    assert json.loads(logged[0]["detail"])["fingerprint"] == result.fingerprint
    report = verify_audit(tmp_path / "out", tmp_path / "w.db")
    assert report["ok"], report["problems"]
    assert report["db"]["recorded"] is True
    # The same folder checked against another migration's DB is not recorded there.
    with make_db(tmp_path / "other.db", CASES, [ARCHIVE]) as other:
        other.log("something.else")
    report = verify_audit(tmp_path / "out", tmp_path / "other.db")
    assert not report["ok"]
    assert "SHA256SUMS: the state DB has no audit.written event with this digest" in report["problems"][-1]


def test_safe_only_after_a_verify_that_found_nothing_as_decommission_decides(tmp_path: Path) -> None:
    cases = {k: CASES["ok"] for k in ("a", "b", "c", "d")} | {"dup": CASES["dup"]}
    with make_db(tmp_path / "unverified.db", cases, [ARCHIVE], verified=False) as state:
        with state.transaction() as tx:
            tx.execute("UPDATE transfers SET conflict_with = 'a' WHERE key = 'dup'")
        assert set(decisions(state).values()) == {"keep: no_verify"}
        assert deletable_by_decommission(state) == set()
    with make_db(tmp_path / "rule.db", cases, [ARCHIVE]) as state:
        with state.transaction() as tx:
            tx.execute("UPDATE transfers SET verified_at = '2025-01-04T00:00:00+00:00' WHERE key = 'b'")
            tx.execute("INSERT INTO verify_findings(run_id, level, problem, key, path) "
                       "VALUES (1, 'file', 'sha256', NULL, 'p/c')")
            tx.execute("UPDATE transfers SET conflict_with = 'b' WHERE key = 'dup'")  # its canonical copy: b
        want = {"a": "safe: verified", "b": "keep: landed_after_verify", "c": "keep: verify_problem",
                "d": "safe: verified", "dup": "safe: verified"}
        for multi in (False, True):
            assert decisions(state, multi) == want
        assert deletable_by_decommission(state) == {"a", "d", "dup"}
        facts = audit_facts(state)
    rows = {(r["decision"], r["reason"]): r["objects"] for r in facts["decommission"]["rows"]}
    assert rows == {("safe", "verified"): 3, ("keep", "landed_after_verify"): 1, ("keep", "verify_problem"): 1}
    # Copies that wait for a verify are home all the same (the chart counts them done).
    assert sum(y["done_bytes"] for y in facts["charts"]["by_study_year"]) == sum(
        y["bytes"] for y in facts["charts"]["by_study_year"])


def test_a_playbook_delta_round_is_shown_with_its_round(tmp_path: Path) -> None:
    with make_db(tmp_path / "delta.db", {"ok": CASES["ok"], "new": CASES["new"]}, [ARCHIVE]) as state:
        with state.transaction() as tx:
            tx.execute("INSERT INTO inventory_rounds(id, started_at, finished_at, status) VALUES "
                       "(2, '2025-01-05T00:00:00+00:00', '2025-01-05T00:10:00+00:00', 'complete')")
            tx.execute("UPDATE objects SET change = 'new', change_round = 2, first_seen_round = 2 WHERE key = 'new'")
        state.log("inventory.complete", round=2, new=1, changed=0, deleted=0)
        state.log("delta.round", playbook="nightly", round=2, new=1, changed=0, deleted=0, migrated=0)
        facts = audit_facts(state)
    [r] = facts["delta_rounds"]["rounds"]
    assert (r["round"], r["new"], r["changed"], r["deleted"], r["moved"], r["left"]) == (2, 1, 0, 0, 0, 1)
    assert r["playbook"]["playbook"] == "nightly" and r["playbook"]["migrated"] == 0


@pytest.mark.parametrize("span,bucket", [(1, 1), (100, 1), (121, 2), (3600, 30), (86400 * 30, 21600)])
def test_throughput_buckets(span: int, bucket: int) -> None:
    assert bucket_size(span) == bucket


def test_the_actual_cost_reads_the_zips_files_by_their_index_not_every_transfer(tmp_path: Path) -> None:
    """actual_classes counts the files inside zips: a bucket of 4,000 more copied objects and
    no zip costs SQLite no more steps than one of 11 (the planner once walked every transfer:
    0.19 s of CPU at 200,000 objects, the most of the audit's added CPU)."""
    from cloudexit.report.cost import actual_classes

    def steps(state: State) -> int:
        _, tgroups = grouped(state, Rule.of(state))
        ticks = [0]

        def tick() -> int:
            ticks[0] += 1
            return 0

        state.conn.set_progress_handler(tick, 100)  # called every 100 VM instructions
        actual_classes(state, tgroups, 10**6, 0)
        state.conn.set_progress_handler(None, 0)
        return ticks[0]

    with make_db(tmp_path / "small.db", CASES, [ARCHIVE]) as state:
        small = steps(state)
    with make_db(tmp_path / "big.db", CASES, [ARCHIVE]) as state:
        with state.transaction() as tx:
            tx.executemany("INSERT INTO objects(key, size, etag, status, kind, first_seen_round, last_seen_round) "
                           "VALUES (?, 1, 'e', 'present', 'dicom', 1, 1)", [(f"more/{i}",) for i in range(4000)])
            tx.executemany("INSERT INTO transfers(key, dest, seq, state, etag, size, kind, path, checks) "
                           "VALUES (?, ?, ?, 'verified', 'e', 1, 'dicom', ?, 'size,md5')",
                           [(f"more/{i}", ARCHIVE, 100 + i, f"m/{i}") for i in range(4000)])
        big = steps(state)
    assert big <= small + 5, (small, big)
