"""Every figure of the audit, from the state DB (`audit_facts`: the body of audit.json). Each
comes from the DB through here; tests check them against the synthetic PACS's ground truth."""

from __future__ import annotations

import getpass
import socket
import sqlite3
from collections.abc import Callable, Iterable
from datetime import UTC, datetime
from typing import Any

from cloudexit import __version__
from cloudexit.core.states import GOOD, REVIEW, ObjectKind, ObjectStatus, RunStatus, ordered, sql_in
from cloudexit.core.states import TransferState as T
from cloudexit.dicom.containers import audit_facts as envelope_facts
from cloudexit.report.cost import charts, cost_facts, throughput, ts
from cloudexit.report.deletion import decommission_totals, deletion_proof, delta_rounds
from cloudexit.report.exceptions import distinct, exceptions
from cloudexit.report.groups import LIST_LIMIT, Groups, Rule, grouped
from cloudexit.report.manifest import read_patient
from cloudexit.report.verification import verification
from cloudexit.state.db import GENESIS_HASH, State, now
from cloudexit.state.members import zip_counts

FORMAT = "cloudexit.audit/1"
_SESSION_END = {"migrate.finished", "migrate.interrupted", "migrate.stopped"}
_PRESENT = f"o.status = '{ObjectStatus.PRESENT}'"
_DICOM = f"o.kind = '{ObjectKind.DICOM}'"


def audit_facts(state: State, include_phi: bool = False, limit: int = LIST_LIMIT,
                passes: Callable[[], Groups] | None = None, rule: Rule | None = None) -> dict[str, Any]:
    """Every figure of the report, from the state DB (JSON-ready; the body of audit.json).

    `passes`: gives `grouped()`, computed elsewhere in the same snapshot (write_audit's second
    thread adds the groups up while it writes the manifest); asked for after every query that
    does not need them. `rule`: the one those groups were judged by (read here if not given)."""
    rule = rule or Rule.of(state)
    dests = list(rule.dests)
    facts: dict[str, Any] = {
        "format": FORMAT,
        "generated_at": now(),
        "tool_version": __version__,
        "phi_included": include_phi,
        "audit_by": {"user": current_user(), "host": socket.gethostname()},
        "db": {"path": str(state.path.resolve()), "schema_version": state.schema_version(),
               "created_at": state.meta("created_at"), "created_by_version": state.meta("tool_version")},
    }
    facts["source"] = {}  # filled once the groups are in (see `passes`), here in the JSON
    facts["destinations"] = []
    facts["runs"] = _runs(state)
    facts["timeline"] = _timeline(state, facts["runs"])
    facts["usage"] = _usage(state)
    uids = _source_uids(state)
    speed = throughput(state, facts["timeline"])
    got = arrivals(state.conn, dests)
    groups, tgroups, changed = passes() if passes else (*grouped(state, rule), None)
    facts["source"] = _source(state, groups, uids)
    facts["cost"] = cost_facts(state, facts, tgroups)
    facts["charts"] = charts(speed, groups)
    facts["exceptions"] = exceptions(state, dests, groups, tgroups, limit, changed)
    if include_phi:  # who each listed exception is about, read from the archived file if any
        for category in facts["exceptions"].values():
            for item in category["items"]:
                item["patient_id"], item["patient_name"] = read_patient(item.get("dest"), item.get("path"))
    facts["verification"] = verification(state, tgroups, dests)
    facts["containers"] = envelope_facts(state.conn)  # decoded instances, PACS metadata
    facts["custody"] = _custody(state, dests)
    facts["residency"] = _residency(state, dests)
    facts["decommission"] = decommission_totals(groups)
    facts["delta_rounds"] = delta_rounds(state, rule)
    facts["deletion"] = deletion_proof(state, limit)
    facts["event_chain"] = _event_chain(state)
    facts["destinations"] = [_destination(state, d, tgroups, got[d]) for d in dests]
    facts["verdict"] = _verdict(state, facts)
    return facts


def _source_uids(state: State) -> dict[str, int]:
    """The distinct studies, series, patients and SOP Instance UIDs at the source."""
    dicom = f"FROM objects WHERE status = '{ObjectStatus.PRESENT}' AND kind = '{ObjectKind.DICOM}'"
    uids = state.query(
        "SELECT count(DISTINCT study_uid) AS studies, "
        f"count(DISTINCT series_uid) AS series, count(DISTINCT patient_hash) AS patients {dicom}")[0]
    # SOP Instance UIDs (one per object, mostly): grouped in the order of their index, not put in
    # a temporary B-tree, and the duplicates counted on the way.
    sops = state.query(f"SELECT count(*) AS instances, coalesce(sum(n > 1), 0) AS duplicates, "
                       f"coalesce(sum(n - 1), 0) AS copies FROM "
                       f"(SELECT count(*) AS n {dicom} AND sop_uid IS NOT NULL GROUP BY sop_uid)")[0]
    return {**dict(uids), **dict(sops)}


def _source(state: State, groups: list[dict[str, Any]], uids: dict[str, int]) -> dict[str, Any]:
    present = [g for g in groups if g["status"] == ObjectStatus.PRESENT]
    # the bucket's objects, each key once: not the files inside zips (cloudexit/state/members.py),
    # counted apart as status and plan count them
    bucket = [g for g in present if not g["member"]]

    def total(rows: list[dict[str, Any]], field: str = "objects") -> int:
        return sum(g[field] for g in rows)

    row = {"objects": total(bucket), "bytes": total(bucket, "bytes"),
           "dicom_objects": total([g for g in present if g["kind"] == ObjectKind.DICOM]),
           # as stored: a file inside a zip its bytes in the zip (what the charts add up)
           "dicom_bytes": total([g for g in present if g["kind"] == ObjectKind.DICOM], "stored"),
           "non_dicom": total([g for g in present if g["kind"] == ObjectKind.OTHER]),
           "unreadable": total([g for g in present if g["kind"] == ObjectKind.UNREADABLE]),
           "pending": total([g for g in present if g["kind"] == ObjectKind.PENDING]),
           "hostile_keys": total([g for g in present if g["hostile"]])}
    classes: dict[str, dict[str, Any]] = {}
    for g in bucket:
        c = classes.setdefault(g["sc"], {"name": g["sc"], "objects": 0, "bytes": 0})
        c["objects"] += g["objects"]
        c["bytes"] += g["bytes"]
    zips = dict(zip(("zip_archives", "zip_archives_not_unpacked", "zip_files"), zip_counts(state.conn)))
    latest = state.query("SELECT status, started_at, finished_at FROM inventory_rounds ORDER BY id DESC LIMIT 1")
    rounds = state.query("SELECT count(*) AS n, sum(list_requests) AS l, sum(get_requests) AS g, "
                         "sum(header_bytes) AS b FROM inventory_rounds")[0]
    return {
        "url": state.meta("source_url"), "endpoint": state.meta("endpoint_url"),
        "region": state.meta("region"),
        "objects": row["objects"], "bytes": row["bytes"],
        "dicom_objects": row["dicom_objects"] or 0, "dicom_bytes": row["dicom_bytes"] or 0,
        "instances": uids["instances"],
        "studies": uids["studies"], "series": uids["series"], "patients": uids["patients"],
        "non_dicom": row["non_dicom"] or 0, "unreadable": row["unreadable"] or 0,
        "pending": row["pending"] or 0, "hostile_keys": row["hostile_keys"] or 0,
        "deleted_at_source": total([g for g in groups if g["status"] == ObjectStatus.DELETED and not g["member"]]),
        **zips,
        "duplicate_sop_uids": uids["duplicates"],
        "duplicate_copies": uids["copies"],  # dicom_objects - instances: second copies of a UID
        "storage_classes": sorted(classes.values(), key=lambda c: -c["bytes"]),
        "inventory": {
            "rounds": rounds["n"],
            "status": latest[0]["status"] if latest else None,
            "started_at": latest[0]["started_at"] if latest else None,
            "finished_at": latest[0]["finished_at"] if latest else None,
            "list_requests": rounds["l"] or 0, "get_requests": rounds["g"] or 0,
            "header_bytes": rounds["b"] or 0,
        },
    }


def arrivals(conn: sqlite3.Connection, dests: Iterable[str]) -> dict[str, dict[str, int]]:
    """Per destination: the distinct instances, studies, series and patients with a verified
    copy there, and the studies complete there (each of their SOP Instance UIDs has one)."""
    out = {}
    for dest in dests:
        arrived = conn.execute(
            "SELECT count(DISTINCT o.sop_uid), count(DISTINCT o.study_uid), count(DISTINCT o.series_uid), "
            "count(DISTINCT o.patient_hash), count(*) FROM transfers t JOIN objects o ON o.key = t.key "
            f"WHERE t.dest = ? AND t.state IN {sql_in(GOOD)} AND {_DICOM}", (dest,)).fetchone()
        complete = conn.execute(
            "SELECT sum(good = n) FROM (SELECT o.study_uid, count(DISTINCT o.sop_uid) AS n, "
            f"count(DISTINCT CASE WHEN t.state IN {sql_in(GOOD)} THEN o.sop_uid END) AS good "
            "FROM objects o LEFT JOIN transfers t ON t.key = o.key AND t.dest = ? "
            f"WHERE {_PRESENT} AND {_DICOM} AND o.study_uid IS NOT NULL "
            "GROUP BY o.study_uid)", (dest,)).fetchone()[0]
        out[dest] = {**dict(zip(("instances", "studies", "series", "patients", "dicom_objects"), arrived)),
                     "studies_complete": complete or 0}
    return out


def _destination(state: State, dest: str, tgroups: list[dict[str, Any]], arrived: dict[str, int]) -> dict[str, Any]:
    by_state: dict[str, dict[str, int]] = {}
    for g in tgroups:
        if g["dest"] == dest:
            row = by_state.setdefault(g["state"], {"objects": 0, "bytes": 0})
            row["objects"] += g["n"]
            row["bytes"] += g["b"]
    hosts = [r[0] for r in state.query(
        "SELECT DISTINCT host FROM migration_runs WHERE dest = ? AND host IS NOT NULL", (dest,))]
    good = [by_state.get(name, {"objects": 0, "bytes": 0}) for name in ordered(GOOD)]
    return {
        "dest": dest,
        "kind": dest.split(":", 1)[0] if ":" in dest else "file",
        "hosts": hosts,
        "by_state": by_state,
        "objects": sum(g["objects"] for g in good),  # a verified copy is here (duplicates: kept once)
        "bytes": sum(g["bytes"] for name, g in zip(ordered(GOOD), good) if name != T.DUPLICATE),
        "dicom_objects": arrived["dicom_objects"],  # DICOM objects with a verified copy here
        "instances": arrived["instances"], "studies": arrived["studies"],
        "series": arrived["series"], "patients": arrived["patients"],
        "studies_complete": arrived["studies_complete"],
        # Kept aside for a person to decide: damaged objects and SOP Instance UID conflicts.
        "quarantined": {k: sum(by_state.get(name, {}).get(k, 0) for name in REVIEW) for k in ("objects", "bytes")},
    }


def _runs(state: State) -> list[dict[str, Any]]:
    sessions: dict[int, list[dict[str, Any]]] = {}
    outages: dict[int, list[dict[str, Any]]] = {}
    users: dict[int, str] = {}
    for ev in state.query(
            "SELECT at, kind, json_extract(detail, '$.run') AS run, json_extract(detail, '$.user') AS user "
            "FROM events WHERE kind IN ('migrate.started', 'migrate.resumed', 'migrate.finished', "
            "'migrate.interrupted', 'migrate.stopped', 'migrate.link_down', 'migrate.link_up') "
            "AND json_valid(detail) ORDER BY id"):
        run, kind = ev["run"], ev["kind"]
        if run is None:
            continue
        own = sessions.setdefault(run, [])
        if kind in ("migrate.started", "migrate.resumed"):
            if kind == "migrate.started" and ev["user"]:
                users[run] = ev["user"]
            if own and own[-1]["end"] is None:
                own[-1]["end"], own[-1]["how"] = ev["at"], "killed"  # no end event: kill -9, power
            own.append({"start": ev["at"], "end": None, "how": None,
                        "kind": "started" if kind == "migrate.started" else "resumed"})
        elif kind in _SESSION_END:
            if own and own[-1]["end"] is None:
                own[-1]["end"], own[-1]["how"] = ev["at"], kind.split(".", 1)[1]
        elif kind == "migrate.link_down":
            outages.setdefault(run, []).append({"from": ev["at"], "to": None})
        elif kind == "migrate.link_up":
            open_ = [o for o in outages.get(run, []) if o["to"] is None]
            if open_:
                open_[-1]["to"] = ev["at"]
    from cloudexit.engine.migrate import is_live

    out = []
    for r in state.query("SELECT * FROM migration_runs ORDER BY id"):
        live = is_live(r)
        own = sessions.get(r["id"]) or [{"start": r["started_at"], "end": r["finished_at"],
                                         "how": r["status"] if r["finished_at"] else None,
                                         "kind": "started"}]
        if own[-1]["end"] is None:
            own[-1]["how"] = RunStatus.RUNNING if live else "killed"
            if not live:
                own[-1]["end"] = r["heartbeat_at"]
        out.append({
            "id": r["id"], "dest": r["dest"], "status": r["status"] if live or r["status"] != RunStatus.RUNNING
            else RunStatus.INTERRUPTED, "live": live, "started_at": r["started_at"],
            "finished_at": r["finished_at"], "resumed": r["resumed"], "host": r["host"],
            "user": users.get(r["id"]), "stop_reason": r["stop_reason"],
            "sessions": own, "outages": outages.get(r["id"], []),
            "objects_verified": r["objects_verified"], "bytes_verified": r["bytes_verified"],
            "bytes_downloaded": r["bytes_downloaded"],
        })
    return out


def _timeline(state: State, runs: list[dict[str, Any]]) -> dict[str, Any]:
    starts = [r["started_at"] for r in runs]
    finished = all(r["finished_at"] for r in runs) and not any(r["live"] for r in runs)
    end = max((r["finished_at"] for r in runs if r["finished_at"]), default=None) if finished else None
    clock = datetime.now(UTC).timestamp()
    active = 0.0
    last_seen = None
    for r in runs:
        for s in r["sessions"]:
            a = ts(s["start"])
            b = ts(s["end"]) if s["end"] else (clock if s["how"] == RunStatus.RUNNING else a)
            if a is not None and b is not None:
                active += max(0.0, b - a)
                last_seen = max(last_seen or b, b)
    start = min(starts) if starts else None
    return {
        "started_at": start, "finished_at": end,
        "duration_s": (ts(end) - ts(start)) if (end and start) else None,  # type: ignore[operator]
        "active_s": round(active, 1),
        "last_activity_at": datetime.fromtimestamp(last_seen, UTC).isoformat(timespec="seconds")
        if last_seen else None,
    }


def _usage(state: State) -> dict[str, Any]:
    r = state.query(
        "SELECT coalesce(sum(bytes_downloaded), 0) AS b, coalesce(sum(get_requests), 0) AS g, "
        "coalesce(sum(head_requests), 0) AS h, coalesce(sum(list_requests), 0) AS l, "
        "coalesce(sum(restore_requests), 0) AS rr, coalesce(sum(retries), 0) AS retries, "
        "coalesce(sum(link_outages), 0) AS outages FROM migration_runs")[0]
    return {
        "bytes_downloaded": r["b"],
        "requests": {"GET": r["g"], "HEAD": r["h"], "LIST": r["l"], "RESTORE": r["rr"]},
        "retries": r["retries"], "link_outages": r["outages"],
        "restores": {x["status"]: x["n"] for x in state.query(
            "SELECT status, count(*) AS n FROM restores GROUP BY status")},
    }


def _custody(state: State, dests: list[str]) -> dict[str, Any]:
    users = [r[0] for r in state.query(
        "SELECT DISTINCT json_extract(detail, '$.user') FROM events WHERE kind = 'migrate.started' "
        "AND json_valid(detail) AND json_extract(detail, '$.user') IS NOT NULL")]
    hosts = [r[0] for r in state.query(
        "SELECT DISTINCT host FROM migration_runs WHERE host IS NOT NULL ORDER BY host")]
    rounds = [dict(r) for r in state.query(
        "SELECT id, started_at, finished_at, status, resumed FROM inventory_rounds ORDER BY id")]
    return {"operators": users, "hosts": hosts, "created_by_version": state.meta("tool_version"),
            "audit_version": __version__, "source": state.meta("source_url"),
            "endpoint": state.meta("endpoint_url"), "region": state.meta("region"),
            "destinations": dests, "inventory_rounds": rounds}


def _residency(state: State, dests: list[str]) -> dict[str, Any]:
    from cloudexit.plan.build import guess_provider

    endpoint = state.meta("endpoint_url")
    out = []
    for d in dests:
        hosts = [r[0] for r in state.query("SELECT DISTINCT host FROM migration_runs WHERE dest = ? "
                                           "AND host IS NOT NULL", (d,))]
        out.append({"dest": d, "hosts": hosts,
                    "path": d[len("file://"):] if d.startswith("file://") else None})
    return {"source": {"url": state.meta("source_url"), "endpoint": endpoint,
                       "region": state.meta("region"), "provider": guess_provider(endpoint)},
            "destinations": out}


def _event_chain(state: State) -> dict[str, Any]:
    problems = state.verify_event_chain()
    head = state.query("SELECT id, hash FROM events ORDER BY id DESC LIMIT 1")
    return {"events": int(state.scalar("SELECT count(*) FROM events") or 0),
            "head_id": head[0]["id"] if head else 0,
            "head_hash": head[0]["hash"] if head else GENESIS_HASH,
            "intact": not problems, "problems": problems[:20]}


def _verdict(state: State, facts: dict[str, Any]) -> dict[str, Any]:
    """complete | complete_with_exceptions | incomplete, with the reasons (codes and counts)."""
    blocking: list[dict[str, Any]] = []
    review: list[dict[str, Any]] = []
    notes: list[dict[str, Any]] = []
    src, x = facts["source"], facts["exceptions"]
    if not facts["event_chain"]["intact"]:
        blocking.append({"code": "chain_broken", "n": len(facts["event_chain"]["problems"])})
    if src["inventory"]["status"] != "complete":
        blocking.append({"code": "no_inventory"})
    if src["pending"]:
        blocking.append({"code": "pending", "n": src["pending"]})
    if x["not_migrated"]["count"]:
        blocking.append({"code": "not_migrated", "n": x["not_migrated"]["count"]})
    if x["unfinished"]["count"]:
        blocking.append({"code": "unfinished", "n": x["unfinished"]["count"]})
    for run in facts["runs"]:
        if run["live"]:
            blocking.append({"code": "running", "n": run["id"]})
    last = facts["runs"][-1] if facts["runs"] else None
    if last and not last["live"] and last["status"] not in (RunStatus.COMPLETE, RunStatus.PARTIAL):
        blocking.append({"code": "not_finished", "status": last["status"]})
    if x["failed"]["count"]:
        blocking.append({"code": "failed", "n": x["failed"]["count"]})
    # a stale copy of a file inside a zip too (its zip's own row says "zip_members")
    stale = facts["decommission"]["rows"] + facts["decommission"]["zip_files"]
    stale_n = sum(r["objects"] for r in stale if r["reason"] == "stale")
    if stale_n:
        blocking.append({"code": "stale", "n": stale_n})
    if x["missing"]["count"]:
        review.append({"code": "missing", "n": x["missing"]["count"]})
    # Objects kept aside anywhere (damaged or conflicting), each once however many destinations.
    quarantined = (distinct(state, f"t.state IN {sql_in(REVIEW)}")[0] if len(facts["destinations"]) > 1
                   else x["quarantined"]["count"] + x["conflicts"]["count"])
    if quarantined:
        review.append({"code": "quarantined", "n": quarantined})
    if x["skipped"]["count"]:
        review.append({"code": "skipped", "n": x["skipped"]["count"]})
    verify = facts["verification"]["verify"]
    failed = sum(r["findings_total"] for r in verify["runs"] if r["status"] == "failed")
    if failed:
        blocking.append({"code": "verify_problems", "n": failed})
    if verify["unverified"]:
        notes.append({"code": "verify_not_run"})
    status = "incomplete" if blocking else ("complete_with_exceptions" if review else "complete")
    return {"status": status, "complete": status != "incomplete", "reasons": blocking + review,
            "notes": notes}


def current_user() -> str:
    """The login name, for the record ('?' when the system cannot tell)."""
    try:
        return getpass.getuser()
    except Exception:  # noqa: BLE001
        return "?"


