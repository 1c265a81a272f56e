"""`cloudexit audit --verify`: recompute an audit folder and say exactly which file was
altered, added or removed, and whether the exported event chain is intact."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

from cloudexit.core.errors import CloudexitError
from cloudexit.report.sign import SIGNATURE
from cloudexit.state.db import GENESIS_HASH, event_hash, open_readable

OUTPUTS = ("audit.html", "audit.json", "manifest.csv", "events.jsonl", "SHA256SUMS")
FINGERPRINTED = ("manifest.csv", "events.jsonl", "audit.json")  # what the fingerprint covers


class AuditError(CloudexitError):
    """The audit cannot be written (no migration, output folder in use)."""


def fingerprint_of(digests: dict[str, str]) -> str:
    text = "".join(f"{digests[n]}  {n}\n" for n in FINGERPRINTED)
    return hashlib.sha256(text.encode()).hexdigest()


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def verify_audit(folder: str | os.PathLike[str], db_path: str | os.PathLike[str] | None = None,
                 signer: str | os.PathLike[str] | None = None) -> dict[str, Any]:
    """Recompute an audit folder: files against SHA256SUMS, the exported event chain, the
    fingerprint in audit.html, (with `db_path`) the exported events against the DB's log, and
    (with `signer`, a public key or allowed_signers file) the signature of SHA256SUMS.

    Returns {"ok": bool, "problems": [text, ...], ...}; `problems` names each altered, added or
    removed file and each break in the chain.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise AuditError(f"{folder} is not a folder")
    problems: list[str] = []
    sums_path = folder / "SHA256SUMS"
    listed: dict[str, str] = {}
    if not sums_path.exists():
        problems.append("SHA256SUMS: removed (cannot check the other files without it)")
    else:
        for line in sums_path.read_text(encoding="utf-8", errors="replace").splitlines():
            digest, sep, name = line.partition("  ")
            if sep and len(digest) == 64:
                listed[name] = digest
            elif line.strip():
                problems.append(f"SHA256SUMS: altered (unreadable line {line[:60]!r})")
        for name in OUTPUTS:
            if name != "SHA256SUMS" and name not in listed:
                problems.append(f"SHA256SUMS: altered ({name} is not listed)")
    actual: dict[str, str] = {}
    for name, digest in listed.items():
        path = folder / name
        if not path.is_file():
            problems.append(f"{name}: removed (listed in SHA256SUMS)")
            continue
        actual[name] = _sha256_file(path)
        if actual[name] != digest:
            problems.append(f"{name}: altered (SHA-256 differs from SHA256SUMS)")
    for name in sorted(os.listdir(folder)):
        if name not in ("SHA256SUMS", SIGNATURE) and name not in listed:
            problems.append(f"{name}: added (not in SHA256SUMS)")
    chain = _check_export_chain(folder / "events.jsonl")
    problems += [f"events.jsonl: {p}" for p in chain["problems"]]
    facts: dict[str, Any] = {}
    try:
        facts = json.loads((folder / "audit.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        if (folder / "audit.json").exists():
            problems.append("audit.json: not readable JSON")
    if facts and chain["events"] and facts.get("event_chain", {}).get("head_hash") != chain["head"]:
        problems.append("events.jsonl: its last hash differs from the chain head recorded in audit.json")
    fingerprint = None
    altered = {n for n, d in listed.items() if n in actual and actual[n] != d}
    if all(n in actual for n in FINGERPRINTED) and not altered & {*FINGERPRINTED, "audit.html"}:
        # SHA256SUMS agrees with the files, yet a forger may have rewritten it: the fingerprint
        # printed in audit.html (and on the signed paper) still names the original data files.
        fingerprint = fingerprint_of({n: actual[n] for n in FINGERPRINTED})
        shown = _html_fingerprint(folder / "audit.html")
        if shown is not None and shown != fingerprint:
            problems.append("audit.html: its fingerprint does not match manifest.csv, events.jsonl and "
                            "audit.json (one of them was replaced)")
    db_check = None
    if db_path is not None:
        db_check = _check_against_db(folder, Path(db_path), chain, listed)
        problems += db_check["problems"]
    from cloudexit.report.sign import check as check_signature

    signature = check_signature(folder, signer, (facts.get("signature") or {}).get("fingerprint"))
    problems += signature["problems"]
    return {"ok": not problems, "folder": str(folder), "problems": problems, "files": sorted(actual),
            "chain": chain, "fingerprint": fingerprint,
            "verdict": (facts.get("verdict") or {}).get("status"), "db": db_check, "signature": signature}


def _check_export_chain(path: Path) -> dict[str, Any]:
    problems: list[str] = []
    prev, count, head = GENESIS_HASH, 0, GENESIS_HASH
    if not path.exists():
        return {"events": 0, "head": None, "intact": False, "problems": []}
    with open(path, encoding="utf-8", errors="replace") as fh:
        for n, line in enumerate(fh, 1):
            try:
                ev = json.loads(line)
                ident, at, kind, detail = ev["id"], ev["at"], ev["kind"], ev["detail"]
                stored_prev, stored = ev["prev_hash"], ev["hash"]
            except (ValueError, KeyError, TypeError):
                problems.append(f"line {n}: not an event")
                continue
            if stored_prev != prev:
                problems.append(f"event {ident}: does not follow the event before it "
                                "(an event was removed or inserted)")
            if event_hash(stored_prev, at, kind, detail) != stored:
                problems.append(f"event {ident} ({kind}): content altered")
            prev = head = stored
            count += 1
    return {"events": count, "head": head, "intact": not problems, "problems": problems}


def _html_fingerprint(path: Path) -> str | None:
    import re

    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return None
    match = re.search(r'data-fingerprint="([0-9a-f]{64})"', text)
    return match.group(1) if match else ""


def _check_against_db(folder: Path, db_path: Path, chain: dict[str, Any], listed: dict[str, str]) -> dict[str, Any]:
    """The exported events are the DB's own (same hashes at the same ids), and the DB's chain
    records this audit (an `audit.written` event naming this SHA256SUMS)."""
    problems: list[str] = []
    with open_readable(db_path, untouched=True) as state:  # the evidence is checked, never migrated
        db_problems = state.verify_event_chain()
        problems += [f"state DB event log: {p}" for p in db_problems[:20]]
        stored = {r["id"]: r["hash"] for r in state.query("SELECT id, hash FROM events")}
        written = [json.loads(r["detail"] or "{}") for r in state.query(
            "SELECT detail FROM events WHERE kind = 'audit.written'")]
    path = folder / "events.jsonl"
    if path.exists():
        with open(path, encoding="utf-8", errors="replace") as fh:
            for line in fh:
                try:
                    ev = json.loads(line)
                except ValueError:
                    continue
                if stored.get(ev.get("id")) != ev.get("hash"):
                    problems.append(f"events.jsonl: event {ev.get('id')} is not the state DB's event "
                                    f"{ev.get('id')}")
                    break
    sums = folder / "SHA256SUMS"
    digest = _sha256_file(sums) if sums.exists() else None
    recorded = any(w.get("sha256sums") == digest for w in written)
    if digest and not recorded:
        problems.append("SHA256SUMS: the state DB has no audit.written event with this digest "
                        "(the audit was not written from this DB, or was rewritten)")
    return {"path": str(db_path), "problems": problems, "recorded": recorded}
