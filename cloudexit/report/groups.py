"""The groups every figure of the audit is added up from: objects and transfers grouped by their
decision, state, kind, modality, year, storage class... (`grouped`, two grouped queries), or the
same groups added up by the manifest walk (`groups_of_walk`, no second pass over the tables)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from cloudexit.core import deletion
from cloudexit.core.states import HELD, ObjectStatus, sql_in
from cloudexit.state.db import State
from cloudexit.state.destinations import destinations, last_verify_runs
from cloudexit.state.members import stored_bytes

LIST_LIMIT = 200  # exception rows listed in audit.json and audit.html per category
# (object groups, transfer groups, per destination its first LIST_LIMIT "changed" exceptions as
# (-seq, -rowid) of their transfers (a heap), or None: not known, to be queried)
Groups = tuple[list[dict[str, Any]], list[dict[str, Any]], dict[str, list[tuple[int, int]]] | None]


@dataclass(frozen=True)
class Rule:
    """What the deletion rule (cloudexit.core.deletion) depends on besides the tables: the
    destinations, and the latest verify run of each (read once, in the audit's snapshot)."""

    dests: tuple[str, ...]
    runs: dict[str, dict[str, Any]]

    @classmethod
    def of(cls, state: State) -> Rule:
        return cls(tuple(destinations(state)), last_verify_runs(state))

    def sql(self) -> tuple[str, str, dict[str, Any]]:
        """(decision expression, FROM clause, parameters): each object's "verdict: reason"."""
        decision, source = deletion.decision_sql(self.dests)
        return decision, source, deletion.params(self.dests, self.runs)


# A copy of the object is at the destination, but not of its current version.
STALE = f"(t.state IN {sql_in(HELD)} AND o.status = '{ObjectStatus.PRESENT}' AND t.etag IS NOT o.etag)"
_TRANSFER_GROUPS = (
    f"t.dest, t.state, t.conflict_with IS NOT NULL AS conflict, t.changes > 0 AS changed, {STALE} AS stale, "
    "coalesce(o.storage_class, 'STANDARD') AS sc, t.checks, t.not_checked")
_TRANSFER_SUMS = "count(t.key) AS n, coalesce(sum(t.size), 0) AS b, coalesce(sum(t.sha256 IS NOT NULL), 0) AS sha"
_OBJECT_GROUPS = (
    "o.status, o.kind, coalesce(o.modality, '') AS modality, "
    "coalesce(substr(o.study_date, 1, 4), '') AS year, coalesce(o.storage_class, 'STANDARD') AS sc, "
    "o.key_flags IS NOT NULL AS hostile, o.container IS NOT NULL AS member")
# bytes: the bucket's (a file inside a zip has none of its own); stored: as stored in the bucket,
# a file inside a zip its bytes in the zip (for breakdowns of DICOM files, as status gives them)
_OBJECT_SUMS = f"count(*) AS objects, coalesce(sum(o.size), 0) AS bytes, coalesce(sum({stored_bytes('o')}), 0) AS stored"
_OBJECT_KEYS = ("decision", "status", "kind", "modality", "year", "sc", "hostile", "member")
_OBJECT_TOTALS = ("objects", "bytes", "stored")
_TRANSFER_KEYS = ("dest", "state", "conflict", "changed", "stale", "sc", "checks", "not_checked")


def grouped(state: State, rule: Rule) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(object groups, transfer groups): everything the report breaks figures down by.

    One destination (the usual case): one scan of `objects` joined with `transfers`, grouped by
    both sets of columns at once (each sort of a million rows costs seconds); several: a scan
    of each table."""
    decision, source, params = rule.sql()
    if len(rule.dests) != 1:
        groups = [dict(r) for r in state.query(
            f"SELECT {decision} AS decision, {_OBJECT_GROUPS}, {_OBJECT_SUMS} FROM {source} "
            f"GROUP BY {', '.join(str(i) for i in range(1, len(_OBJECT_KEYS) + 1))}", params)]
        return groups, [dict(r) for r in state.query(
            f"SELECT {_TRANSFER_GROUPS}, {_TRANSFER_SUMS} FROM transfers t JOIN objects o ON o.key = t.key "
            "GROUP BY 1, 2, 3, 4, 5, 6, 7, 8")]
    both = state.query(
        f"SELECT {decision} AS decision, {_OBJECT_GROUPS}, {_TRANSFER_GROUPS.replace(' AS sc,', ' AS tsc,')}, "
        f"{_OBJECT_SUMS}, {_TRANSFER_SUMS} FROM {source} "
        f"GROUP BY {', '.join(str(i) for i in range(1, len(_OBJECT_KEYS) + len(_TRANSFER_KEYS) + 1))}",
        params)
    return _fold(both, _OBJECT_KEYS, _OBJECT_TOTALS), _fold(
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
    """`grouped`'s answer, rebuilt from what the manifest walk added up (see manifest_lines):
    the same groups, in the same order (ties in the report's rankings keep it)."""
    rows = []
    for (decision, okey, tkey), (lines, objects, size, stored, tsize, sha) in walked.items():
        tcols = json.loads(tkey) if tkey is not None else [None] * len(_TRANSFER_KEYS)
        row = {"decision": decision[1:-1], **dict(zip(_OBJECT_KEYS[1:], json.loads(okey))),
               **{f"t_{k}": v for k, v in zip(_TRANSFER_KEYS, tcols)},
               "objects": objects, "bytes": size, "stored": stored,
               "n": lines if tkey is not None else 0, "b": tsize, "sha": sha}
        rows.append(row)
    okeys, tkeys = _OBJECT_KEYS, tuple(f"t_{k}" for k in _TRANSFER_KEYS)
    rows.sort(key=lambda r: [_sql_order(r[k]) for k in (okeys + tkeys if single else okeys)])
    groups = _fold([r for r in rows if r["objects"]], okeys, _OBJECT_TOTALS)
    moved = [r for r in rows if r["t_dest"] is not None]
    if not single:
        moved.sort(key=lambda r: [_sql_order(r[k]) for k in tkeys])
    return groups, _fold(moved, _TRANSFER_KEYS, ("n", "b", "sha"), {k: f"t_{k}" for k in _TRANSFER_KEYS})


# Exception categories: which transfer groups (see _passes) each one counts.
