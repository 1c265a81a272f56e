"""The patient key: the secret behind `patient_hash`, kept apart from the state DB.

`patient_hash` is an HMAC of the Patient ID. Patient IDs are short (often six to ten digits),
so whoever holds the key can hash every possible ID and read them back. The state DB is the
file people copy, attach to tickets and send to vendors, so the key never goes into it: it
lives in a file of its own, created 0600 beside the DB (`<db>.key`), or wherever
CLOUDEXIT_KEY_FILE says. The DB keeps only a check value (an HMAC of a constant under the key)
that tells this migration's key file from another one and reveals nothing about the key.

Without the key, patients cannot be matched across rounds: the hash of a newly read header is
then recorded as NULL (unmatched), never computed with a new key that would not match the old
hashes.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
from dataclasses import dataclass
from pathlib import Path

from cloudexit.core.errors import StateError

ENV = "CLOUDEXIT_KEY_FILE"
_CHECK = b"cloudexit patient key check"


@dataclass
class PatientKey:
    """The key of one state DB, or why it is not available."""

    path: Path
    key: str | None = None
    problem: str | None = None  # why `key` is None, for the user

    def warning(self) -> str | None:
        if self.key is not None:
            return None
        return (f"patient identity cannot be matched across inventory rounds: {self.problem}. "
                f"Patients read from now on are recorded unmatched (no patient hash); restore "
                f"{self.path} (or point {ENV} at it) to match them again")


def key_path(db_path: str | os.PathLike[str]) -> Path:
    """Where the key of this DB is: CLOUDEXIT_KEY_FILE, else `<db>.key` beside it."""
    env = os.environ.get(ENV)
    return Path(env) if env else Path(f"{os.fspath(db_path)}.key")


def check_value(key: str) -> str:
    return hmac.new(key.encode(), _CHECK, hashlib.sha256).hexdigest()[:32]


def read(path: Path, check: str | None) -> PatientKey:
    """The key in `path` if it is the one `check` was made with."""
    try:
        key = path.read_text(encoding="ascii").strip()
    except FileNotFoundError:
        return PatientKey(path, problem=f"the key file {path} is missing")
    except (OSError, UnicodeDecodeError) as exc:
        return PatientKey(path, problem=f"the key file {path} cannot be read ({exc})")
    if not key or (check is not None and not hmac.compare_digest(check_value(key), check)):
        return PatientKey(path, problem=f"the key file {path} is not this migration's key")
    return PatientKey(path, key)


def write(path: Path, key: str) -> None:
    """Create the key file 0600 (in a 0700 folder when we create it); never replace one."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
    except FileExistsError:
        raise StateError(f"the patient key file {path} already exists and holds another key",
                         hint=f"move it away, or set {ENV} to this migration's key file") from None
    except OSError as exc:
        raise StateError(f"cannot create the patient key file {path}: {exc.strerror}",
                         hint=f"make the folder writable, or set {ENV} to a writable place") from exc
    with os.fdopen(fd, "w", encoding="ascii") as fh:
        fh.write(key + "\n")
        fh.flush()
        os.fsync(fh.fileno())


def adopt_or_create(path: Path) -> str:
    """The key for a new DB: the one already at `path` (several DBs may share one key file on
    purpose, to match patients across them), else a new random one written there."""
    found = read(path, None)
    if found.key is not None:
        return found.key
    if path.exists():
        raise StateError(f"the patient key file {path} cannot be used: {found.problem}",
                         hint=f"move it away, or set {ENV} to another file")
    key = secrets.token_hex(16)
    write(path, key)
    return key


def move_out(path: Path, salt: str) -> None:
    """Old DBs kept the key in `meta.salt`: put it in the key file (the same key, so the
    hashes already recorded keep matching)."""
    found = read(path, check_value(salt))
    if found.key is not None:
        return  # moved by an earlier run that died before it dropped the salt
    if path.exists():
        raise StateError(f"cannot move this migration's patient key to {path}: that file holds "
                         "another key", hint=f"move it away, or set {ENV} to another file")
    write(path, salt)
