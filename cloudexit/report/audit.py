"""The migration audit: what was moved, that it is complete and intact, what went wrong, what
it cost; and proof that nobody edited the record afterwards.

`audit_facts(state)` holds every query: each figure in the report comes from the state DB
through it (tests check them against the synthetic PACS's ground truth). `write_audit()` writes
into one folder, read in a single SQLite snapshot so a migration running beside it cannot make
the files disagree:

* `manifest.csv`: one row per object and destination, streamed (bounded memory);
* `events.jsonl`: the hash-chained event log, exported as stored, so its chain can be
  recomputed without the DB;
* `audit.json`: the facts (format `cloudexit.audit/1`, documented in docs/audit.md);
* `audit.html`: the report (rendered by `cloudexit.audit_html`), carrying a *fingerprint*,
  the SHA-256 over the three data files above, for the signed paper copy;
* `SHA256SUMS` over all of them (`sha256sum -c` reads it too);
* with `signer` (`--sign KEY`), `SHA256SUMS.sig`: SHA256SUMS signed with an SSH key
  (`cloudexit.audit_sign`); audit.html names the signer and the key fingerprint.

`verify_audit(dir)` recomputes all of that and says exactly which file was altered, added or
removed, and whether the exported event chain is intact. The audit also appends an
`audit.written` event (fingerprint and SHA256SUMS digest) to the DB's own chain.
"""

from __future__ import annotations

import getpass
import hashlib
import heapq
import json
import os
import socket
import sqlite3
import threading
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from cloudexit import __version__
from cloudexit.report.sign import SIGNATURE  # beside SHA256SUMS, which it signs (so not listed in it)
from cloudexit.dicom.containers import audit_facts as envelope_facts
from cloudexit.core.errors import CloudexitError
from cloudexit.core.files import make_private_dirs, open_private
from cloudexit.report.redact import Redactor
from cloudexit.state.db import GENESIS_HASH, State, event_hash, now, open_readable

FORMAT = "cloudexit.audit/1"
OUTPUTS = ("audit.html", "audit.json", "manifest.csv", "events.jsonl", "SHA256SUMS")
FINGERPRINTED = ("manifest.csv", "events.jsonl", "audit.json")  # what the fingerprint covers
GOOD = ("verified", "duplicate", "stored", "warning")  # a verified copy is in the destination
GOOD_SQL = "('verified', 'duplicate', 'stored', 'warning')"
REVIEW = ("quarantined", "conflict")  # a copy is kept, a person decides
WAITING = ("queued", "fetching", "inspect", "restoring")
LIST_LIMIT = 200  # exception rows listed in audit.json and audit.html per category

MANIFEST_COLUMNS = (
    "key", "size", "etag", "last_modified", "storage_class", "source_checksums", "source_status",
    "kind", "study_uid", "series_uid", "sop_uid", "modality", "study_date", "patient_hash",
    "destination", "state", "path", "sha256", "md5", "checks", "not_checked", "reason",
    "conflict_with", "attempts", "started_at", "verified_at",
    # an object in an envelope (containers.py): how it was stored, and the raw object's SHA-256
    # when the file is its decoded instance; Orthanc's metadata attachments say what they are
    "encoding", "raw_sha256", "pacs_metadata",
    "worker",  # migrate --cluster: the dask worker that fetched it (empty: the coordinator's machine)
    "decommission",
)
PHI_COLUMNS = ("patient_id", "patient_name")

# Check names recorded by migrate (transfers.checks) -> report methods.
CHECK_METHODS = {
    "size": "size", "md5": "md5", "etag-multipart": "multipart",
    "x-amz-checksum-crc32": "crc32", "x-amz-checksum-crc32c": "crc32",
    "x-amz-checksum-crc64nvme": "crc64", "x-oss-hash-crc64ecma": "crc64",
    "x-cos-hash-crc64ecma": "crc64", "x-obs-hash-crc64ecma": "crc64",
    "x-amz-checksum-sha1": "sha", "x-amz-checksum-sha256": "sha",
    "dicom-sop-uid": "dicom",
}
METHODS = ("size", "md5", "multipart", "crc32", "crc64", "sha", "sha256", "dicom", "pacs", "sample")
_SESSION_END = {"migrate.finished", "migrate.interrupted", "migrate.stopped"}


class AuditError(CloudexitError):
    """The audit cannot be written (no migration, output folder in use)."""


# -- opening ----------------------------------------------------------------------------------
def open_state(db_path: str | os.PathLike[str]) -> State:
    """Open a state DB for the audit; refuse one without a migration. A read-only DB is read
    through a private copy (the `audit.written` event then goes nowhere: `scratch_of`)."""
    path = Path(db_path)
    if path.exists() and not os.access(path, os.R_OK):
        raise AuditError(f"cannot read {path}: permission denied")
    state = open_readable(path, scratch=True)
    try:
        runs = state.scalar("SELECT count(*) FROM migration_runs")
    except Exception:
        state.close()
        raise
    if not runs:
        state.close()
        raise AuditError(f"no migration in {path}: nothing to audit yet",
                         hint="run `cloudexit migrate --to DIR` first; `cloudexit status` shows where things stand")
    return state


# -- the facts --------------------------------------------------------------------------------
def destinations(state: State) -> list[str]:
    return [r[0] for r in state.query(
        "SELECT dest FROM (SELECT dest, min(id) AS o FROM migration_runs GROUP BY dest "
        "UNION ALL SELECT dest, 1e18 FROM (SELECT DISTINCT dest FROM transfers)) "
        "GROUP BY dest ORDER BY min(o), dest")]


# (object groups, transfer groups, per destination its first LIST_LIMIT "changed" exceptions as
# (-seq, -rowid) of their transfers (a heap), or None: not known, to be queried)
Groups = tuple[list[dict[str, Any]], list[dict[str, Any]], dict[str, list[tuple[int, int]]] | None]


def audit_facts(state: State, include_phi: bool = False, limit: int = LIST_LIMIT,
                passes: Callable[[], Groups] | None = None) -> dict[str, Any]:
    """Every figure of the report, from the state DB (JSON-ready; the body of audit.json).

    `passes`: gives `_passes()`, computed elsewhere in the same snapshot (write_audit's second
    thread adds the groups up while it writes the manifest); asked for after every query that
    does not need them."""
    dests = destinations(state)
    facts: dict[str, Any] = {
        "format": FORMAT,
        "generated_at": now(),
        "tool_version": __version__,
        "phi_included": include_phi,
        "audit_by": {"user": current_user(), "host": socket.gethostname()},
        "db": {"path": str(state.path.resolve()), "schema_version": state.schema_version(),
               "created_at": state.meta("created_at"), "created_by_version": state.meta("tool_version")},
    }
    rule = Rule(tuple(dests), last_verify_runs(state))
    facts["source"] = {}  # filled once the groups are in (see `passes`), here in the JSON
    facts["destinations"] = []
    facts["runs"] = _runs(state)
    facts["timeline"] = _timeline(state, facts["runs"])
    facts["usage"] = _usage(state)
    uids = _source_uids(state)
    throughput = _throughput(state, facts["timeline"])
    got = arrivals(state.conn, dests)
    groups, tgroups, changed = passes() if passes else (*_passes(state, rule), None)
    facts["source"] = _source(state, groups, uids)
    facts["cost"] = _cost(state, facts, tgroups)
    facts["charts"] = _charts(throughput, groups)
    facts["exceptions"] = _exceptions(state, dests, groups, tgroups, limit, changed)
    if include_phi:  # who each listed exception is about, read from the archived file if any
        for category in facts["exceptions"].values():
            for item in category["items"]:
                item["patient_id"], item["patient_name"] = read_patient(item.get("dest"), item.get("path"))
    facts["verification"] = _verification(state, tgroups)
    facts["containers"] = envelope_facts(state.conn)  # decoded instances, PACS metadata
    facts["custody"] = _custody(state, dests)
    facts["residency"] = _residency(state, dests)
    facts["decommission"] = _decommission(groups)
    facts["delta_rounds"] = _delta_rounds(state, rule)
    facts["deletion"] = _deletion(state, limit)
    facts["event_chain"] = _event_chain(state)
    facts["destinations"] = [_destination(state, d, tgroups, got[d]) for d in dests]
    facts["verdict"] = _verdict(state, facts)
    return facts


def _one(state: State, sql: str, params: Any = ()) -> int:
    return int(state.scalar(sql, params) or 0)


def _source_uids(state: State) -> dict[str, int]:
    """The distinct studies, series, patients and SOP Instance UIDs at the source."""
    dicom = "FROM objects WHERE status = 'present' AND kind = 'dicom'"
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
    present = [g for g in groups if g["status"] == "present"]

    def total(rows: list[dict[str, Any]], field: str = "objects") -> int:
        return sum(g[field] for g in rows)

    row = {"objects": total(present), "bytes": total(present, "bytes"),
           "dicom_objects": total([g for g in present if g["kind"] == "dicom"]),
           "dicom_bytes": total([g for g in present if g["kind"] == "dicom"], "bytes"),
           "non_dicom": total([g for g in present if g["kind"] == "other"]),
           "unreadable": total([g for g in present if g["kind"] == "unreadable"]),
           "pending": total([g for g in present if g["kind"] == "pending"]),
           "hostile_keys": total([g for g in present if g["hostile"]])}
    classes: dict[str, dict[str, Any]] = {}
    for g in present:
        c = classes.setdefault(g["sc"], {"name": g["sc"], "objects": 0, "bytes": 0})
        c["objects"] += g["objects"]
        c["bytes"] += g["bytes"]
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
        "deleted_at_source": total([g for g in groups if g["status"] == "deleted"]),
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


_TRANSFER_GROUPS = (
    "t.dest, t.state, t.conflict_with IS NOT NULL AS conflict, t.changes > 0 AS changed, "
    "(t.state IN ('verified', 'duplicate', 'stored', 'warning', 'quarantined', 'conflict') "
    "AND o.status = 'present' AND t.etag IS NOT o.etag) AS stale, "
    "coalesce(o.storage_class, 'STANDARD') AS sc, t.checks, t.not_checked")
_TRANSFER_SUMS = "count(t.key) AS n, coalesce(sum(t.size), 0) AS b, coalesce(sum(t.sha256 IS NOT NULL), 0) AS sha"
_OBJECT_GROUPS = (
    "o.status, o.kind, coalesce(o.modality, '') AS modality, "
    "coalesce(substr(o.study_date, 1, 4), '') AS year, coalesce(o.storage_class, 'STANDARD') AS sc, "
    "o.key_flags IS NOT NULL AS hostile")
_OBJECT_SUMS = "count(*) AS objects, coalesce(sum(o.size), 0) AS bytes"
_OBJECT_KEYS = ("decision", "status", "kind", "modality", "year", "sc", "hostile")
_TRANSFER_KEYS = ("dest", "state", "conflict", "changed", "stale", "sc", "checks", "not_checked")


def _passes(state: State, rule: Rule) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(object groups, transfer groups): everything the report breaks figures down by.

    One destination (the usual case): one scan of `objects` joined with `transfers`, grouped by
    both sets of columns at once (each sort of a million rows costs seconds); several: a scan
    of each table."""
    decision, source, params = rule.sql()
    if len(rule.dests) != 1:
        groups = [dict(r) for r in state.query(
            f"SELECT {decision} AS decision, {_OBJECT_GROUPS}, {_OBJECT_SUMS} FROM {source} "
            "GROUP BY 1, 2, 3, 4, 5, 6, 7", params)]
        return groups, [dict(r) for r in state.query(
            f"SELECT {_TRANSFER_GROUPS}, {_TRANSFER_SUMS} FROM transfers t JOIN objects o ON o.key = t.key "
            "GROUP BY 1, 2, 3, 4, 5, 6, 7, 8")]
    both = state.query(
        f"SELECT {decision} AS decision, {_OBJECT_GROUPS}, {_TRANSFER_GROUPS.replace(' AS sc,', ' AS tsc,')}, "
        f"{_OBJECT_SUMS}, {_TRANSFER_SUMS} FROM {source} GROUP BY {', '.join(str(i) for i in range(1, 16))}",
        params)
    return _fold(both, _OBJECT_KEYS, ("objects", "bytes")), _fold(
        [r for r in both if r["dest"] is not None], _TRANSFER_KEYS, ("n", "b", "sha"), {"sc": "tsc"})


def _fold(rows: list[Any], keys: tuple[str, ...], sums: tuple[str, ...],
          rename: dict[str, str] | None = None) -> list[dict[str, Any]]:
    """Rows grouped by `keys`, with `sums` added up (the merged pass split in two)."""
    rename = rename or {}
    out: dict[tuple[Any, ...], dict[str, Any]] = {}
    for r in rows:
        ident = tuple(r[rename.get(k, k)] for k in keys)
        g = out.get(ident)
        if g is None:
            out[ident] = {**dict(zip(keys, ident)), **{k: r[k] for k in sums}}
        else:
            for k in sums:
                g[k] += r[k]
    return list(out.values())


def _sql_order(value: Any) -> tuple[int, Any]:
    """Sort key ordering values as SQLite's GROUP BY does: NULL, numbers, text (BINARY)."""
    if value is None:
        return (0, 0)
    return (1, value) if isinstance(value, int | float) else (2, value)


def groups_of_walk(walked: dict[tuple[str, str, str | None], list[int]],
                   single: bool) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """`_passes`'s answer, rebuilt from what the manifest walk added up (see manifest_lines):
    the same groups, in the same order (ties in the report's rankings keep it)."""
    rows = []
    for (decision, okey, tkey), (lines, objects, size, tsize, sha) in walked.items():
        tcols = json.loads(tkey) if tkey is not None else [None] * len(_TRANSFER_KEYS)
        row = {"decision": decision[1:-1], **dict(zip(_OBJECT_KEYS[1:], json.loads(okey))),
               **{f"t_{k}": v for k, v in zip(_TRANSFER_KEYS, tcols)},
               "objects": objects, "bytes": size,
               "n": lines if tkey is not None else 0, "b": tsize, "sha": sha}
        rows.append(row)
    okeys, tkeys = _OBJECT_KEYS, tuple(f"t_{k}" for k in _TRANSFER_KEYS)
    rows.sort(key=lambda r: [_sql_order(r[k]) for k in (okeys + tkeys if single else okeys)])
    groups = _fold([r for r in rows if r["objects"]], okeys, ("objects", "bytes"))
    moved = [r for r in rows if r["t_dest"] is not None]
    if not single:
        moved.sort(key=lambda r: [_sql_order(r[k]) for k in tkeys])
    return groups, _fold(moved, _TRANSFER_KEYS, ("n", "b", "sha"), {k: f"t_{k}" for k in _TRANSFER_KEYS})


# Exception categories: which transfer groups (see _passes) each one counts.
_CATEGORY_OF: dict[str, Any] = {
    "failed": lambda g: g["state"] == "failed",
    "quarantined": lambda g: g["state"] == "quarantined" and not g["conflict"],
    "conflicts": lambda g: g["state"] == "conflict" or (g["state"] == "quarantined" and g["conflict"]),
    "duplicates": lambda g: g["state"] == "duplicate",
    "changed": lambda g: bool(g["changed"] or g["stale"]),
    "missing": lambda g: g["state"] == "missing",
    "skipped": lambda g: g["state"] == "skipped",
    "unfinished": lambda g: g["state"] in WAITING,
}


def arrivals(conn: sqlite3.Connection, dests: Iterable[str]) -> dict[str, dict[str, int]]:
    """Per destination: the distinct instances, studies, series and patients with a verified
    copy there, and the studies complete there (each of their SOP Instance UIDs has one)."""
    out = {}
    for dest in dests:
        arrived = conn.execute(
            "SELECT count(DISTINCT o.sop_uid), count(DISTINCT o.study_uid), count(DISTINCT o.series_uid), "
            "count(DISTINCT o.patient_hash), count(*) FROM transfers t JOIN objects o ON o.key = t.key "
            f"WHERE t.dest = ? AND t.state IN {GOOD_SQL} AND o.kind = 'dicom'", (dest,)).fetchone()
        complete = conn.execute(
            "SELECT sum(good = n) FROM (SELECT o.study_uid, count(DISTINCT o.sop_uid) AS n, "
            f"count(DISTINCT CASE WHEN t.state IN {GOOD_SQL} THEN o.sop_uid END) AS good "
            "FROM objects o LEFT JOIN transfers t ON t.key = o.key AND t.dest = ? "
            "WHERE o.status = 'present' AND o.kind = 'dicom' AND o.study_uid IS NOT NULL "
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
    good = [by_state.get(name, {"objects": 0, "bytes": 0}) for name in GOOD]
    return {
        "dest": dest,
        "kind": dest.split(":", 1)[0] if ":" in dest else "file",
        "hosts": hosts,
        "by_state": by_state,
        "objects": sum(g["objects"] for g in good),  # a verified copy is here (duplicates: kept once)
        "bytes": sum(g["bytes"] for name, g in zip(GOOD, good) if name != "duplicate"),
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
            own[-1]["how"] = "running" if live else "killed"
            if not live:
                own[-1]["end"] = r["heartbeat_at"]
        out.append({
            "id": r["id"], "dest": r["dest"], "status": r["status"] if live or r["status"] != "running"
            else "interrupted", "live": live, "started_at": r["started_at"],
            "finished_at": r["finished_at"], "resumed": r["resumed"], "host": r["host"],
            "user": users.get(r["id"]), "stop_reason": r["stop_reason"],
            "sessions": own, "outages": outages.get(r["id"], []),
            "objects_verified": r["objects_verified"], "bytes_verified": r["bytes_verified"],
            "bytes_downloaded": r["bytes_downloaded"],
        })
    return out


def _ts(text: str | None) -> float | None:
    return datetime.fromisoformat(text).timestamp() if text else None


def _timeline(state: State, runs: list[dict[str, Any]]) -> dict[str, Any]:
    starts = [r["started_at"] for r in runs]
    finished = all(r["finished_at"] for r in runs) and not any(r["live"] for r in runs)
    end = max((r["finished_at"] for r in runs if r["finished_at"]), default=None) if finished else None
    clock = datetime.now(UTC).timestamp()
    active = 0.0
    last_seen = None
    for r in runs:
        for s in r["sessions"]:
            a = _ts(s["start"])
            b = _ts(s["end"]) if s["end"] else (clock if s["how"] == "running" else a)
            if a is not None and b is not None:
                active += max(0.0, b - a)
                last_seen = max(last_seen or b, b)
    start = min(starts) if starts else None
    return {
        "started_at": start, "finished_at": end,
        "duration_s": (_ts(end) - _ts(start)) if (end and start) else None,  # type: ignore[operator]
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


def _cost(state: State, facts: dict[str, Any], tgroups: list[dict[str, Any]]) -> dict[str, Any]:
    text = state.meta("plan")
    timeline = facts["timeline"]
    actual_time = timeline["duration_s"]
    if not text:
        return {"estimated": None, "actual": {"time_s": actual_time, "active_s": timeline["active_s"],
                                              "cost": None, "why_not": "no plan"}}
    plan = json.loads(text)
    made = state.query("SELECT at FROM events WHERE kind = 'plan.made' ORDER BY id DESC LIMIT 1")
    estimated = {
        "made_at": made[0]["at"] if made else None, "provider": plan.get("provider"),
        "region": plan.get("region"), "currency": plan.get("currency"),
        "catalogue": plan.get("catalogue"), "link": (plan.get("link") or {}).get("source"),
        "schedule": plan.get("schedule"), "bytes": (plan.get("workload") or {}).get("bytes"),
        "scenarios": [{k: s.get(k) for k in ("key", "title", "available", "reason", "time_s", "cost",
                                             "complete")} for s in plan.get("scenarios", [])],
    }
    cost, why = _actual_cost(state, plan, facts, tgroups)
    return {"estimated": estimated,
            "actual": {"time_s": actual_time, "active_s": timeline["active_s"], "cost": cost,
                       "currency": plan.get("currency"), "why_not": why,
                       "egress_bytes": facts["usage"]["bytes_downloaded"]
                       + facts["source"]["inventory"]["header_bytes"],
                       "get_requests": facts["usage"]["requests"]["GET"]}}


def _actual_cost(state: State, plan: dict[str, Any], facts: dict[str, Any],
                 tgroups: list[dict[str, Any]]) -> tuple[float | None, str | None]:
    """The recorded bytes and requests, priced with the catalogue the plan used, by the plan model
    (billing months, tiers, free allowance) at the run's own average rate."""
    from cloudexit.plan.inputs import ClassLoad, Link, Range, Workload
    from cloudexit.plan.model import make_plan
    from cloudexit.plan.pricing import load_catalogue

    usage = facts["usage"]
    downloaded, gets = usage["bytes_downloaded"], usage["requests"]["GET"]
    start = facts["timeline"]["started_at"]
    if downloaded <= 0 or not start:
        return None, "nothing downloaded yet"
    by_class: dict[str, dict[str, Any]] = {}
    for g in tgroups:
        if g["state"] in ("verified", "duplicate", "quarantined"):
            c = by_class.setdefault(g["sc"], {"sc": g["sc"], "n": 0, "b": 0})
            c["n"] += g["n"]
            c["b"] += g["b"]
    rows = sorted(by_class.values(), key=lambda c: -c["b"])
    moved = sum(r["b"] or 0 for r in rows)
    if not rows or moved <= 0:
        return None, "nothing downloaded yet"
    classes: dict[str, ClassLoad] = {}
    left = downloaded
    for i, r in enumerate(rows):
        share = left if i == len(rows) - 1 else int(downloaded * (r["b"] or 0) / moved)
        left -= share
        classes[r["sc"]] = ClassLoad(r["n"], max(share, 1))
    first = rows[0]["sc"]
    extra = gets - sum(c.objects for c in classes.values())
    c0 = classes[first]
    classes[first] = (ClassLoad(c0.objects, c0.bytes, 0, extra) if extra >= 0
                      else ClassLoad(c0.objects, c0.bytes, min(-extra, c0.objects), 0))
    inv = facts["source"]["inventory"]
    workload = Workload(classes, inventory_header_bytes=inv["header_bytes"],
                        inventory_get_requests=inv["get_requests"],
                        inventory_list_requests=inv["list_requests"])
    catalogue_name = plan.get("catalogue") or ""
    price_file = None if catalogue_name.endswith(" catalogue") else catalogue_name
    try:
        catalogue = load_catalogue(None if price_file else plan.get("provider"), plan.get("region"),
                                   price_file)
        rate = downloaded / max(facts["timeline"]["active_s"], 1.0)
        link = Link(Range(rate, rate, rate), latency_s=0.0, concurrency=1, source="actual")
        from datetime import timedelta

        result = make_plan(workload, catalogue, link, datetime.fromisoformat(start),
                           offline_threshold=timedelta(days=36500))
        scenario = result.scenario("fastest")
        if scenario.breakdown is None:
            return None, scenario.reason or "the model gave no cost"
        return round(scenario.breakdown.total, 2), None
    except CloudexitError as exc:
        return None, str(exc).split("\n")[0]


def _bucket_size(span: float) -> int:
    for step in (1, 2, 5, 10, 15, 30, 60, 120, 300, 600, 900, 1800, 3600, 7200, 10800, 21600,
                 43200, 86400, 172800, 604800):
        if span / step <= 120:
            return step
    return int(span / 120) + 1


def _throughput(state: State, timeline: dict[str, Any]) -> dict[str, Any]:
    """Bytes and objects verified over time, in up to ~120 buckets."""
    start = timeline["started_at"]
    t0 = int(_ts(start) or 0)
    last = None
    end = max(int(last or t0), int(_ts(timeline["finished_at"] or timeline["last_activity_at"]) or t0))
    bucket = _bucket_size(max(end - t0, 1))
    points = [[r[0], r[1] or 0, r[2]] for r in state.query(
        "SELECT (unixepoch(verified_at) - ?) / ? AS b, sum(size), count(*) FROM transfers "
        "WHERE verified_at IS NOT NULL AND state IN ('verified', 'duplicate', 'quarantined') "
        "GROUP BY b ORDER BY b", (t0, bucket))]
    return {"t0": start, "end_s": end - t0, "bucket_s": bucket, "points": points}


def _charts(throughput: dict[str, Any], groups: list[dict[str, Any]]) -> dict[str, Any]:
    years: dict[str, dict[str, Any]] = {}
    modalities: dict[str, dict[str, Any]] = {}
    for g in groups:
        if g["status"] != "present" or g["kind"] != "dicom":
            continue
        y = years.setdefault(g["year"], {"name": g["year"], "objects": 0, "bytes": 0, "done_bytes": 0})
        m = modalities.setdefault(g["modality"], {"name": g["modality"], "objects": 0, "bytes": 0})
        for row in (y, m):
            row["objects"] += g["objects"]
            row["bytes"] += g["bytes"]
        if g["decision"].startswith(("safe", "review")) or g["decision"][6:] in RECHECK_REASONS:  # a copy is home
            y["done_bytes"] += g["bytes"]
    by_year = [years[k] for k in sorted(years)]
    by_modality = sorted(modalities.values(), key=lambda m: -m["bytes"])
    return {"throughput": throughput, "by_study_year": by_year, "by_modality": by_modality}


_EXCEPTIONS: dict[str, tuple[str, str]] = {
    # category: (WHERE over transfers t JOIN objects o, remedy)
    "failed": ("t.state = 'failed'", "failed"),
    "quarantined": ("t.state = 'quarantined' AND t.conflict_with IS NULL", "quarantined"),
    "conflicts": ("(t.state = 'conflict' OR (t.state = 'quarantined' AND t.conflict_with IS NOT NULL))",
                  "conflict"),
    "duplicates": ("t.state = 'duplicate'", "duplicate"),
    "changed": (("(t.changes > 0 OR (t.state IN ('verified', 'duplicate', 'quarantined') "
                 "AND o.status = 'present' AND t.etag IS NOT o.etag))"), "changed"),
    "missing": ("t.state = 'missing'", "missing"),
    "skipped": ("t.state = 'skipped'", "skipped"),
    "unfinished": ("t.state IN ('queued', 'fetching', 'inspect', 'restoring')", "unfinished"),
}


def _exceptions(state: State, dests: list[str], groups: list[dict[str, Any]],
                tgroups: list[dict[str, Any]], limit: int,
                changed: dict[str, list[tuple[int, int]]] | None = None) -> dict[str, Any]:
    """`changed`: the "changed" rows to list, found by the manifest walk (see Groups); without
    it their query joins every transfer with its object."""
    out: dict[str, Any] = {}
    counts: dict[str, int] = {}
    for name, belongs in _CATEGORY_OF.items():
        counts[f"{name}_n"] = sum(g["n"] for g in tgroups if belongs(g))
        counts[f"{name}_b"] = sum(g["b"] for g in tgroups if belongs(g))
    for name, belongs in _CATEGORY_OF.items():
        counts[f"{name}_by_dest"] = {d: sum(g["n"] for g in tgroups if g["dest"] == d and belongs(g))
                                     for d in dests}
    if len(dests) > 1:  # an object in several destinations counts once (per destination: by_dest)
        for name, (where, _) in _EXCEPTIONS.items():
            if counts[f"{name}_n"]:
                counts[f"{name}_n"], counts[f"{name}_b"] = _distinct(state, where)
    for name, (where, remedy) in _EXCEPTIONS.items():
        items: list[dict[str, Any]] = []
        if counts[f"{name}_n"]:
            for dest in dests:  # per destination: the (dest, state, seq) index serves the listing
                rows = ""
                if name == "changed" and changed is not None:
                    if not changed.get(dest):
                        continue
                    rows = f" AND t.rowid IN ({', '.join(str(-r) for _, r in changed[dest])})"
                items += [_item(r, remedy) for r in state.query(
                    "SELECT t.key, t.dest, t.state, t.reason, t.conflict_with, t.attempts, t.changes, t.path, "
                    "t.etag AS t_etag, o.etag AS o_etag, o.status, o.patient_hash, t.seq "
                    f"FROM transfers t JOIN objects o ON o.key = t.key WHERE t.dest = ? AND {where}{rows} "
                    "ORDER BY t.seq LIMIT ?", (dest, limit))]
        out[name] = {"count": counts[f"{name}_n"], "bytes": counts[f"{name}_b"], "remedy": remedy,
                     "by_dest": counts[f"{name}_by_dest"], "items": items[:limit]}

    def by_decision(label: str, field: str) -> int:
        return sum(g[field] for g in groups if g["decision"] == label)

    deleted = "FROM objects o WHERE o.status = 'deleted'"
    out["deleted"] = {
        "count": by_decision("gone: deleted", "objects"), "bytes": by_decision("gone: deleted", "bytes"),
        "remedy": "deleted",
        "items": [{"key": r["key"], "dest": None, "reason": f"deleted at the source (inventory round {r['change_round']})",
                   "remedy": "deleted", "patient_hash": r["patient_hash"]}
                  for r in state.query(f"SELECT key, change_round, patient_hash {deleted} ORDER BY key LIMIT ?",
                                       (limit,))] if by_decision("gone: deleted", "objects") else []}
    count = by_decision("keep: not_migrated", "objects")
    out["not_migrated"] = {
        "count": count, "bytes": by_decision("keep: not_migrated", "bytes"), "remedy": "unfinished",
        "items": [{"key": r["key"], "dest": None, "reason": "not queued for every destination",
                   "remedy": "unfinished", "patient_hash": r["patient_hash"]}
                  for r in state.query(
                      "SELECT key, patient_hash FROM objects o WHERE o.status = 'present' AND "
                      "(SELECT count(*) FROM transfers t WHERE t.key = o.key) < "
                      "(CASE WHEN o.kind = 'dicom' THEN ? ELSE 1 END) ORDER BY key LIMIT ?",
                      (len(dests), limit))] if count else []}
    out["pacs"] = _pacs_mismatches(state, limit)
    return out


def _distinct(state: State, where: str) -> tuple[int, int]:
    """Objects (and their bytes) with a transfer matching `where` in any destination, once each."""
    row = state.query("SELECT count(*) AS n, coalesce(sum(o.size), 0) AS b FROM objects o WHERE EXISTS "
                      f"(SELECT 1 FROM transfers t WHERE t.key = o.key AND {where})")[0]
    return int(row["n"]), int(row["b"])


def _item(r: Any, remedy: str) -> dict[str, Any]:
    reason = r["reason"]
    if remedy == "changed":
        if r["status"] == "present" and r["t_etag"] != r["o_etag"] and r["state"] in (
                "verified", "duplicate", "quarantined"):
            remedy = "stale"
            reason = f"the cloud copy changed after it was copied (ETag {r['t_etag']} -> {r['o_etag']})"
        else:
            reason = (f"changed at the source {r['changes']} time(s) during the migration; "
                      f"now {r['state']}") + (f": {r['reason']}" if r["reason"] else "")
    return {"key": r["key"], "dest": r["dest"], "state": r["state"], "reason": reason,
            "conflict_with": r["conflict_with"], "attempts": r["attempts"], "path": r["path"],
            "remedy": remedy, "patient_hash": r["patient_hash"]}


def _tables(state: State) -> set[str]:
    return {r[0] for r in state.query("SELECT name FROM sqlite_master WHERE type = 'table'")}


def _latest_verify_runs(state: State) -> list[dict[str, Any]]:
    """The last finished `cloudexit verify` run per destination (schema v3), with its counts."""
    if "verify_runs" not in _tables(state):
        return []
    out = []
    for r in state.query("SELECT * FROM verify_runs WHERE id IN (SELECT max(id) FROM verify_runs "
                         "WHERE status != 'running' GROUP BY dest) ORDER BY id"):
        options = json.loads(r["options"] or "{}")
        studies = {x["status"]: x["n"] for x in state.query(
            "SELECT status, count(*) AS n FROM verify_studies WHERE run_id = ? GROUP BY status", (r["id"],))}
        findings = [dict(x) for x in state.query(
            "SELECT level, problem, count(*) AS n FROM verify_findings WHERE run_id = ? "
            "GROUP BY level, problem ORDER BY 3 DESC", (r["id"],))]
        samples = {x["result"]: x["n"] for x in state.query(
            "SELECT result, count(*) AS n FROM verify_samples WHERE run_id = ? GROUP BY result", (r["id"],))}
        summary = json.loads(r["summary"] or "{}")
        out.append({"id": r["id"], "dest": r["dest"], "kind": r["kind"], "status": r["status"],
                    "started_at": r["started_at"], "finished_at": r["finished_at"],
                    "deep": bool(options.get("deep")), "sample": options.get("sample") or 0,
                    "studies": studies, "studies_total": sum(studies.values()),
                    "studies_ok": studies.get("ok", 0),
                    "findings": findings, "findings_total": sum(f["n"] for f in findings),
                    "samples": samples, "samples_total": sum(samples.values()),
                    "samples_same": samples.get("identical", 0) + samples.get("equivalent", 0),
                    "files_checked": summary.get("files_checked"), "files_rehashed": summary.get("files_rehashed"),
                    "error": summary.get("error")})
    return out


def _pacs_mismatches(state: State, limit: int) -> dict[str, Any]:
    """What the last `cloudexit verify` of each destination found (PACS counts, archive files)."""
    runs = [r for r in _latest_verify_runs(state) if r["status"] in ("passed", "failed")]
    if not runs:
        return {"checked": False, "count": 0, "bytes": 0, "remedy": "verify", "items": []}
    ids = [r["id"] for r in runs]
    marks = ",".join("?" * len(ids))
    count = _one(state, f"SELECT count(*) FROM verify_findings WHERE run_id IN ({marks})", ids)
    items = []
    for f in state.query(
            "SELECT f.*, r.dest FROM verify_findings f JOIN verify_runs r ON r.id = f.run_id "
            f"WHERE f.run_id IN ({marks}) ORDER BY f.id LIMIT ?", (*ids, limit)):
        what = f"{f['level']} {f['problem']}"
        if f["expected"] or f["found"]:
            what += f" (expected {f['expected'] or '-'}, found {f['found'] or '-'})"
        if f["detail"]:
            what += f": {f['detail']}"
        items.append({"key": f["key"] or f["path"] or f["sop_uid"] or f["series_uid"] or f["study_uid"],
                      "dest": f["dest"], "state": f["problem"], "reason": what, "remedy": "verify",
                      "patient_hash": None})
    return {"checked": True, "count": count, "bytes": 0, "remedy": "verify", "items": items}


def _verification(state: State, tgroups: list[dict[str, Any]]) -> dict[str, Any]:
    methods = {m: 0 for m in METHODS}
    size_only = checked = 0
    not_checked: dict[str, int] = {}
    for r in tgroups:
        if r["state"] not in ("verified", "duplicate", "quarantined"):
            continue
        names = [c for c in (r["checks"] or "").split(",") if c]
        found = {CHECK_METHODS.get(c, "other") for c in names}
        for m in found:
            if m in methods:
                methods[m] += r["n"]
        if not found - {"size", "dicom", "other"}:
            size_only += r["n"]
        methods["sha256"] += r["sha"]
        checked += r["n"]
        if r["not_checked"]:
            not_checked[r["not_checked"]] = not_checked.get(r["not_checked"], 0) + r["n"]
    not_checked_rows = [{"reason": k, "objects": v}
                        for k, v in sorted(not_checked.items(), key=lambda kv: -kv[1])[:50]]
    verify = _verify_results(state)
    pacs = [r for r in verify["runs"] if r["kind"] != "filesystem" and r["status"] in ("passed", "failed")]
    methods["pacs"] = sum(r["studies_ok"] for r in pacs)
    methods["sample"] = sum(r["samples_same"] for r in pacs)
    return {"objects_checked": checked, "methods": methods, "size_only": size_only,
            "not_checked": not_checked_rows, "verify": verify,
            "pacs_checked": bool(pacs), "pacs_studies": sum(r["studies_total"] for r in pacs),
            "sample_checked": any(r["samples_total"] for r in pacs),
            "samples": sum(r["samples_total"] for r in pacs)}


def _verify_results(state: State) -> dict[str, Any]:
    """What `cloudexit verify` (issue 5) recorded: the last run per destination."""
    runs = _latest_verify_runs(state)
    done = {r["dest"] for r in runs if r["status"] in ("passed", "failed")}
    return {"run": bool(done), "runs": runs,
            "unverified": [d for d in destinations(state) if d not in done]}


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


# -- the decommission rule ----------------------------------------------------------------------
# One rule decides what may leave the cloud, for this report and for `cloudexit decommission`
# (which imports it): an object's copy at each destination is good for the very ETag, and the
# latest `cloudexit verify` of that destination ran after the copy landed and found nothing
# wrong with it. The first half is the decision below; the second, `recheck_sql`.
PACS_PREFIXES = ("dicom://", "dicomweb+http://", "dicomweb+https://")
# Why a good copy does not count yet (recheck_sql's answers); the copy is home all the same.
RECHECK_REASONS = ("duplicate_unverified", "no_verify", "landed_after_verify", "verify_problem",
                   "study_not_ok")


def last_verify_runs(state: State) -> dict[str, dict[str, Any]]:
    """The latest finished (passed or failed) `cloudexit verify` run of each destination."""
    if "verify_runs" not in _tables(state):
        return {}
    return {r["dest"]: dict(r) for r in state.query(
        "SELECT id, dest, kind, started_at FROM verify_runs WHERE id IN (SELECT max(id) FROM verify_runs "
        "WHERE status IN ('passed', 'failed') GROUP BY dest)")}


def recheck_sql(dests: list[str], runs: dict[str, dict[str, Any]], t: str = "t") -> tuple[str, dict[str, Any]]:
    """SQL over a good transfer row `t` (joined with its object `o`): NULL when the latest verify
    of `t.dest` vouches for the copy, else why not (one of RECHECK_REASONS), and its parameters.

    Checked in this order, as decommission words its reasons: a duplicate's canonical copy is
    verified; a verify ran after the copy landed; it found nothing about the object's key, file,
    SOP Instance UID or (study or series level) study; a PACS counted the study ok. The finding
    sets are uncorrelated subqueries: SQLite builds each once, then looks objects up in it."""
    cases, params = [], {}
    for i, dest in enumerate(dests):
        run = runs.get(dest) or {}
        params.update({f"vd{i}": dest, f"vr{i}": run.get("id"), f"vs{i}": run.get("started_at")})
        found = f"SELECT f.{{}} FROM verify_findings f WHERE f.run_id = :vr{i}"
        study = (f"WHEN coalesce((SELECT s.status FROM verify_studies s WHERE s.run_id = :vr{i} "
                 "AND s.study_uid = o.study_uid), '') != 'ok' THEN 'study_not_ok' "
                 if dest.startswith(PACS_PREFIXES) else "")
        cases.append(
            f"WHEN :vd{i} THEN CASE "
            f"WHEN {t}.state = 'duplicate' AND coalesce((SELECT c.state FROM transfers c WHERE "
            f"c.key = {t}.conflict_with AND c.dest = {t}.dest), '') NOT IN ('verified', 'stored', 'warning') "
            "THEN 'duplicate_unverified' "
            f"WHEN :vr{i} IS NULL THEN 'no_verify' "
            f"WHEN coalesce({t}.verified_at, {t}.updated_at, '') > :vs{i} THEN 'landed_after_verify' "
            f"WHEN o.key IN ({found.format('key')}) OR {t}.path IN ({found.format('path')}) "
            f"OR o.sop_uid IN ({found.format('sop_uid')}) OR o.study_uid IN ({found.format('study_uid')} "
            "AND f.level IN ('study', 'series')) THEN 'verify_problem' "
            f"{study}END")
    return f"(CASE {t}.dest {' '.join(cases)} ELSE 'no_verify' END)", params


# One object's decommission decision ("decision: reason") over all its destinations, as a SQL
# expression on `objects o` (:n = destinations expected for a DICOM object; anything else goes
# only to the one archive folder, never to a PACS). The facts and the manifest both use it,
# so their counts cannot disagree. {recheck} is recheck_sql over `x`.
_GOOD_HERE = f"x.state IN {GOOD_SQL} AND x.etag IS o.etag"
_REVIEW_HERE = "x.state IN ('quarantined', 'conflict') AND x.etag IS o.etag"
DECISION_SQL = f"""(SELECT CASE
    WHEN o.status = 'deleted' THEN 'gone: deleted'
    WHEN count(*) < (CASE WHEN o.kind = 'dicom' THEN :n ELSE 1 END) THEN 'keep: not_migrated'
    WHEN sum({_GOOD_HERE}) = count(*) THEN coalesce('keep: ' || max({{recheck}}), 'safe: verified')
    WHEN sum({_GOOD_HERE}) + sum({_REVIEW_HERE}) = count(*) THEN 'review: quarantined'
    WHEN sum(x.state IN ('verified', 'duplicate', 'stored', 'warning', 'quarantined', 'conflict')
             AND x.etag IS NOT o.etag) > 0 THEN 'keep: stale'
    WHEN sum(x.state = 'failed') > 0 THEN 'keep: failed'
    WHEN sum(x.state = 'missing') > 0 THEN 'keep: missing'
    WHEN sum(x.state = 'skipped') > 0 THEN 'keep: skipped'
    ELSE 'keep: unfinished' END FROM transfers x WHERE x.key = o.key)"""


# The same decision for one destination, from the joined transfer row `t` alone: no subquery,
# so the manifest and the facts of the usual single-destination migration stay fast.
DECISION_ONE_SQL = f"""(CASE
    WHEN o.status = 'deleted' THEN 'gone: deleted'
    WHEN t.key IS NULL THEN 'keep: not_migrated'
    WHEN t.state IN {GOOD_SQL} AND t.etag IS o.etag THEN coalesce('keep: ' || {{recheck}}, 'safe: verified')
    WHEN t.state IN ('quarantined', 'conflict') AND t.etag IS o.etag THEN 'review: quarantined'
    WHEN t.state IN ('verified', 'duplicate', 'stored', 'warning', 'quarantined', 'conflict')
         AND t.etag IS NOT o.etag THEN 'keep: stale'
    WHEN t.state = 'failed' THEN 'keep: failed'
    WHEN t.state = 'missing' THEN 'keep: missing'
    WHEN t.state = 'skipped' THEN 'keep: skipped'
    ELSE 'keep: unfinished' END)"""


@dataclass(frozen=True)
class Rule:
    """What the decision depends on besides the tables: the destinations, and the latest verify
    run of each (read once, in the audit's snapshot)."""

    dests: tuple[str, ...]
    runs: dict[str, dict[str, Any]]

    @classmethod
    def of(cls, state: State) -> Rule:
        return cls(tuple(destinations(state)), last_verify_runs(state))

    def sql(self) -> tuple[str, str, dict[str, Any]]:
        """(decision expression, FROM clause, parameters)."""
        n = len(self.dests)
        recheck, params = recheck_sql(list(self.dests), self.runs, "t" if n == 1 else "x")
        params["n"] = n
        if n == 1:
            return DECISION_ONE_SQL.format(recheck=recheck), \
                "objects o LEFT JOIN transfers t ON t.key = o.key", params
        return DECISION_SQL.format(recheck=recheck), "objects o", params


def _decommission(groups: list[dict[str, Any]]) -> dict[str, Any]:
    found: dict[tuple[str, str], dict[str, Any]] = {}
    totals = {d: {"objects": 0, "bytes": 0} for d in ("safe", "review", "keep", "gone")}
    for g in groups:
        decision, _, reason = g["decision"].partition(": ")
        row = found.setdefault((decision, reason), {"decision": decision, "reason": reason,
                                                    "objects": 0, "bytes": 0})
        for k in ("objects", "bytes"):
            row[k] += g[k]
            totals[decision][k] += g[k]
    return {"rows": [found[k] for k in sorted(found)], "totals": totals}


def _delta_rounds(state: State, rule: Rule) -> dict[str, Any]:
    """Each inventory round after the first (a delta round): what it found new, changed and
    deleted (as its `inventory.complete` event recorded), how many of its new or changed objects
    have their current version copied (and the migration sessions after it), and how many still
    have no copy of the current version at home."""
    rounds = [dict(r) for r in state.query(
        "SELECT id, started_at, finished_at, status FROM inventory_rounds ORDER BY id")]
    if len(rounds) < 2:
        return {"rounds": [], "count": 0}
    found = {json.loads(e["detail"]).get("round"): json.loads(e["detail"]) for e in state.query(
        "SELECT detail FROM events WHERE kind = 'inventory.complete' AND json_valid(detail) ORDER BY id")}
    played = {json.loads(e["detail"]).get("round"): {**json.loads(e["detail"]), "at": e["at"]} for e in state.query(
        "SELECT at, detail FROM events WHERE kind = 'delta.round' AND json_valid(detail) ORDER BY id")}
    decision, source, params = rule.sql()
    home: dict[int, dict[str, int]] = {}
    for r in state.query(
            f"SELECT o.change_round AS r, {decision} AS decision, count(*) AS n FROM {source} "
            "WHERE o.change_round > :first AND o.change IN ('new', 'changed') AND o.status = 'present' "
            "GROUP BY 1, 2", {**params, "first": rounds[0]["id"]}):
        at = home.setdefault(r["r"], {"objects": 0, "left": 0})
        at["objects"] += r["n"]
        if not (r["decision"].startswith(("safe", "review")) or r["decision"][6:] in RECHECK_REASONS):
            at["left"] += r["n"]
    out = []
    for i, r in enumerate(rounds[1:], 1):
        until = rounds[i + 1]["started_at"] if i + 1 < len(rounds) else "9999"
        # Copied: this round's new or changed objects whose current version reached a destination
        # (by ETag, not by time: timestamps have one-second resolution).
        moved = state.query(
            "SELECT count(*) AS n, coalesce(sum(o.size), 0) AS b FROM objects o WHERE o.change_round = ? "
            "AND o.change IN ('new', 'changed') AND EXISTS (SELECT 1 FROM transfers t WHERE t.key = o.key "
            "AND t.etag IS o.etag AND t.state IN ('verified', 'duplicate', 'stored', 'warning', "
            "'quarantined', 'conflict'))", (r["id"],))[0]
        runs = [x[0] for x in state.query(
            "SELECT DISTINCT json_extract(detail, '$.run') FROM events WHERE kind IN ('migrate.started', "
            "'migrate.resumed') AND json_valid(detail) AND at >= ? AND at < ? ORDER BY 1", (r["started_at"], until))]
        event = found.get(r["id"]) or {}
        out.append({
            "round": r["id"], "started_at": r["started_at"], "finished_at": r["finished_at"],
            "status": r["status"], "recorded": bool(event),
            "new": event.get("new", 0), "changed": event.get("changed", 0), "deleted": event.get("deleted", 0),
            "moved": moved["n"], "moved_bytes": moved["b"], "migration_runs": runs,
            "left": home.get(r["id"], {}).get("left", 0),
            "playbook": played.get(r["id"]),
        })
    return {"rounds": out, "count": len(out)}


def _deletion(state: State, limit: int) -> dict[str, Any]:
    """Proof of deletion: each `cloudexit decommission --execute`, from its `deletions` rows (the
    store's own answer for every object, and the request id of each DeleteObjects batch) and
    its `decommission.*` events; and what is still in the cloud after the last one, and why."""
    none = {"executed": False, "runs": [], "dry_runs": 0, "refused": [],
            "totals": {k: 0 for k in ("deleted", "deleted_bytes", "delete_markers", "failed", "confirmed",
                                      "unconfirmed", "batches", "refused")},
            "still_present": None}
    if "decommission_runs" not in _tables(state):
        return none
    events: dict[str, dict[int, dict[str, Any]]] = {"decommission.started": {}, "decommission.finished": {}}
    refused = []
    for e in state.query("SELECT at, kind, detail FROM events WHERE kind LIKE 'decommission.%' "
                         "AND json_valid(detail) ORDER BY id"):
        detail = json.loads(e["detail"])
        if e["kind"] == "decommission.refused":
            refused.append({"at": e["at"], "token": detail.get("given"), "reason": detail.get("reason")})
        elif e["kind"] in events:
            events[e["kind"]][detail.get("run")] = {**detail, "at": e["at"]}
    runs = []
    for r in state.query("SELECT * FROM decommission_runs WHERE mode = 'execute' ORDER BY id"):
        outcome = {x["outcome"]: dict(x) for x in state.query(
            "SELECT outcome, count(*) AS n, coalesce(sum(size), 0) AS b, count(confirmed_at) AS c "
            "FROM deletions WHERE run_id = ? GROUP BY outcome", (r["id"],))}
        zero = {"n": 0, "b": 0, "c": 0}
        gone, markers, failed = (outcome.get(k, zero) for k in ("deleted", "delete-marker", "failed"))
        batches = [dict(x) for x in state.query(
            "SELECT batch, request_id, count(*) AS objects, sum(outcome != 'failed') AS deleted, "
            "sum(outcome = 'failed') AS failed, min(deleted_at) AS at FROM deletions WHERE run_id = ? "
            "GROUP BY batch ORDER BY batch LIMIT ?", (r["id"], limit))]
        errors = [dict(x) for x in state.query(
            "SELECT coalesce(error_code, '?') AS code, count(*) AS objects FROM deletions "
            "WHERE run_id = ? AND outcome = 'failed' GROUP BY 1 ORDER BY 2 DESC", (r["id"],))]
        started = events["decommission.started"].get(r["id"], {})
        runs.append({
            "id": r["id"], "token": r["token"], "started_at": r["started_at"], "finished_at": r["finished_at"],
            "status": r["status"], "operator": started.get("user"), "host": started.get("host"),
            "source": r["source"], "endpoint": r["endpoint"], "versioning": r["versioning"],
            "all_versions": bool(r["all_versions"]), "destinations": json.loads(r["destinations"] or "[]"),
            "manifest_sha256": r["manifest_sha256"], "to_delete": r["to_delete"],
            "to_delete_bytes": r["to_delete_bytes"],
            "deleted": gone["n"], "deleted_bytes": gone["b"], "delete_markers": markers["n"],
            "failed": failed["n"], "confirmed": gone["c"] + markers["c"],
            "unconfirmed": gone["n"] + markers["n"] - gone["c"] - markers["c"],
            "batches": r["batches"], "batch_answers": batches, "errors": errors,
            "kept": r["kept"], "kept_bytes": r["kept_bytes"], "kept_by_reason": json.loads(r["summary"] or "{}"),
        })
    totals = {k: sum(r[k] for r in runs) for k in ("deleted", "deleted_bytes", "delete_markers", "failed",
                                                   "confirmed", "unconfirmed", "batches")}
    totals["refused"] = len(refused)
    last = runs[-1] if runs else None
    still = {  # after the last execution: what it left, and why
        "kept": last["kept"], "kept_bytes": last["kept_bytes"], "kept_by_reason": last["kept_by_reason"],
        "failed": last["failed"], "errors": last["errors"],
        "noncurrent": 0 if last["all_versions"] else last["delete_markers"],
        "unconfirmed": last["unconfirmed"],
    } if last else None
    return {"executed": bool(runs), "runs": runs,
            "dry_runs": _one(state, "SELECT count(*) FROM decommission_runs WHERE mode = 'dry-run'"),
            "refused": refused[:limit], "totals": totals, "still_present": still}


def _event_chain(state: State) -> dict[str, Any]:
    problems = state.verify_event_chain()
    head = state.query("SELECT id, hash FROM events ORDER BY id DESC LIMIT 1")
    return {"events": _one(state, "SELECT count(*) FROM events"),
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
    if last and not last["live"] and last["status"] not in ("complete", "partial"):
        blocking.append({"code": "not_finished", "status": last["status"]})
    if x["failed"]["count"]:
        blocking.append({"code": "failed", "n": x["failed"]["count"]})
    stale = facts["decommission"]["rows"]
    stale_n = sum(r["objects"] for r in stale if r["reason"] == "stale")
    if stale_n:
        blocking.append({"code": "stale", "n": stale_n})
    if x["missing"]["count"]:
        review.append({"code": "missing", "n": x["missing"]["count"]})
    # Objects kept aside anywhere (damaged or conflicting), each once however many destinations.
    quarantined = (_distinct(state, "t.state IN ('quarantined', 'conflict')")[0] if len(facts["destinations"]) > 1
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


# -- the manifest -----------------------------------------------------------------------------
def _csv_text(column: str) -> str:
    """A text column from outside (keys, headers, listings) as a CSV field built by SQLite:
    quoted, quotes doubled; NULL stays NULL (printf's %s writes it as an empty field)."""
    return f"""'"' || replace({column}, '"', '""') || '"'"""


def _csv_ours(column: str) -> str:
    """Text cloudexit wrote (checks, states): quoted, holds no quote characters."""
    return f"""'"' || {column} || '"'"""


# What each manifest line adds to the report's groups (see _passes): the object's columns and
# its transfer's, each as one JSON array (one Python string per line, decoded once per group).
_WALK_OBJECT = ("json_array(o.status, o.kind, coalesce(o.modality, ''), coalesce(substr(o.study_date, 1, 4), ''), "
                "coalesce(o.storage_class, 'STANDARD'), o.key_flags IS NOT NULL)")
_WALK_TRANSFER = (
    "CASE WHEN t.key IS NOT NULL THEN json_array(t.dest, t.state, t.conflict_with IS NOT NULL, t.changes > 0, "
    "(t.state IN ('verified', 'duplicate', 'stored', 'warning', 'quarantined', 'conflict') "
    "AND o.status = 'present' AND t.etag IS NOT o.etag), coalesce(o.storage_class, 'STANDARD'), "
    "t.checks, t.not_checked) END")


def manifest_sql(rule: Rule, include_phi: bool = False, redact_keys: bool = False) -> tuple[str, dict[str, Any]]:
    """The manifest query: SQLite formats each line but its last field in one printf() call (one
    function call per row instead of a coalesce and a concatenation per field: a third less CPU
    at 1M rows); the last, the decision, comes as a column of its own, with what the line adds
    to the report's groups (manifest_lines); the file's destination and path only when the patients'
    names are to be read from it."""
    decision, _, params = rule.sql()
    # --redact-keys: keys, paths and the reasons quoting them through cloudexit.redact (SQL
    # functions registered on the connection by manifest_lines).
    key, path, conflict, reason = (("redact_key(o.key)", "redact_path(t.path)", "redact_key(t.conflict_with)",
                                    "redact_text(t.reason, t.conflict_with, t.path)") if redact_keys
                                   else ("o.key", "t.path", "t.conflict_with", "t.reason"))
    fields = (
        _csv_text(key), "o.size", _csv_text("o.etag"), _csv_text("o.last_modified"),
        _csv_text("o.storage_class"), _csv_text("o.checksums"), "o.status", "o.kind",
        _csv_text("o.study_uid"), _csv_text("o.series_uid"), _csv_text("o.sop_uid"), _csv_text("o.modality"),
        _csv_text("o.study_date"), "o.patient_hash", _csv_text("t.dest"),
        _csv_ours("coalesce(t.state, 'not migrated')"), _csv_text(path), "t.sha256",
        "t.md5", _csv_ours("t.checks"), _csv_text("t.not_checked"), _csv_text(reason),
        _csv_text(conflict), "t.attempts", "t.started_at", "t.verified_at",
        "coalesce(t.encoding, o.encoding)", "t.raw_sha256", "o.pacs_metadata", _csv_text("t.worker"),
    )
    template = ",".join(["%s"] * len(fields)) + ","
    return (f"SELECT printf('{template}', " + ", ".join(fields) + f") AS line, {_csv_ours(decision)}, "
            f"{'t.dest, t.path' if include_phi else 'NULL, NULL'}, o.rowid, o.size, {_WALK_OBJECT}, {_WALK_TRANSFER}, coalesce(t.size, 0), "
            "t.sha256 IS NOT NULL, CASE WHEN t.key IS NOT NULL AND "
            f"{_EXCEPTIONS['changed'][0]} THEN json_array(t.dest, t.seq, t.rowid) END "
            "FROM objects o LEFT JOIN transfers t ON t.key = o.key ORDER BY o.key, t.dest"), params


def manifest_lines(conn: State | sqlite3.Connection, rule: Rule, include_phi: bool = False,
                   walked: dict[tuple[str, str, str | None], list[int]] | None = None,
                   changed: dict[str, list[tuple[int, int]]] | None = None,
                   redact: Redactor | None = None) -> Iterator[tuple[str, int]]:
    """manifest.csv without its header: one line per object and destination (an object in no
    destination: one line), in key order. SQLite builds each line; this only streams them.

    `walked`: also adds up, per (decision, object columns, transfer columns), the lines, objects
    (an object's first line), their bytes, the transfers' bytes and SHA-256 digests: the
    report's groups without a second pass over the tables (groups_of_walk); and in `changed`, per
    destination, the first LIST_LIMIT "changed" exceptions by `seq` (see Groups)."""
    if isinstance(conn, State):
        conn = conn.conn
    if redact is not None:
        redact.register(conn)
    cur = conn.execute(*manifest_sql(rule, include_phi, redact is not None))
    last = None
    while True:
        rows = cur.fetchmany(2000)
        if not rows:
            return
        if walked is not None:
            for _, decision, _, _, rowid, size, okey, tkey, tsize, sha, flagged in rows:
                if flagged is not None and changed is not None:
                    dest, seq, trowid = json.loads(flagged)
                    heap = changed.setdefault(dest, [])
                    if len(heap) < LIST_LIMIT:
                        heapq.heappush(heap, (-seq, -trowid))
                    elif (-seq, -trowid) > heap[0]:
                        heapq.heapreplace(heap, (-seq, -trowid))
                first = rowid != last
                last = rowid
                g = walked.get((decision, okey, tkey))
                if g is None:
                    walked[decision, okey, tkey] = [1, 1, size, tsize, sha] if first else [1, 0, 0, tsize, sha]
                else:
                    g[0] += 1
                    if first:
                        g[1] += 1
                        g[2] += size
                    g[3] += tsize
                    g[4] += sha
        if include_phi:
            yield "".join(f"{r[0]}{r[1]},{_csv_field(pid)},{_csv_field(name)}\n"
                          for r in rows for pid, name in [read_patient(r[2], r[3])]), len(rows)
        else:
            yield "\n".join([r[0] + r[1] for r in rows]) + "\n", len(rows)


def _csv_field(text: str) -> str:
    return '"' + text.replace('"', '""') + '"' if text else ""


def read_patient(dest: str | None, path: str | None) -> tuple[str, str]:
    """(Patient ID, Patient Name) from the archived file, for --include-phi; blanks if unknown."""
    if not dest or not path or not dest.startswith("file://"):
        return "", ""
    full = os.path.join(dest[len("file://"):], path)
    try:
        import pydicom

        ds = pydicom.dcmread(full, stop_before_pixels=True, force=True,
                             specific_tags=["SpecificCharacterSet", "PatientID", "PatientName"])
        return str(ds.get("PatientID", "") or ""), str(ds.get("PatientName", "") or "")
    except Exception:  # noqa: BLE001 - a damaged or foreign file: no identity to show
        return "", ""


# -- writing ----------------------------------------------------------------------------------
class _HashingFile:
    """A 0600 text file that hashes what is written to it."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.fh = open_private(path, buffering=1 << 20)
        self.sha = hashlib.sha256()

    def write(self, text: str) -> int:
        data = text.encode("utf-8")
        self.sha.update(data)
        self.fh.write(data)
        return len(text)

    def close(self) -> str:
        self.fh.flush()
        os.fsync(self.fh.fileno())
        self.fh.close()
        return self.sha.hexdigest()


@dataclass
class AuditResult:
    out: Path
    files: dict[str, str]  # name -> SHA-256
    fingerprint: str
    verdict: dict[str, Any]
    manifest_rows: int
    events: int
    others: list[str] = field(default_factory=list)  # files in the folder that are not the audit's


def prepare_out(out: Path, force: bool) -> list[str]:
    """Make the output folder (0700); refuse one in use unless `force`. Returns foreign files."""
    if out.exists() and not out.is_dir():
        raise AuditError(f"{out} exists and is not a folder", hint="give --out a folder name")
    if out.exists():
        entries = sorted(os.listdir(out))
        others = [e for e in entries if e not in (*OUTPUTS, SIGNATURE) and not e.startswith(".audit-tmp-")]
        if entries and not force:
            if others:
                shown = ", ".join(others[:5]) + (f" and {len(others) - 5} more" if len(others) > 5 else "")
                raise AuditError(f"{out} exists and holds other files ({shown})",
                                 hint="write the audit into a new or empty folder, or pass --force")
            raise AuditError(f"{out} already holds an audit",
                             hint="keep it: choose another folder; replace it: pass --force")
    else:
        make_private_dirs(out)  # every folder created for it 0700, not only the last
    os.chmod(out, 0o700)
    return [e for e in sorted(os.listdir(out)) if e not in (*OUTPUTS, SIGNATURE) and not e.startswith(".audit-tmp-")]


def write_audit(state: State, out: str | os.PathLike[str], lang: str = "en",
                include_phi: bool = False, force: bool = False, redact_keys: bool = False,
                signer: Any = None) -> AuditResult:
    """Write the audit folder (see the module docstring) from one consistent snapshot.
    `signer`: an `audit_sign.Signer` (known before the report is rendered, so it names it)."""
    from cloudexit.report.html import render_html
    from cloudexit.report.i18n import LANGS

    if lang not in LANGS:
        raise AuditError(f"unknown language {lang!r}", hint=f"use one of: {', '.join(LANGS)}")
    out = Path(out)
    others = prepare_out(out, force)
    tmp = {name: out / f".audit-tmp-{name}" for name in OUTPUTS}
    digests: dict[str, str] = {}
    # manifest.csv and events.jsonl are written by a thread on a second connection while the
    # facts are queried here: SQLite releases the GIL while it steps, so the two use two cores.
    # Both connections read one snapshot (see _twin_snapshot).
    other = _twin_snapshot(state)
    rule = Rule.of(state)
    written: dict[str, Any] = {}
    ready = threading.Event()
    redact = Redactor(state.meta("redact_key") or "") if redact_keys else None
    worker = threading.Thread(target=_write_exports, name="audit-manifest",
                              args=(other, tmp, rule, include_phi, written, ready, redact))

    def passes() -> Groups:
        ready.wait()
        if "error" in written:
            raise written["error"]
        return written["groups"]

    try:
        worker.start()
        facts = audit_facts(state, include_phi=include_phi, passes=passes)
        if redact is not None:
            redact.exceptions(facts["exceptions"])
    finally:
        worker.join()
        state.conn.execute("COMMIT")
        other.close()
    if "error" in written:
        raise written["error"]
    digests.update(written["digests"])
    rows, events = written["rows"], written["events"]
    facts["manifest"] = {"rows": rows, "sha256": digests["manifest.csv"],
                         "columns": list(MANIFEST_COLUMNS + (PHI_COLUMNS if include_phi else ())),
                         "keys_redacted": redact_keys}
    facts["events_export"] = {"events": events, "sha256": digests["events.jsonl"]}
    if signer is not None:
        facts["signature"] = signer.facts()
    fh = _HashingFile(tmp["audit.json"])
    fh.write(json.dumps(facts, indent=2, ensure_ascii=False, default=str) + "\n")
    digests["audit.json"] = fh.close()
    fingerprint = fingerprint_of(digests)
    fh = _HashingFile(tmp["audit.html"])
    fh.write(render_html(facts, lang, fingerprint))
    digests["audit.html"] = fh.close()
    fh = _HashingFile(tmp["SHA256SUMS"])
    fh.write(sums_text(digests))
    sums = fh.close()
    if signer is not None:
        from cloudexit.report.sign import sign

        os.replace(sign(tmp["SHA256SUMS"], signer), out / SIGNATURE)
    else:
        (out / SIGNATURE).unlink(missing_ok=True)  # a previous audit's (--force): it signs nothing here
    for name in OUTPUTS:
        os.replace(tmp[name], out / name)
    _fsync_dir(out)
    state.log("audit.written", out=str(out.resolve()), fingerprint=fingerprint, sha256sums=sums,
              verdict=facts["verdict"]["status"], lang=lang, phi=include_phi,
              events=events, head=facts["event_chain"]["head_hash"],
              **({"signer": signer.identity, "signer_key": signer.fingerprint} if signer is not None else {}))
    return AuditResult(out, {**digests, "SHA256SUMS": sums}, fingerprint, facts["verdict"], rows,
                       events, others)


def _twin_snapshot(state: State) -> sqlite3.Connection:
    """A second connection reading the very snapshot `state.conn` reads (both left inside a read
    transaction). A third connection holds the write lock for the few milliseconds it takes both
    to start reading, so no commit can land between them; a migration beside waits that long."""
    other = sqlite3.connect(state.path, check_same_thread=False, timeout=30, isolation_level=None)
    locker = sqlite3.connect(state.path, timeout=30, isolation_level=None)
    try:
        locker.execute("BEGIN IMMEDIATE")
        for conn in (state.conn, other):
            conn.execute("BEGIN")
            conn.execute("SELECT count(*) FROM meta").fetchone()  # the read snapshot starts here
    except BaseException:
        other.close()
        raise
    finally:
        if locker.in_transaction:
            locker.execute("ROLLBACK")
        locker.close()
    return other


def _write_exports(conn: sqlite3.Connection, tmp: dict[str, Path], rule: Rule, include_phi: bool,
                   result: dict[str, Any], ready: threading.Event, redact: Redactor | None = None) -> None:
    """manifest.csv, adding up the report's groups on the way (for the facts: `ready` says
    when), then events.jsonl, from `conn` (run in a thread: errors are handed back). The walk
    over every object and transfer is made once, here, for both."""
    try:
        fh = _HashingFile(tmp["manifest.csv"])
        fh.write(",".join(MANIFEST_COLUMNS + (PHI_COLUMNS if include_phi else ())) + "\n")
        rows = 0
        walked: dict[tuple[str, str, str | None], list[int]] = {}
        changed: dict[str, list[tuple[int, int]]] = {}
        for chunk, count in manifest_lines(conn, rule, include_phi, walked, changed, redact):
            fh.write(chunk)
            rows += count
        digests = {"manifest.csv": fh.close()}
        result["groups"] = (*groups_of_walk(walked, len(rule.dests) == 1), changed)
        ready.set()
        fh = _HashingFile(tmp["events.jsonl"])
        events = 0
        for ev in conn.execute("SELECT id, at, kind, detail, prev_hash, hash FROM events ORDER BY id"):
            fh.write(json.dumps({"id": ev[0], "at": ev[1], "kind": ev[2], "detail": ev[3],
                                 "prev_hash": ev[4], "hash": ev[5]}, ensure_ascii=False) + "\n")
            events += 1
        digests["events.jsonl"] = fh.close()
        result.update(digests=digests, rows=rows, events=events)
    except BaseException as exc:  # noqa: BLE001 - re-raised by the caller, in its thread
        result["error"] = exc
    finally:
        ready.set()


def sums_text(digests: dict[str, str]) -> str:
    return "".join(f"{digests[n]}  {n}\n" for n in OUTPUTS if n in digests and n != "SHA256SUMS")


def fingerprint_of(digests: dict[str, str]) -> str:
    text = "".join(f"{digests[n]}  {n}\n" for n in FINGERPRINTED)
    return hashlib.sha256(text.encode()).hexdigest()


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def current_user() -> str:
    """The login name, for the record ('?' when the system cannot tell)."""
    try:
        return getpass.getuser()
    except Exception:  # noqa: BLE001
        return "?"


# -- verifying --------------------------------------------------------------------------------
def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def verify_audit(folder: str | os.PathLike[str], db_path: str | os.PathLike[str] | None = None,
                 signer: str | os.PathLike[str] | None = None) -> dict[str, Any]:
    """Recompute an audit folder: files against SHA256SUMS, the exported event chain, the
    fingerprint in audit.html, (with `db_path`) the exported events against the DB's log, and
    (with `signer`, a public key or allowed_signers file) the signature of SHA256SUMS.

    Returns {"ok": bool, "problems": [text, ...], ...}; `problems` names each altered, added or
    removed file and each break in the chain.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise AuditError(f"{folder} is not a folder")
    problems: list[str] = []
    sums_path = folder / "SHA256SUMS"
    listed: dict[str, str] = {}
    if not sums_path.exists():
        problems.append("SHA256SUMS: removed (cannot check the other files without it)")
    else:
        for line in sums_path.read_text(encoding="utf-8", errors="replace").splitlines():
            digest, sep, name = line.partition("  ")
            if sep and len(digest) == 64:
                listed[name] = digest
            elif line.strip():
                problems.append(f"SHA256SUMS: altered (unreadable line {line[:60]!r})")
        for name in OUTPUTS:
            if name != "SHA256SUMS" and name not in listed:
                problems.append(f"SHA256SUMS: altered ({name} is not listed)")
    actual: dict[str, str] = {}
    for name, digest in listed.items():
        path = folder / name
        if not path.is_file():
            problems.append(f"{name}: removed (listed in SHA256SUMS)")
            continue
        actual[name] = _sha256_file(path)
        if actual[name] != digest:
            problems.append(f"{name}: altered (SHA-256 differs from SHA256SUMS)")
    for name in sorted(os.listdir(folder)):
        if name not in ("SHA256SUMS", SIGNATURE) and name not in listed:
            problems.append(f"{name}: added (not in SHA256SUMS)")
    chain = _check_export_chain(folder / "events.jsonl")
    problems += [f"events.jsonl: {p}" for p in chain["problems"]]
    facts: dict[str, Any] = {}
    try:
        facts = json.loads((folder / "audit.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        if (folder / "audit.json").exists():
            problems.append("audit.json: not readable JSON")
    if facts and chain["events"] and facts.get("event_chain", {}).get("head_hash") != chain["head"]:
        problems.append("events.jsonl: its last hash differs from the chain head recorded in audit.json")
    fingerprint = None
    altered = {n for n, d in listed.items() if n in actual and actual[n] != d}
    if all(n in actual for n in FINGERPRINTED) and not altered & {*FINGERPRINTED, "audit.html"}:
        # SHA256SUMS agrees with the files, yet a forger may have rewritten it: the fingerprint
        # printed in audit.html (and on the signed paper) still names the original data files.
        fingerprint = fingerprint_of({n: actual[n] for n in FINGERPRINTED})
        shown = _html_fingerprint(folder / "audit.html")
        if shown is not None and shown != fingerprint:
            problems.append("audit.html: its fingerprint does not match manifest.csv, events.jsonl and "
                            "audit.json (one of them was replaced)")
    db_check = None
    if db_path is not None:
        db_check = _check_against_db(folder, Path(db_path), chain, listed)
        problems += db_check["problems"]
    from cloudexit.report.sign import check as check_signature

    signature = check_signature(folder, signer, (facts.get("signature") or {}).get("fingerprint"))
    problems += signature["problems"]
    return {"ok": not problems, "folder": str(folder), "problems": problems, "files": sorted(actual),
            "chain": chain, "fingerprint": fingerprint,
            "verdict": (facts.get("verdict") or {}).get("status"), "db": db_check, "signature": signature}


def _check_export_chain(path: Path) -> dict[str, Any]:
    problems: list[str] = []
    prev, count, head = GENESIS_HASH, 0, GENESIS_HASH
    if not path.exists():
        return {"events": 0, "head": None, "intact": False, "problems": []}
    with open(path, encoding="utf-8", errors="replace") as fh:
        for n, line in enumerate(fh, 1):
            try:
                ev = json.loads(line)
                ident, at, kind, detail = ev["id"], ev["at"], ev["kind"], ev["detail"]
                stored_prev, stored = ev["prev_hash"], ev["hash"]
            except (ValueError, KeyError, TypeError):
                problems.append(f"line {n}: not an event")
                continue
            if stored_prev != prev:
                problems.append(f"event {ident}: does not follow the event before it "
                                "(an event was removed or inserted)")
            if event_hash(stored_prev, at, kind, detail) != stored:
                problems.append(f"event {ident} ({kind}): content altered")
            prev = head = stored
            count += 1
    return {"events": count, "head": head, "intact": not problems, "problems": problems}


def _html_fingerprint(path: Path) -> str | None:
    import re

    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return None
    match = re.search(r'data-fingerprint="([0-9a-f]{64})"', text)
    return match.group(1) if match else ""


def _check_against_db(folder: Path, db_path: Path, chain: dict[str, Any], listed: dict[str, str]) -> dict[str, Any]:
    """The exported events are the DB's own (same hashes at the same ids), and the DB's chain
    records this audit (an `audit.written` event naming this SHA256SUMS)."""
    problems: list[str] = []
    with open_readable(db_path) as state:
        db_problems = state.verify_event_chain()
        problems += [f"state DB event log: {p}" for p in db_problems[:20]]
        stored = {r["id"]: r["hash"] for r in state.query("SELECT id, hash FROM events")}
        written = [json.loads(r["detail"] or "{}") for r in state.query(
            "SELECT detail FROM events WHERE kind = 'audit.written'")]
    path = folder / "events.jsonl"
    if path.exists():
        with open(path, encoding="utf-8", errors="replace") as fh:
            for line in fh:
                try:
                    ev = json.loads(line)
                except ValueError:
                    continue
                if stored.get(ev.get("id")) != ev.get("hash"):
                    problems.append(f"events.jsonl: event {ev.get('id')} is not the state DB's event "
                                    f"{ev.get('id')}")
                    break
    sums = folder / "SHA256SUMS"
    digest = _sha256_file(sums) if sums.exists() else None
    recorded = any(w.get("sha256sums") == digest for w in written)
    if digest and not recorded:
        problems.append("SHA256SUMS: the state DB has no audit.written event with this digest "
                        "(the audit was not written from this DB, or was rewritten)")
    return {"path": str(db_path), "problems": problems, "recorded": recorded}
