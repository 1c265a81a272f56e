"""Coordinator and workers must run the same cloudexit: tasks, results and messages travel
between them as pickles of its classes, so a worker on other code fails every batch it gets
(and a failed batch is run again, for ever). Each admission check compares this fingerprint."""

from __future__ import annotations

import functools
import hashlib
from pathlib import Path

import cloudexit


@functools.lru_cache(maxsize=1)
def code_fingerprint() -> str:
    """The version and a digest of every module of the package, e.g. "0.1.0/3f2a9c1d04b7"
    (same release, same fingerprint; a patched or other checkout differs)."""
    root = Path(cloudexit.__file__).resolve().parent
    digest = hashlib.sha256()
    for path in sorted(root.rglob("*.py")):
        digest.update(path.relative_to(root).as_posix().encode())
        digest.update(b"\0")
        digest.update(path.read_bytes())
    return f"{cloudexit.__version__}/{digest.hexdigest()[:12]}"


def other_code(coordinator: str) -> str | None:
    """Why this worker cannot take part when its code is not the coordinator's; None if it is."""
    mine = code_fingerprint()
    if mine == coordinator:
        return None
    return (f"it runs other cloudexit code ({mine}) than this machine ({coordinator}): install the "
            "same cloudexit version on every worker and restart them")
