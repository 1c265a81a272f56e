"""Decommission: delete the cloud copy, but only what is verified at every destination.

`plan()` (the dry run) lists the bucket as it is now (every version and delete marker when the
bucket is or was versioned), decides per object version whether it may go, writes the deletion
manifest (CSV, 0600) and returns a confirmation token: a hash of exactly the rows it would
delete. `execute()` does the same listing and decision again and refuses unless the token
matches, so nothing is deleted that the person confirming did not see in a dry run. It then
sends DeleteObjects batches and records every object's answer in the `deletions` table, with an
event per batch in the hash-chained log; a listing afterwards confirms each deletion.

A version may go when, at every destination:
* its transfer row is good (`verified`, `duplicate` of a verified copy, `stored`, `warning`)
  for exactly this ETag, and
* the latest `cloudexit verify` of that destination ran after the copy landed and found nothing
  wrong with the object, its study (a PACS) or its SOP Instance UID.
A PACS destination only applies to DICOM objects; an object must be kept at one destination
at least. Anything else stays, with the reason in the manifest.

Versioned buckets (docs/decommission.md): without `all_versions`, a verified key gets a delete
marker (DeleteObjects without VersionId): its data still exists as a noncurrent version and is
still billed; the report says so. With `all_versions`, each version whose ETag is the verified
one is deleted by VersionId, and the key's delete markers once every version of it goes.
Noncurrent versions with other content were never migrated: they are kept and reported.
Unversioned buckets: each key is deleted with its verified ETag as a condition (the store answers
PreconditionFailed if it was overwritten since).
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import socket
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

from .audit import PACS_PREFIXES, current_user, last_verify_runs, recheck_sql
from .cleanup_source import MAX_BATCH, Version, delete_batch, list_all, versioning
from .config import SourceConfig
from .errors import ConfirmationMismatch, NothingMigrated, StateError, UsageError
from .files import write_private
from .source import Source
from .state import State, now

GOOD_STATES = ("verified", "duplicate", "stored", "warning")
MANIFEST_FIELDS = ("action", "key", "version_id", "is_latest", "delete_marker", "etag", "size",
                   "last_modified", "sha256", "kept_at", "how", "reason")
EXIT_LEFT = 3  # something stays in the bucket (or failed): report written


@dataclass
class ManifestRow:
    action: str  # delete | keep
    key: str
    version_id: str | None
    is_latest: bool
    delete_marker: bool
    etag: str | None
    size: int
    last_modified: str
    sha256: str | None = None
    kept_at: list[str] = field(default_factory=list)
    how: str = ""  # delete: version (by VersionId) | if-match (by key, ETag condition) | marker | key
    reason: str = ""

    def csv_row(self) -> list[Any]:
        return [self.action, self.key, self.version_id or "", int(self.is_latest),
                int(self.delete_marker), self.etag or "", self.size, self.last_modified,
                self.sha256 or "", ";".join(self.kept_at), self.how, self.reason]


@dataclass
class Plan:
    """A dry run: what would be deleted, what stays and why, and the token to confirm it."""

    source: str
    endpoint: str | None
    versioning: str
    all_versions: bool
    destinations: list[str]
    rows: list[ManifestRow]
    token: str
    manifest: str | None = None
    manifest_sha256: str | None = None
    run_id: int | None = None

    @property
    def to_delete(self) -> list[ManifestRow]:
        return [r for r in self.rows if r.action == "delete"]

    @property
    def kept(self) -> list[ManifestRow]:
        return [r for r in self.rows if r.action == "keep"]

    def summary(self) -> dict[str, Any]:
        data = [r for r in self.kept if not r.delete_marker]
        reasons: dict[str, dict[str, int]] = defaultdict(lambda: {"objects": 0, "bytes": 0})
        for r in data:
            reasons[_reason_class(r.reason)]["objects"] += 1
            reasons[_reason_class(r.reason)]["bytes"] += r.size
        markers = sum(1 for r in self.to_delete if r.how == "marker")
        return {
            "source": self.source, "endpoint": self.endpoint, "versioning": self.versioning,
            "all_versions": self.all_versions, "destinations": self.destinations,
            "to_delete": len(self.to_delete), "to_delete_bytes": sum(r.size for r in self.to_delete),
            "kept": len(data), "kept_bytes": sum(r.size for r in data),
            "kept_by_reason": dict(sorted(reasons.items())),
            "delete_markers_to_place": markers,
            "noncurrent_left": sum(1 for r in data if not r.is_latest),
            "token": self.token, "manifest": self.manifest, "manifest_sha256": self.manifest_sha256,
            "run": self.run_id,
        }


@dataclass
class Execution:
    plan: Plan
    run_id: int
    batches: int = 0
    deleted: int = 0  # versions deleted, or delete markers placed
    deleted_bytes: int = 0
    markers: int = 0  # of which delete markers (data still there as noncurrent versions)
    failed: list[tuple[str, str | None, str]] = field(default_factory=list)  # key, version, error
    confirmed: int = 0
    unconfirmed: list[str] = field(default_factory=list)

    @property
    def exit_code(self) -> int:
        return EXIT_LEFT if (self.failed or self.plan.kept or self.markers or self.unconfirmed) else 0

    def to_dict(self) -> dict[str, Any]:
        return {"run": self.run_id, "plan": self.plan.summary(), "batches": self.batches,
                "deleted": self.deleted, "deleted_bytes": self.deleted_bytes,
                "delete_markers": self.markers, "confirmed": self.confirmed,
                "unconfirmed": self.unconfirmed[:100],
                "failed": [{"key": k, "version_id": v, "error": e} for k, v, e in self.failed]}


def _reason_class(reason: str) -> str:
    return reason.split(":", 1)[0]


# -- inputs -----------------------------------------------------------------------------------------
def source_from_state(state: State, endpoint_url: str | None = None, profile: str | None = None,
                      region: str | None = None, retries: int = SourceConfig.max_attempts) -> Source:
    """The bucket this state DB migrated, on its recorded endpoint unless told otherwise."""
    url = state.meta("source_url")
    if url is None:
        raise StateError("this state DB has no inventory yet",
                         hint="run `cloudexit inventory s3://BUCKET` first")
    bound = state.meta("endpoint_url")
    return Source(url, SourceConfig(
        endpoint_url=endpoint_url or (None if bound in (None, "aws") else bound),
        profile=profile, region=region or state.meta("region"), max_attempts=retries))


def default_destinations(state: State) -> list[str]:
    """Every destination a migration delivered to or a verify checked, in first-use order."""
    from .verify import destinations

    seen = destinations(state)
    for r in state.query("SELECT dest FROM verify_runs GROUP BY dest ORDER BY min(id)"):
        if r["dest"] not in seen:
            seen.append(r["dest"])
    return seen


def _dest_id(dest: str) -> str:
    """A `--to` value as the id recorded in the DB (folders become file:///abs/path)."""
    if dest.startswith(PACS_PREFIXES) or dest.startswith("file://"):
        return dest
    return "file://" + os.path.abspath(os.path.expanduser(dest))  # as FilesystemStore.id


# -- the decision ------------------------------------------------------------------------------------
class _Judge:
    """Decides, per (key, ETag), whether every destination holds a verified copy."""

    def __init__(self, state: State, dests: list[str]) -> None:
        self.state = state
        self.dests = dests
        self.objects = {r["key"]: r for r in state.query(
            "SELECT key, etag, kind, status, study_uid, sop_uid FROM objects")}
        self.transfers: dict[str, dict[str, Any]] = {}
        # The verification half of the rule is the audit's SQL (one rule for both reports).
        self.verify = last_verify_runs(state)
        recheck, params = recheck_sql(dests, self.verify)
        for d in dests:
            self.transfers[d] = {r["key"]: r for r in state.query(
                f"SELECT t.key, t.state, t.etag, t.sha256, t.path, t.reason, {recheck} AS recheck "
                "FROM transfers t JOIN objects o ON o.key = t.key WHERE t.dest = :dest", {**params, "dest": d})}

    def judge(self, key: str, etag: str | None) -> tuple[bool, list[str], str | None, str]:
        """(safe, destinations holding it, sha256 of the kept copy, reason)."""
        o = self.objects.get(key)
        if o is None:
            return False, [], None, "not inventoried: new since the last inventory (run inventory, migrate, verify)"
        held: list[str] = []
        sha = None
        for d in self.dests:
            pacs = d.startswith(PACS_PREFIXES)
            if pacs and o["kind"] != "dicom":
                continue  # a PACS keeps DICOM only; the archive destinations must hold the rest
            t = self.transfers[d].get(key)
            if t is None:
                return False, held, sha, f"not migrated: not delivered to {d}"
            if t["etag"] != etag:
                return False, held, sha, (f"other version: {d} holds ETag {t['etag']}, "
                                          f"this version ({etag}) was never migrated")
            if t["state"] not in GOOD_STATES:
                return False, held, sha, f"{t['state']}: at {d}" + (f" ({t['reason']})" if t["reason"] else "")
            if t["recheck"]:
                return False, held, sha, _recheck_text(t["recheck"], d, self.verify.get(d))
            held.append(d)
            sha = sha or t["sha256"]
        if not held:
            return False, held, sha, "no archive: not DICOM, and no folder destination holds it"
        return True, held, sha, "verified at every destination"


def _recheck_text(why: str, dest: str, run: dict[str, Any] | None) -> str:
    """The manifest's words for a `recheck_sql` answer."""
    ident = f"(verify run {run['id']})" if run else ""
    return {
        "duplicate_unverified": f"duplicate: the copy it duplicates is not verified at {dest}",
        "no_verify": f"not re-verified: no `cloudexit verify` of {dest} yet",
        "landed_after_verify": f"not re-verified: landed at {dest} after its last verify {ident}",
        "verify_problem": f"verify found a problem: with the object, its file, SOP Instance UID or study "
                          f"at {dest} {ident}",
        "study_not_ok": f"not re-verified: study not counted ok at {dest} {ident}",
    }[why]


def plan(state: State, source: Source, destinations: Iterable[str] | None = None,
         all_versions: bool = False, manifest: str | os.PathLike[str] | None = None,
         record: bool = True) -> Plan:
    """The dry run: list the bucket now, decide per version, write the manifest."""
    dests = [_dest_id(d) for d in destinations] if destinations else default_destinations(state)
    if not dests:
        raise NothingMigrated("nothing to decommission: no migration has delivered anywhere yet",
                              hint="run `cloudexit migrate --to DEST` and `cloudexit verify` first")
    if state.meta("source_url") != source.url:
        raise StateError(f"this state DB migrated {state.meta('source_url')}, not {source.url}")
    running = state.scalar("SELECT count(*) FROM inventory_rounds WHERE status = 'running'")
    if running:
        raise StateError("the inventory is not finished", hint="run `cloudexit inventory` again first")
    status = versioning(source)
    versioned = status != "off"
    judge = _Judge(state, dests)
    listed = list(list_all(source, versioned))
    rows = _decide(listed, judge, versioned, all_versions)
    token = _token(source.url, status, all_versions, rows)
    result = Plan(source.url, source.config.endpoint_url, status, all_versions, dests, rows, token)
    if manifest is not None:
        result.manifest, result.manifest_sha256 = str(manifest), write_manifest(manifest, rows)
    if record:
        summary = result.summary()
        with state.transaction() as tx:
            cur = tx.execute(
                "INSERT INTO decommission_runs(started_at, finished_at, mode, status, source, endpoint, "
                "versioning, all_versions, destinations, manifest, manifest_sha256, token, to_delete, "
                "to_delete_bytes, kept, kept_bytes, summary) VALUES (?, ?, 'dry-run', 'planned', ?, ?, ?, "
                "?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (now(), now(), source.url, source.config.endpoint_url, status, int(all_versions),
                 json.dumps(dests), result.manifest, result.manifest_sha256, token, summary["to_delete"],
                 summary["to_delete_bytes"], summary["kept"], summary["kept_bytes"],
                 json.dumps(summary["kept_by_reason"])))
            result.run_id = int(cur.lastrowid or 0)
            state.log("decommission.planned", tx, run=result.run_id, token=token, versioning=status,
                      all_versions=all_versions, to_delete=summary["to_delete"], kept=summary["kept"],
                      manifest_sha256=result.manifest_sha256)
    return result


def _decide(listed: list[Version], judge: _Judge, versioned: bool, all_versions: bool) -> list[ManifestRow]:
    by_key: dict[str, list[Version]] = defaultdict(list)
    for v in listed:
        by_key[v.key].append(v)
    rows: list[ManifestRow] = []
    for key in sorted(by_key):
        versions = by_key[key]
        data = [v for v in versions if not v.delete_marker]
        decided: list[ManifestRow] = []
        for v in data:
            safe, held, sha, reason = judge.judge(key, v.etag)
            row = ManifestRow("keep", key, v.version_id, v.is_latest, False, v.etag, v.size,
                              v.last_modified, sha, held, "", reason)
            if not versioned:
                if safe:
                    row.action, row.how = "delete", "if-match"
            elif all_versions:
                if safe:
                    row.action, row.how = "delete", "version"
                elif not v.is_latest and any(judge.judge(key, w.etag)[0] for w in data if w is not v):
                    row.reason = (f"older content: this noncurrent version was never migrated; kept ({reason})"
                                  if not reason.startswith("not inventoried") else reason)
            else:
                if safe and v.is_latest:
                    row.action, row.how = "delete", "marker"
                    row.reason = ("verified at every destination; a delete marker hides it, its data stays "
                                  "as a noncurrent version (use --all-versions to delete it)")
                elif safe:
                    row.reason = "noncurrent version: kept (only --all-versions deletes old versions)"
            decided.append(row)
        all_go = bool(decided) and all(r.action == "delete" for r in decided)
        for m in (v for v in versions if v.delete_marker):
            row = ManifestRow("keep", key, m.version_id, m.is_latest, True, None, 0, m.last_modified,
                              reason="delete marker: holds no data")
            if all_versions and all_go:
                row.action, row.how, row.reason = "delete", "version", "delete marker of a key whose every version goes"
            decided.append(row)
        rows.extend(decided)
    return rows


def _token(source: str, status: str, all_versions: bool, rows: list[ManifestRow]) -> str:
    canon = json.dumps([source, status, all_versions,
                        [[r.key, r.version_id, r.etag, r.how] for r in rows if r.action == "delete"]],
                       ensure_ascii=False)
    digest = hashlib.sha256(canon.encode()).hexdigest()[:16]
    return "-".join(digest[i:i + 4] for i in range(0, 16, 4))


def _same_token(given: str, token: str) -> bool:
    return given.replace("-", "").strip().lower() == token.replace("-", "")


def write_manifest(path: str | os.PathLike[str], rows: list[ManifestRow]) -> str:
    """The manifest as CSV, 0600 (it names every key). Returns its SHA-256."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(MANIFEST_FIELDS)
    for r in rows:
        writer.writerow(r.csv_row())
    data = buf.getvalue().encode()
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    write_private(target, data, durable=True)
    return hashlib.sha256(data).hexdigest()


# -- execution ---------------------------------------------------------------------------------------
def execute(state: State, source: Source, token: str, destinations: Iterable[str] | None = None,
            all_versions: bool = False, manifest: str | os.PathLike[str] | None = None,
            batch_size: int = MAX_BATCH, conditional: bool = True,
            progress: Callable[[int, int], None] | None = None) -> Execution:
    """Delete what a dry run with the same outcome listed; refuse if the token does not match."""
    if not 1 <= batch_size <= MAX_BATCH:
        raise UsageError(f"--batch-size {batch_size}: use 1 to {MAX_BATCH}")
    p = plan(state, source, destinations, all_versions, manifest, record=False)
    if not _same_token(token, p.token):
        state.log("decommission.refused", given=token, source=source.url,
                  reason="token does not match the objects to delete now")
        raise ConfirmationMismatch(
            f"the confirmation token {token!r} does not match what would be deleted now",
            hint="the objects to delete changed since that dry run (or the token is from another one, "
                 "or --all-versions differs): run `cloudexit decommission` again, review it, confirm its token")
    summary = p.summary()
    stamp = now()
    with state.transaction() as tx:
        cur = tx.execute(
            "INSERT INTO decommission_runs(started_at, mode, status, source, endpoint, versioning, all_versions, "
            "destinations, manifest, manifest_sha256, token, to_delete, to_delete_bytes, kept, kept_bytes, summary) "
            "VALUES (?, 'execute', 'running', ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (stamp, source.url, source.config.endpoint_url, p.versioning, int(all_versions),
             json.dumps(p.destinations), p.manifest, p.manifest_sha256, p.token, summary["to_delete"],
             summary["to_delete_bytes"], summary["kept"], summary["kept_bytes"],
             json.dumps(summary["kept_by_reason"])))
        run_id = int(cur.lastrowid or 0)
        state.log("decommission.started", tx, run=run_id, token=p.token, source=source.url,
                  user=current_user(), host=socket.gethostname(),
                  versioning=p.versioning, all_versions=all_versions, destinations=p.destinations,
                  to_delete=summary["to_delete"], manifest_sha256=p.manifest_sha256)
    p.run_id = run_id
    result = Execution(p, run_id)
    todo = p.to_delete
    try:
        for start in range(0, len(todo), batch_size):
            _one_batch(state, source, result, todo[start:start + batch_size], conditional)
            if progress:
                progress(min(start + batch_size, len(todo)), len(todo))
        _confirm(state, source, result, p.versioning != "off")
    finally:
        status = "complete" if not result.failed and result.batches * batch_size >= len(todo) else "partial"
        with state.transaction() as tx:
            tx.execute("UPDATE decommission_runs SET finished_at = ?, status = ?, deleted = ?, failed = ?, "
                       "batches = ? WHERE id = ?", (now(), status, result.deleted, len(result.failed),
                                                    result.batches, run_id))
            state.log("decommission.finished", tx, run=run_id, status=status, deleted=result.deleted,
                      delete_markers=result.markers, failed=len(result.failed), confirmed=result.confirmed,
                      kept=summary["kept"], kept_bytes=summary["kept_bytes"])
    return result


def _one_batch(state: State, source: Source, result: Execution, rows: list[ManifestRow],
               conditional: bool) -> None:
    objects: list[dict[str, str]] = []
    for r in rows:
        item = {"Key": r.key}
        if r.how == "version":
            item["VersionId"] = r.version_id or "null"
        elif r.how == "if-match" and conditional and r.etag:
            item["ETag"] = f'"{r.etag}"'
        objects.append(item)
    answer = delete_batch(source, objects)
    stamp = now()
    result.batches += 1
    batch = result.batches
    by_version = rows[0].how == "version"
    done: dict[tuple[str, str | None], dict[str, Any]] = {}
    for d in answer.deleted:
        # Deleting a delete marker by VersionId: some stores (SeaweedFS) answer with
        # DeleteMarkerVersionId only.
        done[(d["Key"], (d.get("VersionId") or d.get("DeleteMarkerVersionId")) if by_version else None)] = d
    errors = {(e["Key"], e.get("VersionId") if by_version else None): e for e in answer.errors}
    records = []
    for r in rows:
        ident = (r.key, (r.version_id or "null") if r.how == "version" else None)
        ok, err = done.get(ident), errors.get(ident)
        if ok is not None:
            outcome = "delete-marker" if (r.how == "marker" or (ok.get("DeleteMarker") and r.how != "version")) else "deleted"
            marker = ok.get("DeleteMarkerVersionId") if outcome == "delete-marker" else None
            response, code = ok, None
            result.deleted += 1
            result.deleted_bytes += r.size if outcome == "deleted" else 0
            result.markers += outcome == "delete-marker"
        else:
            outcome, marker = "failed", None
            response = err or {"Key": r.key, "Code": "NoAnswer", "Message": "not in the DeleteObjects response"}
            code = str(response.get("Code"))
            result.failed.append((r.key, r.version_id, f"{code}: {response.get('Message', '')}"))
        records.append((result.run_id, batch, r.key, r.version_id if r.how == "version" else None, r.etag,
                        r.size, r.sha256, json.dumps(r.kept_at), outcome, marker, code,
                        json.dumps(response, sort_keys=True, default=str), answer.request_id, stamp))
    digest = hashlib.sha256(json.dumps(records, default=str).encode()).hexdigest()
    with state.transaction() as tx:
        tx.executemany(
            "INSERT INTO deletions(run_id, batch, key, version_id, etag, size, sha256, kept_at, outcome, "
            "marker_version_id, error_code, response, request_id, deleted_at) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", records)
        state.log("decommission.batch", tx, run=result.run_id, batch=batch, request_id=answer.request_id,
                  objects=len(rows), deleted=sum(1 for x in records if x[8] != "failed"),
                  failed=sum(1 for x in records if x[8] == "failed"), rows_sha256=digest)


def _confirm(state: State, source: Source, result: Execution, versioned: bool) -> None:
    """List the bucket again: every deletion must show (gone, or hidden by a marker)."""
    listed = list(list_all(source, versioned))
    current = {(v.key, v.etag) for v in listed if not v.delete_marker}
    versions = {(v.key, v.version_id) for v in listed}
    latest_marker = {v.key for v in listed if v.delete_marker and v.is_latest}
    rows = state.query("SELECT id, key, version_id, etag, outcome FROM deletions WHERE run_id = ? "
                       "AND outcome != 'failed'", (result.run_id,))
    confirmed, stamp = [], now()
    for r in rows:
        if r["outcome"] == "delete-marker":
            ok = r["key"] in latest_marker
        elif r["version_id"] is not None:
            ok = (r["key"], r["version_id"]) not in versions
        else:
            ok = (r["key"], r["etag"]) not in current
        if ok:
            confirmed.append((stamp, r["id"]))
        else:
            result.unconfirmed.append(r["key"])
    with state.transaction() as tx:
        tx.executemany("UPDATE deletions SET confirmed_at = ? WHERE id = ?", confirmed)
        state.log("decommission.confirmed", tx, run=result.run_id, confirmed=len(confirmed),
                  unconfirmed=len(result.unconfirmed))
    result.confirmed = len(confirmed)


def summary_text(p: Plan) -> list[str]:
    """Lines for the CLI and the playbook runner."""
    from .units import format_bytes

    s = p.summary()
    lines = [f"Decommission of {p.source} (versioning: {p.versioning}"
             + (", --all-versions" if p.all_versions else "") + ")",
             f"  verified at every destination ({', '.join(p.destinations)}):",
             f"    to delete   {s['to_delete']:>10}   {format_bytes(s['to_delete_bytes'])}"]
    if s["delete_markers_to_place"]:
        lines.append(f"    of which {s['delete_markers_to_place']} get a delete marker only: their data stays in "
                     "the bucket as noncurrent versions (still billed); --all-versions deletes it")
    lines.append(f"  kept in the bucket {s['kept']:>8}   {format_bytes(s['kept_bytes'])}")
    for reason, c in s["kept_by_reason"].items():
        lines.append(f"    {reason:<32} {c['objects']:>8}   {format_bytes(c['bytes'])}")
    for r in [r for r in p.kept if not r.delete_marker][:10]:
        lines.append(f"    {r.key!r}" + (f" v{r.version_id}" if r.version_id else "") + f": {r.reason}")
    if s["kept"]:
        lines.append("  The free-exit programs (AWS, Azure, Google) require all data to leave: "
                     "what is kept must be migrated (or knowingly abandoned) first.")
    return lines


def manifest_rows(path: str | os.PathLike[str]) -> list[dict[str, str]]:
    with open(path, newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))

