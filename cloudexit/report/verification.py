"""What the audit reports of checking: the methods each copy was checked by, and what the last
`cloudexit verify` of each destination found (the verify_runs, verify_studies, verify_findings
and verify_samples tables)."""

from __future__ import annotations

import json
from typing import Any

from cloudexit.core.states import COPIED, VERIFY_FINISHED, VerifyStatus
from cloudexit.state.db import State
from cloudexit.state.destinations import has_table

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

def latest_verify_runs(state: State) -> list[dict[str, Any]]:
    """The last finished `cloudexit verify` run per destination (schema v3), with its counts."""
    if not has_table(state, "verify_runs"):
        return []
    out = []
    for r in state.query("SELECT * FROM verify_runs WHERE id IN (SELECT max(id) FROM verify_runs "
                         f"WHERE status != '{VerifyStatus.RUNNING}' GROUP BY dest) ORDER BY id"):
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


def pacs_mismatches(state: State, limit: int) -> dict[str, Any]:
    """What the last `cloudexit verify` of each destination found (PACS counts, archive files)."""
    runs = [r for r in latest_verify_runs(state) if r["status"] in VERIFY_FINISHED]
    if not runs:
        return {"checked": False, "count": 0, "bytes": 0, "remedy": "verify", "items": []}
    ids = [r["id"] for r in runs]
    marks = ",".join("?" * len(ids))
    count = int(state.scalar(f"SELECT count(*) FROM verify_findings WHERE run_id IN ({marks})", ids) or 0)
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


def verification(state: State, tgroups: list[dict[str, Any]], dests: list[str]) -> dict[str, Any]:
    methods = {m: 0 for m in METHODS}
    size_only = checked = 0
    not_checked: dict[str, int] = {}
    for r in tgroups:
        if r["state"] not in COPIED:
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
    verify = _verify_results(state, dests)
    pacs = [r for r in verify["runs"] if r["kind"] != "filesystem" and r["status"] in VERIFY_FINISHED]
    methods["pacs"] = sum(r["studies_ok"] for r in pacs)
    methods["sample"] = sum(r["samples_same"] for r in pacs)
    return {"objects_checked": checked, "methods": methods, "size_only": size_only,
            "not_checked": not_checked_rows, "verify": verify,
            "pacs_checked": bool(pacs), "pacs_studies": sum(r["studies_total"] for r in pacs),
            "sample_checked": any(r["samples_total"] for r in pacs),
            "samples": sum(r["samples_total"] for r in pacs)}


def _verify_results(state: State, dests: list[str]) -> dict[str, Any]:
    """What `cloudexit verify` (issue 5) recorded: the last run per destination."""
    runs = latest_verify_runs(state)
    done = {r["dest"] for r in runs if r["status"] in VERIFY_FINISHED}
    return {"run": bool(done), "runs": runs,
            "unverified": [d for d in dests if d not in done]}


