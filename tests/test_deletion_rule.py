"""The deletion rule's two forms (SQL for the audit, Python for decommission) against a
brute-force oracle written here, independently, from the rule as docs/decommission.md states it:
thousands of random objects, transfer rows, verify runs and findings (seeded, so a failure
repeats), on real state DBs. The hand-written cases are in test_audit_units.py."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import pytest

from cloudexit.core import deletion
from cloudexit.core.states import TransferState
from cloudexit.decommission import _Judge
from cloudexit.report.groups import Rule
from cloudexit.state.db import State

A, A2 = "file:///srv/archive", "file:///mnt/second"
P, W = "dicom://ORTHANC@pacs:4242", "dicomweb+https://pacs.example/dicom-web"
CONFIGS = [[A], [P], [A, P], [A, A2], [P, A, W], [A2, P, A]]
STATES = [str(s) for s in TransferState]
TIMES = ["2025-01-02T00:00:00+00:00", "2025-01-03T00:00:00+00:00", "2025-01-04T00:00:00+00:00"]
STUDIES = [f"st{i}" for i in range(6)]

# The oracle: first the object, then each destination that applies, worst reason wins.
WORST_FIRST = ["not_migrated", "stale", "failed", "missing", "skipped", "unfinished", "quarantined",
               "duplicate_unverified", "no_verify", "landed_after_verify", "verify_problem", "study_not_ok",
               "verified"]


def oracle(o: dict | None, rows: dict[tuple[str, str], dict], dests: list[str], runs: dict[str, dict],
           findings: dict[int, list[dict]], studies: dict[tuple[int, str], str], etag: str | None) -> str:
    if o is None:
        return "keep: not_inventoried"
    if o["status"] == "deleted":
        return "gone: deleted"
    pacs = {d for d in dests if d.startswith(("dicom://", "dicomweb+"))}
    wanted = [d for d in dests if d not in pacs or o["kind"] == "dicom"]
    if not wanted:
        return "keep: not_migrated"
    reasons = []
    for d in wanted:
        t = rows.get((o["key"], d))
        reasons.append(_one(o, t, d in pacs, runs.get(d), findings, studies, etag, rows))
    worst = min(reasons, key=WORST_FIRST.index)
    return {"verified": "safe: verified", "quarantined": "review: quarantined"}.get(worst, f"keep: {worst}")


def _one(o: dict, t: dict | None, pacs: bool, run: dict | None, findings: dict[int, list[dict]],
         studies: dict[tuple[int, str], str], etag: str | None, rows: dict[tuple[str, str], dict]) -> str:
    if t is None:
        return "not_migrated"
    state = t["state"]
    good = state in ("verified", "duplicate", "stored", "warning")
    aside = state in ("quarantined", "conflict")
    if (good or aside) and t["etag"] != etag:
        return "stale"
    if state in ("failed", "missing", "skipped"):
        return state
    if not good and not aside:
        return "unfinished"
    if aside:
        return "quarantined"
    if state == "duplicate":
        canonical = rows.get((t["conflict_with"], t["dest"]))
        if canonical is None or canonical["state"] not in ("verified", "stored", "warning"):
            return "duplicate_unverified"
    if run is None:
        return "no_verify"
    landed = t["verified_at"] if t["verified_at"] is not None else t["updated_at"]
    if (landed or "") > run["started_at"]:
        return "landed_after_verify"
    for f in findings.get(run["id"], []):
        if (f["key"] is not None and f["key"] == o["key"]) or (f["path"] is not None and f["path"] == t["path"]) \
                or (f["sop_uid"] is not None and f["sop_uid"] == o["sop_uid"]) \
                or (f["level"] in ("study", "series") and f["study_uid"] is not None
                    and f["study_uid"] == o["study_uid"]):
            return "verify_problem"
    if pacs and studies.get((run["id"], o["study_uid"])) != "ok":
        return "study_not_ok"
    return "verified"


def random_db(path: Path, rng: random.Random, dests: list[str], n: int) -> tuple[State, dict[str, Any]]:
    """A state DB of `n` random objects, their transfers to `dests`, and a random verify run
    (or none) per destination with random findings and study counts."""
    state = State(path, create=True)
    objects, rows, runs, findings, studies = [], {}, {}, {}, {}
    for i in range(n):
        objects.append({"key": f"k{i:05d}", "status": rng.choice(["present"] * 9 + ["deleted"]),
                        "kind": rng.choice(["dicom"] * 4 + ["other"]), "etag": rng.choice(["e1", "e1", "e2"]),
                        "study_uid": rng.choice(STUDIES), "sop_uid": rng.choice([f"sop{i}", f"sop{i}", None,
                                                                                  f"sop{rng.randrange(n)}"])})
    keys = [o["key"] for o in objects]
    for o in objects:
        for d in dests:
            if (d.startswith(("dicom://", "dicomweb+")) and o["kind"] != "dicom") or rng.random() < 0.1:
                continue
            rows[o["key"], d] = {
                "key": o["key"], "dest": d, "state": rng.choice(STATES + ["verified", "stored"] * 4),
                "etag": rng.choice([o["etag"], o["etag"], o["etag"], "e0"]),
                "path": f"p/{o['key']}" if rng.random() < 0.8 else None,
                "verified_at": rng.choice(TIMES + [None]), "updated_at": rng.choice(TIMES + [None]),
                "conflict_with": rng.choice(keys + [None]),
            }
    for i, d in enumerate(dests, 1):
        if rng.random() < 0.2:
            continue  # never verified
        runs[d] = {"id": i, "started_at": rng.choice(TIMES)}
        findings[i] = [{"level": rng.choice(["object", "file", "study", "series", "instance"]),
                        "key": rng.choice(keys + [None] * 3), "path": rng.choice([f"p/{rng.choice(keys)}", None]),
                        "sop_uid": rng.choice([f"sop{rng.randrange(n)}", None, None]),
                        "study_uid": rng.choice(STUDIES + [None])} for _ in range(rng.randrange(8))]
        for s in STUDIES:
            if rng.random() < 0.85:
                studies[i, s] = rng.choice(["ok", "ok", "ok", "mismatch", "missing"])
    with state.transaction() as tx:
        tx.execute("INSERT INTO inventory_rounds(started_at, finished_at, status) VALUES (?, ?, 'complete')",
                   (TIMES[0], TIMES[0]))
        for i, d in enumerate(dests, 1):
            if not d.startswith(("dicom://", "dicomweb+")):  # PACS deliveries ride an archive run
                tx.execute("INSERT INTO migration_runs(id, started_at, status, dest, options) "
                           "VALUES (?, ?, 'partial', ?, '{}')", (i, TIMES[0], d))
        tx.executemany("INSERT INTO objects(key, size, etag, status, kind, study_uid, sop_uid, first_seen_round, "
                       "last_seen_round) VALUES (:key, 1, :etag, :status, :kind, :study_uid, :sop_uid, 1, 1)", objects)
        tx.executemany("INSERT INTO transfers(key, dest, seq, state, etag, size, path, verified_at, updated_at, "
                       "conflict_with) VALUES (:key, :dest, 0, :state, :etag, 1, :path, :verified_at, :updated_at, "
                       ":conflict_with)", list(rows.values()))
        for d, run in runs.items():
            tx.execute("INSERT INTO verify_runs(id, started_at, finished_at, dest, kind, options, status) "
                       "VALUES (?, ?, ?, ?, 'x', '{}', ?)", (run["id"], run["started_at"], run["started_at"], d,
                                                              rng.choice(["passed", "failed"])))
        tx.executemany("INSERT INTO verify_findings(run_id, level, problem, key, path, sop_uid, study_uid) "
                       "VALUES (?, ?, 'x', ?, ?, ?, ?)",
                       [(r, f["level"], f["key"], f["path"], f["sop_uid"], f["study_uid"])
                        for r, fs in findings.items() for f in fs])
        tx.executemany("INSERT INTO verify_studies VALUES (?, ?, 1, 1, 1, 1, ?)",
                       [(r, s, st) for (r, s), st in studies.items()])
    world = {"objects": objects, "rows": rows, "runs": runs, "findings": findings, "studies": studies}
    return state, world


@pytest.mark.parametrize("config", range(len(CONFIGS)))
def test_both_forms_of_the_rule_agree_with_a_brute_force_oracle(tmp_path: Path, config: int) -> None:
    dests = CONFIGS[config]
    rng = random.Random(1400 + config)
    state, w = random_db(tmp_path / "r.db", rng, dests, 600)
    with state:
        assert set(Rule.of(state).dests) == set(dests)
        dests = list(Rule.of(state).dests)  # the order the audit uses

        def expect(o: dict | None, etag: str | None) -> str:
            return oracle(o, w["rows"], dests, w["runs"], w["findings"], w["studies"], etag)

        want = {o["key"]: expect(o, o["etag"]) for o in w["objects"]}
        assert len(set(want.values())) >= 8, "the random rows should reach most conditions"
        # The SQL form, as the audit uses it (the one-destination CASE or the several-destination subquery).
        decision, source, params = Rule.of(state).sql()
        got = {r[0]: r[1] for r in state.query(f"SELECT o.key, {decision} FROM {source}", params)}
        assert got == want
        # The self-contained subquery (the several-destination form), for one destination too.
        got = {r[0]: r[1] for r in state.query(f"SELECT o.key, {deletion.subquery_sql(dests)} FROM objects o",
                                               deletion.params(dests, Rule.of(state).runs))}
        assert got == want
        # The Python form, as decommission uses it: the current version, an older one, a new key.
        judge = _Judge(state, dests)
        judge.load([o["key"] for o in w["objects"][:500]])
        for o in w["objects"]:
            for etag in (o["etag"], "e0"):
                decided = judge.decide(o["key"], etag)
                assert decided.label == expect(o, etag), (o, etag)
                safe, held, _, reason = judge.judge(o["key"], etag)
                assert safe == (decided.label == "safe: verified") and reason
                assert held == [d for d in dests if expect(o, etag) == "safe: verified"
                                and (not d.startswith(("dicom://", "dicomweb+")) or o["kind"] == "dicom")] or not safe
        assert judge.decide("never-seen", "e1").label == expect(None, "e1")


def test_the_oracle_order_is_the_tables() -> None:
    # The oracle's order is written out above; the table must rank its conditions the same way.
    assert [c.name for c in deletion.COPY_CONDITIONS] + [deletion.SAFE.name] == WORST_FIRST


def test_a_copy_of_another_version_is_named_by_its_state_and_says_so() -> None:
    # Decommission judging a noncurrent version (e0) whose key's only row failed for e1.
    o = {"key": "k", "status": "present", "kind": "dicom", "study_uid": "st", "sop_uid": "s"}
    t = {"key": "k", "dest": A, "state": "failed", "etag": "e1", "reason": "timed out", "sha256": None}
    decided = deletion.decide(o, {A: t}, [A], {}, "e0")
    assert decided.label == "keep: failed"
    assert decided.reason("e0", t) == ("failed: at file:///srv/archive (timed out); that is ETag e1, "
                                      "this version (e0) was never migrated")
    assert decided.reason("e1", t) == "failed: at file:///srv/archive (timed out)"
