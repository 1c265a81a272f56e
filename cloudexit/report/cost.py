"""The audit's time and money: the plan's estimate against the recorded bytes and requests
priced by the same model, throughput over time, and the charts by study year and modality."""

from __future__ import annotations

import json
from dataclasses import replace
from datetime import datetime
from typing import Any

from cloudexit.core.deletion import is_home
from cloudexit.core.errors import CloudexitError
from cloudexit.core.states import COPIED, ObjectKind, ObjectStatus, sql_in
from cloudexit.plan.inputs import ClassLoad
from cloudexit.state.db import State


def ts(text: str | None) -> float | None:
    return datetime.fromisoformat(text).timestamp() if text else None


def cost_facts(state: State, facts: dict[str, Any], tgroups: list[dict[str, Any]]) -> dict[str, Any]:
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
    from cloudexit.plan.inputs import Link, Range, Workload
    from cloudexit.plan.model import make_plan
    from cloudexit.plan.pricing import load_catalogue

    usage = facts["usage"]
    downloaded, gets = usage["bytes_downloaded"], usage["requests"]["GET"]
    start = facts["timeline"]["started_at"]
    if downloaded <= 0 or not start:
        return None, "nothing downloaded yet"
    classes = actual_classes(state, tgroups, downloaded, gets)
    if not classes:
        return None, "nothing downloaded yet"
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


def actual_classes(state: State, tgroups: list[dict[str, Any]], downloaded: int, gets: int) -> dict[str, ClassLoad]:
    """What was copied, per storage class, as the plan model's ClassLoads: the objects of the
    bucket fetched (a restore request and a minimum billable size each: a zip fetched through
    its files counts once, as the plan counts it), the files fetched inside zips, the recorded
    bytes shared out by what each class moved, and the GETs beyond one per fetch as parts."""
    by_class: dict[str, dict[str, Any]] = {}
    for g in tgroups:
        if g["state"] in COPIED:
            c = by_class.setdefault(g["sc"], {"sc": g["sc"], "n": 0, "b": 0, "files": 0, "zips": 0})
            c["n"] += g["n"]
            c["b"] += g["b"]
    # Files inside zips (cloudexit/state/members.py) are transfers but no objects of the bucket:
    # their zips are, once per destination (unless the zip was copied itself, --keep-containers).
    # CROSS JOIN: read the members from their index (objects_container), not every transfer (the
    # planner's choice otherwise: 0.19 s of CPU at 200,000 objects with no zip at all).
    for m in state.query(
            "SELECT coalesce(o.storage_class, 'STANDARD') AS sc, count(*) AS files, count(DISTINCT CASE WHEN "
            "NOT EXISTS (SELECT 1 FROM transfers z WHERE z.key = o.container AND z.dest = t.dest AND "
            f"z.state IN {sql_in(COPIED)}) THEN t.dest || char(0) || o.container END) AS zips "
            "FROM objects o CROSS JOIN transfers t ON t.key = o.key "
            f"WHERE o.container IS NOT NULL AND t.state IN {sql_in(COPIED)} GROUP BY 1"):
        if m["sc"] in by_class:
            by_class[m["sc"]].update(files=m["files"], zips=m["zips"])
    rows = sorted(by_class.values(), key=lambda c: -c["b"])
    moved = sum(r["b"] or 0 for r in rows)
    if not rows or moved <= 0:
        return {}
    classes: dict[str, ClassLoad] = {}
    left = downloaded
    for i, r in enumerate(rows):
        share = left if i == len(rows) - 1 else int(downloaded * (r["b"] or 0) / moved)
        left -= share
        classes[r["sc"]] = ClassLoad(r["n"] - r["files"] + r["zips"], max(share, 1),
                                     zips_unpacked=r["zips"], zip_files=r["files"])
    first = rows[0]["sc"]
    extra = gets - sum(c.fetches for c in classes.values())
    c0 = classes[first]
    classes[first] = (replace(c0, multipart_parts=extra) if extra >= 0
                      else replace(c0, multipart_objects=min(-extra, c0.fetches)))
    return classes


def bucket_size(span: float) -> int:
    for step in (1, 2, 5, 10, 15, 30, 60, 120, 300, 600, 900, 1800, 3600, 7200, 10800, 21600,
                 43200, 86400, 172800, 604800):
        if span / step <= 120:
            return step
    return int(span / 120) + 1


def throughput(state: State, timeline: dict[str, Any]) -> dict[str, Any]:
    """Bytes and objects verified over time, in up to ~120 buckets."""
    start = timeline["started_at"]
    t0 = int(ts(start) or 0)
    last = None
    end = max(int(last or t0), int(ts(timeline["finished_at"] or timeline["last_activity_at"]) or t0))
    bucket = bucket_size(max(end - t0, 1))
    points = [[r[0], r[1] or 0, r[2]] for r in state.query(
        "SELECT (unixepoch(verified_at) - ?) / ? AS b, sum(size), count(*) FROM transfers "
        f"WHERE verified_at IS NOT NULL AND state IN {sql_in(COPIED)} "
        "GROUP BY b ORDER BY b", (t0, bucket))]
    return {"t0": start, "end_s": end - t0, "bucket_s": bucket, "points": points}


def charts(throughput: dict[str, Any], groups: list[dict[str, Any]]) -> dict[str, Any]:
    years: dict[str, dict[str, Any]] = {}
    modalities: dict[str, dict[str, Any]] = {}
    for g in groups:
        if g["status"] != ObjectStatus.PRESENT or g["kind"] != ObjectKind.DICOM:
            continue
        y = years.setdefault(g["year"], {"name": g["year"], "objects": 0, "bytes": 0, "done_bytes": 0})
        m = modalities.setdefault(g["modality"], {"name": g["modality"], "objects": 0, "bytes": 0})
        for row in (y, m):
            row["objects"] += g["objects"]
            row["bytes"] += g["stored"]  # a file inside a zip: its bytes in the zip (groups.py)
        if is_home(g["decision"]):
            y["done_bytes"] += g["stored"]
    by_year = [years[k] for k in sorted(years)]
    by_modality = sorted(modalities.values(), key=lambda m: -m["bytes"])
    return {"throughput": throughput, "by_study_year": by_year, "by_modality": by_modality}


