"""Where the migration stands: counts and breakdowns from the state DB."""

from __future__ import annotations

from typing import Any

from .state import State


def inventory_summary(state: State) -> dict[str, Any]:
    """The inventory's totals and breakdowns (only objects present at the source)."""
    one = lambda sql: state.scalar(sql) or 0  # noqa: E731
    present = "FROM objects WHERE status = 'present'"
    dicom = present + " AND kind = 'dicom'"
    latest = state.query("SELECT * FROM inventory_rounds ORDER BY id DESC LIMIT 1")
    rounds = state.query("SELECT sum(list_requests) AS l, sum(get_requests) AS g, "
                         "sum(header_bytes) AS b FROM inventory_rounds")[0]
    summary: dict[str, Any] = {
        "source": state.meta("source_url"),
        "endpoint": state.meta("endpoint_url"),
        "objects": one(f"SELECT count(*) {present}"),
        "bytes": one(f"SELECT sum(size) {present}"),
        "dicom_instances": one(f"SELECT count(DISTINCT sop_uid) {dicom}"),
        "dicom_objects": one(f"SELECT count(*) {dicom}"),
        "studies": one(f"SELECT count(DISTINCT study_uid) {dicom}"),
        "series": one(f"SELECT count(DISTINCT series_uid) {dicom}"),
        "patients": one(f"SELECT count(DISTINCT patient_hash) {dicom}"),
        "non_dicom": one(f"SELECT count(*) {present} AND kind = 'other'"),
        "unreadable": one(f"SELECT count(*) {present} AND kind = 'unreadable'"),
        "pending": one(f"SELECT count(*) {present} AND kind = 'pending'"),
        "deleted_at_source": one("SELECT count(*) FROM objects WHERE status = 'deleted'"),
        "hostile_keys": one(f"SELECT count(*) {present} AND key_flags IS NOT NULL"),
        "duplicate_sop_uids": one(
            f"SELECT count(*) FROM (SELECT sop_uid {dicom} GROUP BY sop_uid HAVING count(*) > 1)"),
        "by_modality": _breakdown(state, f"SELECT coalesce(modality, 'unknown'), count(*), "
                                  f"sum(size) {dicom} GROUP BY 1 ORDER BY 3 DESC"),
        "by_study_year": _breakdown(state, f"SELECT coalesce(substr(study_date, 1, 4), 'unknown'), "
                                    f"count(*), sum(size) {dicom} GROUP BY 1 ORDER BY 1"),
        "by_storage_class": _breakdown(state, f"SELECT storage_class, count(*), sum(size) "
                                       f"{present} GROUP BY 1 ORDER BY 3 DESC"),
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
