"""What the audit reports of leaving the cloud: the decommission decisions (the deletion rule,
cloudexit.core.deletion, over every object), the delta rounds, and the proof of each
`cloudexit decommission --execute` (the decommission_runs and deletions tables)."""

from __future__ import annotations

import json
from typing import Any

from cloudexit.core.deletion import is_home
from cloudexit.core.states import HELD, DecommissionMode, ObjectStatus, sql_in
from cloudexit.core.states import DeletionOutcome as Outcome
from cloudexit.report.groups import Rule
from cloudexit.state.db import State
from cloudexit.state.destinations import has_table


def decommission_totals(groups: list[dict[str, Any]]) -> dict[str, Any]:
    """The decisions over the bucket's objects (what decommission would delete or keep), and
    apart, over the files inside zips (never deleted themselves: their zip's row is judged by
    them, "zip_members")."""
    found: dict[tuple[str, str], dict[str, Any]] = {}
    files: dict[tuple[str, str], dict[str, Any]] = {}
    totals = {d: {"objects": 0, "bytes": 0} for d in ("safe", "review", "keep", "gone")}
    for g in groups:
        decision, _, reason = g["decision"].partition(": ")
        row = (files if g["member"] else found).setdefault(
            (decision, reason), {"decision": decision, "reason": reason, "objects": 0, "bytes": 0})
        for k in ("objects", "bytes"):
            row[k] += g[k]
            if not g["member"]:
                totals[decision][k] += g[k]
    return {"rows": [found[k] for k in sorted(found)], "totals": totals,
            "zip_files": [files[k] for k in sorted(files)]}


def delta_rounds(state: State, rule: Rule) -> dict[str, Any]:
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
    for g in state.query(
            f"SELECT o.change_round AS r, {decision} AS decision, count(*) AS n FROM {source} "
            f"WHERE o.change_round > :first AND o.change IN ('new', 'changed') AND o.status = '{ObjectStatus.PRESENT}' "
            "GROUP BY 1, 2", {**params, "first": rounds[0]["id"]}):
        at = home.setdefault(g["r"], {"objects": 0, "left": 0})
        at["objects"] += g["n"]
        if not is_home(g["decision"]):
            at["left"] += g["n"]
    out = []
    for i, r in enumerate(rounds[1:], 1):
        until = rounds[i + 1]["started_at"] if i + 1 < len(rounds) else "9999"
        # Copied: this round's new or changed objects whose current version reached a destination
        # (by ETag, not by time: timestamps have one-second resolution).
        moved = state.query(
            "SELECT count(*) AS n, coalesce(sum(o.size), 0) AS b FROM objects o WHERE o.change_round = ? "
            "AND o.change IN ('new', 'changed') AND EXISTS (SELECT 1 FROM transfers t WHERE t.key = o.key "
            f"AND t.etag IS o.etag AND t.state IN {sql_in(HELD)})", (r["id"],))[0]
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


def deletion_proof(state: State, limit: int) -> dict[str, Any]:
    """Proof of deletion: each `cloudexit decommission --execute`, from its `deletions` rows (the
    store's own answer for every object, and the request id of each DeleteObjects batch) and
    its `decommission.*` events; and what is still in the cloud after the last one, and why."""
    none = {"executed": False, "runs": [], "dry_runs": 0, "refused": [],
            "totals": {k: 0 for k in ("deleted", "deleted_bytes", "delete_markers", "failed", "confirmed",
                                      "unconfirmed", "batches", "refused")},
            "still_present": None}
    if not has_table(state, "decommission_runs"):
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
    for r in state.query(f"SELECT * FROM decommission_runs WHERE mode = '{DecommissionMode.EXECUTE}' ORDER BY id"):
        outcome = {x["outcome"]: dict(x) for x in state.query(
            "SELECT outcome, count(*) AS n, coalesce(sum(size), 0) AS b, count(confirmed_at) AS c "
            "FROM deletions WHERE run_id = ? GROUP BY outcome", (r["id"],))}
        zero = {"n": 0, "b": 0, "c": 0}
        gone, markers, failed = (outcome.get(k, zero) for k in Outcome)
        batches = [dict(x) for x in state.query(
            f"SELECT batch, request_id, count(*) AS objects, sum(outcome != '{Outcome.FAILED}') AS deleted, "
            f"sum(outcome = '{Outcome.FAILED}') AS failed, min(deleted_at) AS at FROM deletions WHERE run_id = ? "
            "GROUP BY batch ORDER BY batch LIMIT ?", (r["id"], limit))]
        errors = [dict(x) for x in state.query(
            "SELECT coalesce(error_code, '?') AS code, count(*) AS objects FROM deletions "
            f"WHERE run_id = ? AND outcome = '{Outcome.FAILED}' GROUP BY 1 ORDER BY 2 DESC", (r["id"],))]
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
            "dry_runs": int(state.scalar("SELECT count(*) FROM decommission_runs WHERE mode = ?",
                                         (DecommissionMode.DRY_RUN,)) or 0),
            "refused": refused[:limit], "totals": totals, "still_present": still}


