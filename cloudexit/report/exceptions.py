"""The audit's exceptions: what failed, was kept aside, changed, is missing, skipped, unfinished
or not migrated, counted per category and destination and listed (the first LIST_LIMIT)."""

from __future__ import annotations

from typing import Any

from cloudexit.core import deletion
from cloudexit.core.states import COPIED, WAITING, ObjectStatus, sql_in
from cloudexit.core.states import TransferState as T
from cloudexit.report.verification import pacs_mismatches
from cloudexit.state.db import State

# Exception categories: which transfer groups (see groups.grouped) each one counts,
_CATEGORY_OF: dict[str, Any] = {
    "failed": lambda g: g["state"] == T.FAILED,
    "quarantined": lambda g: g["state"] == T.QUARANTINED and not g["conflict"],
    "conflicts": lambda g: g["state"] == T.CONFLICT or (g["state"] == T.QUARANTINED and g["conflict"]),
    "duplicates": lambda g: g["state"] == T.DUPLICATE,
    "changed": lambda g: bool(g["changed"] or g["stale"]),
    "missing": lambda g: g["state"] == T.MISSING,
    "skipped": lambda g: g["state"] == T.SKIPPED,
    "unfinished": lambda g: g["state"] in WAITING,
}
# and the same as SQL, with the remedy the report gives.
EXCEPTIONS: dict[str, tuple[str, str]] = {
    # category: (WHERE over transfers t JOIN objects o, remedy)
    "failed": (f"t.state = '{T.FAILED}'", "failed"),
    "quarantined": (f"t.state = '{T.QUARANTINED}' AND t.conflict_with IS NULL", "quarantined"),
    "conflicts": (f"(t.state = '{T.CONFLICT}' OR (t.state = '{T.QUARANTINED}' AND t.conflict_with IS NOT NULL))",
                  "conflict"),
    "duplicates": (f"t.state = '{T.DUPLICATE}'", "duplicate"),
    "changed": (f"(t.changes > 0 OR (t.state IN {sql_in(COPIED)} AND o.status = '{ObjectStatus.PRESENT}' "
                "AND t.etag IS NOT o.etag))",
                "changed"),
    "missing": (f"t.state = '{T.MISSING}'", "missing"),
    "skipped": (f"t.state = '{T.SKIPPED}'", "skipped"),
    "unfinished": (f"t.state IN {sql_in(WAITING)}", "unfinished"),
}


def exceptions(state: State, dests: list[str], groups: list[dict[str, Any]],
                tgroups: list[dict[str, Any]], limit: int,
                changed: dict[str, list[tuple[int, int]]] | None = None) -> dict[str, Any]:
    """`changed`: the "changed" rows to list, found by the manifest walk (see Groups); without
    it their query joins every transfer with its object."""
    out: dict[str, Any] = {}
    counts: dict[str, Any] = {}
    for name, belongs in _CATEGORY_OF.items():
        counts[f"{name}_n"] = sum(g["n"] for g in tgroups if belongs(g))
        counts[f"{name}_b"] = sum(g["b"] for g in tgroups if belongs(g))
    for name, belongs in _CATEGORY_OF.items():
        counts[f"{name}_by_dest"] = {d: sum(g["n"] for g in tgroups if g["dest"] == d and belongs(g))
                                     for d in dests}
    if len(dests) > 1:  # an object in several destinations counts once (per destination: by_dest)
        for name, (where, _) in EXCEPTIONS.items():
            if counts[f"{name}_n"]:
                counts[f"{name}_n"], counts[f"{name}_b"] = distinct(state, where)
    for name, (where, remedy) in EXCEPTIONS.items():
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

    deleted = f"FROM objects o WHERE o.status = '{ObjectStatus.DELETED}'"
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
                      f"SELECT key, patient_hash FROM objects o WHERE o.status = '{ObjectStatus.PRESENT}' AND "
                      f"(SELECT count(*) FROM transfers t WHERE t.key = o.key) < {deletion.expected_sql()} "
                      "ORDER BY key LIMIT :limit", {**deletion.params(dests, {}), "limit": limit})] if count else []}
    out["pacs"] = pacs_mismatches(state, limit)
    return out


def distinct(state: State, where: str) -> tuple[int, int]:
    """Objects (and their bytes) with a transfer matching `where` in any destination, once each."""
    row = state.query("SELECT count(*) AS n, coalesce(sum(o.size), 0) AS b FROM objects o WHERE EXISTS "
                      f"(SELECT 1 FROM transfers t WHERE t.key = o.key AND {where})")[0]
    return int(row["n"]), int(row["b"])


def _item(r: Any, remedy: str) -> dict[str, Any]:
    reason = r["reason"]
    if remedy == "changed":
        if r["status"] == ObjectStatus.PRESENT and r["t_etag"] != r["o_etag"] and r["state"] in COPIED:
            remedy = "stale"
            reason = f"the cloud copy changed after it was copied (ETag {r['t_etag']} -> {r['o_etag']})"
        else:
            reason = (f"changed at the source {r['changes']} time(s) during the migration; "
                      f"now {r['state']}") + (f": {r['reason']}" if r["reason"] else "")
    return {"key": r["key"], "dest": r["dest"], "state": r["state"], "reason": reason,
            "conflict_with": r["conflict_with"], "attempts": r["attempts"], "path": r["path"],
            "remedy": remedy, "patient_hash": r["patient_hash"]}


