"""Where the migration stands: counts and breakdowns from the state DB."""

from __future__ import annotations

import json
from typing import Any

from cloudexit.core.states import (
    DELIVERED,
    DONE,
    HANDLED,
    PROBLEMS,
    ObjectKind,
    ObjectStatus,
    is_pacs,
    sql_in,
)
from cloudexit.core.states import TransferState as T
from cloudexit.state.db import State
from cloudexit.state.destinations import destinations
from cloudexit.state.members import STORED_BYTES, ZIP_ARCHIVE, zip_counts


def _patient_key(state: State) -> dict[str, Any]:
    key = state.patient_key()
    return {"file": str(key.path), "available": key.key is not None, "problem": key.problem,
            "warning": key.warning()}


def inventory_summary(state: State) -> dict[str, Any]:
    """The inventory's totals and breakdowns (only objects present at the source)."""
    one = lambda sql: state.scalar(sql) or 0  # noqa: E731
    present = f"FROM objects WHERE status = '{ObjectStatus.PRESENT}'"
    dicom = present + f" AND kind = '{ObjectKind.DICOM}'"
    latest = state.query("SELECT * FROM inventory_rounds ORDER BY id DESC LIMIT 1")
    rounds = state.query("SELECT sum(list_requests) AS l, sum(get_requests) AS g, "
                         "sum(header_bytes) AS b FROM inventory_rounds")[0]
    summary: dict[str, Any] = {
        "source": state.meta("source_url"),
        "endpoint": state.meta("endpoint_url"),
        "objects": one(f"SELECT count(*) {present} AND container IS NULL"),  # in the bucket: not zip members
        "bytes": one(f"SELECT sum(size) {present}"),
        "dicom_instances": one(f"SELECT count(DISTINCT sop_uid) {dicom}"),
        "dicom_objects": one(f"SELECT count(*) {dicom}"),
        "studies": one(f"SELECT count(DISTINCT study_uid) {dicom}"),
        "series": one(f"SELECT count(DISTINCT series_uid) {dicom}"),
        "patients": one(f"SELECT count(DISTINCT patient_hash) {dicom}"),
        "non_dicom": one(f"SELECT count(*) {present} AND kind = '{ObjectKind.OTHER}' AND pacs_metadata IS NULL "
                         f"AND NOT ({ZIP_ARCHIVE})"),
        # zipped studies (cloudexit/state/members.py): the zips, among them those whose files could
        # not be read (kept whole; counted as unreadable too), and the files inside them
        **dict(zip(("zip_archives", "zip_archives_not_unpacked", "zip_members"), zip_counts(state.conn))),
        # Orthanc's header-only and DICOM-as-JSON copies: neither instances nor conflicts
        "pacs_metadata": one(f"SELECT count(*) {present} AND pacs_metadata IS NOT NULL"),
        "by_encoding": _breakdown(state, f"SELECT encoding, count(*), sum(size) {present} "
                                  "AND encoding IS NOT NULL AND container IS NULL GROUP BY 1 ORDER BY 2 DESC"),
        "unreadable": one(f"SELECT count(*) {present} AND kind = '{ObjectKind.UNREADABLE}'"),
        "pending": one(f"SELECT count(*) {present} AND kind = '{ObjectKind.PENDING}'"),
        # objects of the bucket (a deleted zip's files are not counted again), as the audit counts them
        "deleted_at_source": one(f"SELECT count(*) FROM objects WHERE status = '{ObjectStatus.DELETED}' "
                                 "AND container IS NULL"),
        "hostile_keys": one(f"SELECT count(*) {present} AND key_flags IS NOT NULL"),
        "duplicate_sop_uids": one(
            f"SELECT count(*) FROM (SELECT sop_uid {dicom} GROUP BY sop_uid HAVING count(*) > 1)"),
        # DICOM rows, files inside zips too (their bytes in the zip: STORED_BYTES)
        "by_modality": _breakdown(state, f"SELECT coalesce(modality, 'unknown'), count(*), "
                                  f"sum({STORED_BYTES}) {dicom} GROUP BY 1 ORDER BY 3 DESC"),
        "by_study_year": _breakdown(state, f"SELECT coalesce(substr(study_date, 1, 4), 'unknown'), "
                                    f"count(*), sum({STORED_BYTES}) {dicom} GROUP BY 1 ORDER BY 1"),
        "by_storage_class": _breakdown(state, f"SELECT storage_class, count(*), sum(size) "
                                       f"{present} AND container IS NULL GROUP BY 1 ORDER BY 3 DESC"),
        "patient_key": _patient_key(state),
        "inventory": {
            "rounds": one("SELECT count(*) FROM inventory_rounds"),
            "status": latest[0]["status"] if latest else None,
            "started_at": latest[0]["started_at"] if latest else None,
            "finished_at": latest[0]["finished_at"] if latest else None,
            "list_requests": rounds["l"] or 0,
            "get_requests": rounds["g"] or 0,
            "header_bytes": rounds["b"] or 0,
        },
    }
    if latest:
        r = latest[0]["id"]
        summary["last_round"] = {
            "round": r,
            "new": one(f"SELECT count(*) FROM objects WHERE change = 'new' AND change_round = {r}"),
            "changed": one(f"SELECT count(*) FROM objects WHERE change = 'changed' AND change_round = {r}"),
            "deleted": one(f"SELECT count(*) FROM objects WHERE change = 'deleted' AND change_round = {r}"),
        }
    return summary


def _breakdown(state: State, sql: str) -> list[dict[str, Any]]:
    return [{"name": row[0], "objects": row[1], "bytes": row[2] or 0} for row in state.query(sql)]


def migration_summary(state: State, studies: int = 10) -> dict[str, Any] | None:
    """The latest migration run: live or not, counts by state, studies in progress, costs.

    None when no migration has started in this state DB. Cheap enough to poll from another
    terminal while the run goes on (SQLite WAL lets readers in beside the writer).
    """
    from cloudexit.engine.migrate import counts, is_live, last_run
    from cloudexit.state.transfers import workers

    run = last_run(state)
    if run is None:
        return None
    dest = run["dest"]
    c = counts(state, dest)
    total = sum(v for k, v in c.items() if not k.startswith("_"))
    study_rows = state.query(
        "SELECT o.study_uid AS study, max(o.study_date) AS date, max(o.modality) AS modality, "
        "count(*) AS total, "
        f"sum(t.state IN {sql_in(DONE)}) AS done, "
        f"sum(t.state = '{T.FETCHING}') AS active, "
        f"sum(t.state IN {sql_in(PROBLEMS)}) AS problems, "
        "sum(t.size) AS bytes FROM transfers t JOIN objects o ON o.key = t.key "
        "WHERE t.dest = ? AND o.study_uid IS NOT NULL GROUP BY o.study_uid "
        "HAVING done < total OR problems > 0 "
        "ORDER BY active DESC, min(t.seq) LIMIT ?", (dest, studies))
    # Every study is in exactly one of three groups, so the three add up to studies_total:
    # complete (every object verified, a duplicate of one, or skipped by choice), with exceptions
    # (nothing left to move, but an object failed, is missing or was quarantined), in progress.
    by_study = state.query(
        f"SELECT sum(t.state IN {sql_in(PROBLEMS)}) AS problems, "
        f"sum(t.state IN {sql_in(DONE | {T.FAILED, T.MISSING})}) = count(*) AS finished "
        "FROM transfers t JOIN objects o ON o.key = t.key "
        "WHERE t.dest = ? AND o.study_uid IS NOT NULL GROUP BY o.study_uid", (dest,))
    groups = {"complete": 0, "exceptions": 0, "in_progress": 0}
    for r in by_study:
        groups["in_progress" if not r["finished"] else "exceptions" if r["problems"] else "complete"] += 1
    complete_studies, all_studies = groups["complete"], sum(groups.values())
    restores = {r["status"]: r["n"] for r in state.query(
        "SELECT status, count(*) AS n FROM restores GROUP BY status")}
    problems = [dict(r) for r in state.query(
        f"SELECT key, state, reason FROM transfers WHERE dest = ? AND state IN {sql_in(PROBLEMS)} "
        "ORDER BY seq LIMIT 20", (dest,))]
    live = is_live(run)
    deliveries = {}
    for pacs in json.loads(run["options"] or "{}").get("deliver") or []:
        pc = counts(state, pacs)
        deliveries[pacs] = {
            "objects": sum(v for k, v in pc.items() if not k.startswith("_")),
            "done": sum(pc.get(s, 0) for s in DELIVERED),
            "by_state": {k: v for k, v in pc.items() if not k.startswith("_")},
        }
    return {
        "run": run["id"],
        "dest": dest,
        "status": run["status"] if live or run["status"] != "running" else "interrupted",
        "live": live,
        "pid": run["pid"] if live else None,
        "started_at": run["started_at"],
        "finished_at": run["finished_at"],
        "resumed": run["resumed"],
        "heartbeat_at": run["heartbeat_at"],
        "waiting_since": run["waiting_since"] if live else None,
        "waiting_why": _waiting_why(state, run["id"]) if live and run["waiting_since"] else None,
        "stop_reason": run["stop_reason"],
        "bwlimit": run["bwlimit"],
        "objects": total,
        "by_state": {k: v for k, v in c.items() if not k.startswith("_")},
        "done": sum(c.get(s, 0) for s in DONE),
        "bytes_total": c["_bytes_total"],
        "bytes_done": c["_bytes_done"],
        "studies_total": all_studies or 0,
        "studies_complete": complete_studies,
        "studies_with_exceptions": groups["exceptions"],
        "studies_unfinished": groups["in_progress"],
        "studies_in_progress": [dict(r) for r in study_rows],
        "restores": restores,
        "problems": problems,
        "deliveries": deliveries,
        "workers": workers(state.conn, dest),  # migrate --cluster: per dask worker
        "usage": {
            "bytes_downloaded": run["bytes_downloaded"],
            "requests": {"GET": run["get_requests"], "HEAD": run["head_requests"],
                         "LIST": run["list_requests"], "RESTORE": run["restore_requests"]},
            "retries": run["retries"],
            "link_outages": run["link_outages"],
        },
    }


def delta_summary(state: State) -> dict[str, Any] | None:
    """What the next delta round would move, per destination, and what the last rounds found.

    For the cutover decision (issue 7): objects present at the source whose current version is not
    yet handled at a destination (new or changed since they were migrated), with their bytes, and
    the new/changed/deleted counts of the last inventory rounds. A PACS destination only counts
    DICOM objects. None before any migration.
    """
    dests = destinations(state, verified=True)
    if not dests:
        return None
    per_dest = []
    for dest in dests:
        only_dicom = f" AND o.kind = '{ObjectKind.DICOM}'" if is_pacs(dest) else ""
        row = state.query(
            "SELECT count(*) AS n, coalesce(sum(o.size), 0) AS b FROM objects o LEFT JOIN transfers t "
            f"ON t.key = o.key AND t.dest = ? WHERE o.status = '{ObjectStatus.PRESENT}'{only_dicom} AND "
            f"(t.key IS NULL OR t.etag IS NOT o.etag OR t.state NOT IN {sql_in(HANDLED)})", (dest,))[0]
        per_dest.append({"dest": dest, "objects": row["n"], "bytes": row["b"]})
    # The counts each round recorded when it completed (schema 7), not objects.change: that
    # holds only an object's latest change, so an older round would lose what a later one saw.
    rounds = []
    for r in state.query("SELECT id, finished_at, new_objects, changed_objects, deleted_objects "
                         "FROM inventory_rounds WHERE status = 'complete' ORDER BY id DESC LIMIT 5"):
        if r["new_objects"] is None:  # completed before schema 7 with no event to fill it from
            counts = {c["change"]: c["n"] for c in state.query(
                "SELECT change, count(*) AS n FROM objects WHERE change_round = ? GROUP BY change", (r["id"],))}
        else:
            counts = {"new": r["new_objects"], "changed": r["changed_objects"], "deleted": r["deleted_objects"]}
        rounds.append({"round": r["id"], "finished_at": r["finished_at"], "new": counts.get("new", 0),
                       "changed": counts.get("changed", 0), "deleted": counts.get("deleted", 0)})
    return {"destinations": per_dest, "left_objects": max(d["objects"] for d in per_dest),
            "left_bytes": max(d["bytes"] for d in per_dest), "rounds": rounds,
            "exit_window_ends": state.meta("exit_window_ends")}


def plan_vs_actual(state: State) -> dict[str, Any] | None:
    """The last plan against what the migration did: time per run and in all, bytes, and the
    error of the plan's expected time, so a hospital can see how far to trust the next plan.

    The scenario compared is the one the run followed: `within_schedule` when the plan had a
    timetable, else `fastest`. Times are the runs' active time (start to last heartbeat), not
    the days between them; the error is given once the migration is complete.
    None without a plan or a migration run.
    """
    text = state.meta("plan")
    runs = state.query("SELECT id, started_at, finished_at, heartbeat_at, status, bwlimit, "
                       "bytes_downloaded FROM migration_runs ORDER BY id")
    if not text or not runs:
        return None
    from datetime import datetime

    plan = json.loads(text)
    scenarios = {sc["key"]: sc for sc in plan.get("scenarios", [])}
    key = "within_schedule" if "within_schedule" in scenarios else "fastest"
    planned = (scenarios.get(key) or {}).get("time_s")
    if not planned:
        return None
    per_run = []
    for r in runs:
        end = r["finished_at"] or r["heartbeat_at"] or r["started_at"]
        seconds = (datetime.fromisoformat(end) - datetime.fromisoformat(r["started_at"])).total_seconds()
        per_run.append({"run": r["id"], "status": r["status"], "bwlimit": r["bwlimit"],
                        "seconds": max(seconds, 0.0), "bytes_downloaded": r["bytes_downloaded"]})
    active = sum(r["seconds"] for r in per_run)
    complete = runs[-1]["status"] in ("complete", "partial")
    return {
        "scenario": key, "link": (plan.get("link") or {}).get("source"),
        "planned_s": planned, "planned_bytes": (plan.get("workload") or {}).get("bytes"),
        "actual_s": active, "actual_bytes": sum(r["bytes_downloaded"] for r in per_run),
        "complete": complete, "runs": per_run,
        "error": (planned["expected"] - active) / active if complete and active > 0 else None,
        "inside_range": planned["low"] <= active <= planned["high"] if complete else None,
    }


def _waiting_why(state: State, run_id: int) -> str | None:
    """What the live run says the user may have to do while it waits (a TLS certificate that is
    no longer trusted), from its last link-down event."""
    rows = state.query("SELECT detail FROM events WHERE kind = 'migrate.link_down' ORDER BY id DESC LIMIT 1")
    if not rows or not rows[0]["detail"]:
        return None
    detail = json.loads(rows[0]["detail"])
    return detail.get("why") if detail.get("run") == run_id else None
