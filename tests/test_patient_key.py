"""The patient key lives outside the state DB: the DB alone reveals no Patient ID.

Synthetic Patient IDs are P + six digits, like many hospitals' IDs: a brute force over the
whole space (10^6 HMACs, about a second) is the attack a copied state DB invites.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import sqlite3
from pathlib import Path

import pytest
from dbutil import rows as _rows
from test_inventory import tiny_pacs  # noqa: F401 - fixture

from cloudexit.testing import synthetic
from cloudexit.dicom.header import patient_hash
from cloudexit.testing.s3server import SeaweedServer
from cloudexit.state.db import State

_IDS: list[bytes] = []


def _brute_force(key: str, hashes: set[str]) -> set[str]:
    """Every ID of the form P000000..P999999 whose hash under `key` is one of `hashes`
    (HMAC-SHA-256 by its definition, with the padded key's two states computed once)."""
    if not _IDS:
        _IDS.extend(f"P{n:06d}".encode() for n in range(10**6))
    wanted = {bytes.fromhex(h) for h in hashes}
    k = key.encode()
    k = hashlib.sha256(k).digest() if len(k) > 64 else k.ljust(64, b"\0")
    inner = hashlib.sha256(bytes(b ^ 0x36 for b in k))
    outer = hashlib.sha256(bytes(b ^ 0x5C for b in k))
    found = set()
    for pid in _IDS:
        i = inner.copy()
        i.update(pid)
        o = outer.copy()
        o.update(i.digest())
        if o.digest()[:10] in wanted:
            found.add(pid.decode())
    return found


def _db_bytes(db: Path) -> bytes:
    return b"".join(p.read_bytes() for p in (db, Path(f"{db}-wal"), Path(f"{db}-shm")) if p.exists())


def _hashes(db: Path) -> set[str]:
    return {r[0] for r in _rows(db, "SELECT DISTINCT patient_hash FROM objects WHERE patient_hash IS NOT NULL")}


def _meta(db: Path) -> dict[str, str]:
    return {r["key"]: r["value"] for r in _rows(db, "SELECT key, value FROM meta")}


def _patients(truth: list[synthetic.SyntheticObject]) -> set[str]:
    return {o.patient_id for o in truth if o.kind == "dicom" and o.patient_id}


def _to_old_format(db: Path) -> str:
    """What cloudexit wrote before the key moved out: the key as `meta.salt`, no key file."""
    key_file = Path(f"{db}.key")
    key = key_file.read_text().strip()
    key_file.unlink()
    conn = sqlite3.connect(db)
    conn.execute("DELETE FROM meta WHERE key = 'patient_key_check'")
    conn.execute("INSERT INTO meta(key, value) VALUES ('salt', ?)", (key,))
    conn.commit()
    conn.close()
    return key


@pytest.mark.slow
def test_state_db_alone_does_not_reveal_patient_ids(cli, tiny_pacs, db: Path, tmp_path: Path) -> None:  # noqa: F811
    """About 20 s: eight brute forces over the six-digit ID space."""
    bucket, truth = tiny_pacs
    patients = _patients(truth)
    assert cli("inventory", f"s3://{bucket}", "--db", str(db)).exit_code == 0
    key_file = Path(f"{db}.key")
    assert key_file.stat().st_mode & 0o777 == 0o600
    key = key_file.read_text().strip()
    hashes = _hashes(db)
    assert len(patients) == 3 and hashes == {patient_hash(key, p) for p in patients}

    # The key is nowhere in the DB's files, and no value the DB holds works as the key.
    assert key.encode() not in _db_bytes(db) and bytes.fromhex(key) not in _db_bytes(db)
    for value in _meta(db).values():
        assert _brute_force(value or "", hashes) == set()

    # The DB of cloudexit before this change (the key as meta.salt) gave every ID back.
    old = tmp_path / "old" / "cloudexit.db"
    old.parent.mkdir()
    shutil.copy(db, old)
    shutil.copy(key_file, f"{old}.key")
    salt = _to_old_format(old)
    assert _brute_force(_meta(old)["salt"], hashes) == patients

    # Opening it moves the key out: the same key (the recorded hashes keep matching), 0600.
    result = cli("status", "--db", str(old), "--json")
    assert result.exit_code == 0, result.output
    assert '"patients": 3' in result.output
    assert Path(f"{old}.key").read_text().strip() == salt
    assert Path(f"{old}.key").stat().st_mode & 0o777 == 0o600
    meta = _meta(old)
    assert "salt" not in meta
    assert salt.encode() not in _db_bytes(old)  # not left in free space or the WAL either
    assert _brute_force(meta["patient_key_check"], hashes) == set()
    assert [r["kind"] for r in _rows(old, "SELECT kind FROM events WHERE kind LIKE 'patient_key.%'")] == [
        "patient_key.moved_out"]
    # A new round recognises the same patients.
    assert cli("inventory", f"s3://{bucket}", "--db", str(old)).exit_code == 0
    assert _hashes(old) == hashes


def test_missing_key_file_records_patients_unmatched(cli, tiny_pacs, db: Path, s3: SeaweedServer,  # noqa: F811
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    bucket, truth = tiny_pacs
    assert cli("inventory", f"s3://{bucket}", "--db", str(db)).exit_code == 0
    hashes = _hashes(db)
    key_file = Path(f"{db}.key")
    moved = key_file.with_name("elsewhere.key")
    shutil.move(key_file, moved)

    result = cli("status", "--db", str(db))
    assert result.exit_code == 0
    assert "patient identity cannot be matched across inventory rounds" in result.output
    assert f"{key_file} is missing" in result.output

    # A changed DICOM object is read again: its patient is recorded unmatched, never hashed
    # with a new key (which would make the same patient look like another one).
    changed = next(o for o in truth if o.kind == "dicom" and o.case == "normal")
    body = bytearray(changed.body())
    body[-1] ^= 0xFF
    s3.client().put_object(Bucket=bucket, Key=changed.key, Body=bytes(body))
    result = cli("inventory", f"s3://{bucket}", "--db", str(db))
    assert result.exit_code == 0, result.output
    assert "cannot be matched" in result.output
    assert not key_file.exists()
    row = _rows(db, "SELECT patient_hash, change FROM objects WHERE key = ?", (changed.key,))[0]
    assert row["change"] == "changed" and row["patient_hash"] is None
    assert _hashes(db) <= hashes
    assert _rows(db, "SELECT count(*) FROM events WHERE kind = 'patient_key.missing'")[0][0] == 1

    # Pointed at the key file elsewhere, it matches again.
    monkeypatch.setenv("CLOUDEXIT_KEY_FILE", str(moved))
    with State(db) as state:
        assert state.patient_key().key == moved.read_text().strip()
    # Another DB's key is not taken for this one's.
    other = db.with_name("other.db")
    monkeypatch.setenv("CLOUDEXIT_KEY_FILE", str(other) + ".key")
    State(other, create=True).close()
    with State(db) as state:
        assert state.patient_key().key is None
        assert "not this migration's key" in (state.patient_key().problem or "")
    assert os.path.exists(str(other) + ".key")
