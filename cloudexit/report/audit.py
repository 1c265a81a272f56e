"""The migration audit: what was moved, that it is complete and intact, what went wrong, what
it cost; and proof that nobody edited the record afterwards.

`audit_facts(state)` (report/facts.py) holds every query: each figure in the report comes from
the state DB through it. `write_audit()` (here) writes
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

`verify_audit(dir)` (report/audit_check.py) recomputes all of that and says exactly which file was altered, added or
removed, and whether the exported event chain is intact. The audit also appends an
`audit.written` event (fingerprint and SHA256SUMS digest) to the DB's own chain.
"""

from __future__ import annotations

import hashlib
import json
import os
import sqlite3
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cloudexit.core.files import make_private_dirs, open_private
from cloudexit.report.audit_check import FINGERPRINTED, OUTPUTS, AuditError, fingerprint_of, verify_audit
from cloudexit.report.facts import audit_facts, current_user
from cloudexit.report.groups import Groups, Rule, groups_of_walk
from cloudexit.report.manifest import MANIFEST_COLUMNS, PHI_COLUMNS, manifest_lines
from cloudexit.report.redact import Redactor
from cloudexit.report.sign import SIGNATURE  # beside SHA256SUMS, which it signs (so not listed in it)
from cloudexit.state.db import State, open_readable

__all__ = ["FINGERPRINTED", "OUTPUTS", "AuditError", "AuditResult", "audit_facts", "current_user", "fingerprint_of",
           "open_state", "prepare_out", "verify_audit", "write_audit"]

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
        facts = audit_facts(state, include_phi=include_phi, passes=passes, rule=rule)
        from cloudexit.report.linkreport import digest_html  # link evidence: one page, same snapshot
        link_digest = digest_html(state.conn, lang)
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
    fh.write(render_html(facts, lang, fingerprint, link_digest))
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


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)

