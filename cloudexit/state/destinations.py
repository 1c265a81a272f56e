"""Which destinations a state DB knows, and how each was last verified: one answer for the
audit, decommission, verify and status (they used to ask three ways, in different orders)."""

from __future__ import annotations

from typing import Any

from cloudexit.core.states import VERIFY_FINISHED, sql_in
from cloudexit.state.db import State


def destinations(state: State, verified: bool = False) -> list[str]:
    """Every destination a migration delivered to: those with a migration run first, in the
    order of their first run, then those with transfer rows only (PACS deliveries of an archive
    run) by name. `verified`: then every other destination a `cloudexit verify` checked, in the
    order of its first check (decommission and the delta figures require a copy there too)."""
    out = [r[0] for r in state.query(
        "SELECT dest FROM (SELECT dest, min(id) AS o FROM migration_runs GROUP BY dest "
        "UNION ALL SELECT dest, 1e18 FROM (SELECT DISTINCT dest FROM transfers)) "
        "GROUP BY dest ORDER BY min(o), dest")]
    if verified and has_table(state, "verify_runs"):
        for r in state.query("SELECT dest FROM verify_runs GROUP BY dest ORDER BY min(id)"):
            if r[0] not in out:
                out.append(r[0])
    return out


def has_table(state: State, name: str) -> bool:
    return bool(state.scalar("SELECT count(*) FROM sqlite_master WHERE type = 'table' AND name = ?", (name,)))


def last_verify_runs(state: State) -> dict[str, dict[str, Any]]:
    """The latest finished (passed or failed) `cloudexit verify` run of each destination."""
    if not has_table(state, "verify_runs"):
        return {}
    return {r["dest"]: dict(r) for r in state.query(
        "SELECT id, dest, kind, started_at FROM verify_runs WHERE id IN (SELECT max(id) FROM verify_runs "
        f"WHERE status IN {sql_in(VERIFY_FINISHED)} GROUP BY dest)")}
