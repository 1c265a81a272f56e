"""Key paths hashed per segment, for audits of archives whose keys embed patient names.

`audit --redact-keys` writes each key (and each archive path, conflict key and reason that
quotes one) with every `/`-separated segment replaced by `k-` and 16 hex digits of
HMAC-SHA-256(`meta.redact_key`, segment). Per segment, so the folder structure still shows
(all objects of one folder share its hash) and two audits of one migration agree; keyed, so the
manifest alone cannot be reversed by hashing a list of names. The key is random per state DB
(schema 7) and stays in it: whoever has the DB can recompute the mapping, and that DB holds the
keys in clear anyway. Archive paths keep the segments that are not names: the side areas
(`_non-dicom`, `_quarantine/...`) and DICOM UIDs (digits and dots, with a dot).
"""

from __future__ import annotations

import hashlib
import hmac
import re
import sqlite3
from collections.abc import Callable
from typing import Any

_UID = re.compile(r"^[0-9]+(\.[0-9]+)+(\.dcm)?$")
_KEPT = frozenset({"_non-dicom", "_quarantine", "unreadable", "conflicts", "mismatch", "collisions",
                   "case-collisions", "archive-conflicts", "unknown-study", "unknown-series"})


class Redactor:
    def __init__(self, secret: str) -> None:
        self._key = secret.encode()

    def segment(self, text: str) -> str:
        digest = hmac.new(self._key, text.encode("utf-8", "surrogatepass"), hashlib.sha256)
        return "k-" + digest.hexdigest()[:16]

    def key(self, key: str | None) -> str | None:
        """Every segment of a key hashed (a digits-only segment may be a Patient ID)."""
        if key is None:
            return None
        return "/".join(self.segment(s) if s else s for s in key.split("/"))

    def path(self, path: str | None) -> str | None:
        """An archive path: its side-area and UID segments kept, the rest hashed."""
        if path is None:
            return None
        return "/".join(s if (s in _KEPT or _UID.match(s) or not s) else self.segment(s)
                        for s in path.split("/"))

    def text(self, text: str | None, key: str | None, path: str | None) -> str | None:
        """Free text (a reason) with the key and the path it may quote redacted."""
        if text is None:
            return None
        if key:
            text = text.replace(key, self.key(key) or "")
        if path:
            text = text.replace(path, self.path(path) or "")
        return text

    def register(self, conn: sqlite3.Connection) -> None:
        """SQL functions redact_key(k), redact_path(p), redact_text(t, a, b) on `conn`."""
        functions: list[tuple[str, int, Callable[..., str | None]]] = [
            ("redact_key", 1, self.key), ("redact_path", 1, self.path), ("redact_text", 3, self.text)]
        for name, n, fn in functions:
            conn.create_function(name, n, fn, deterministic=True)

    def exceptions(self, exceptions: dict[str, Any]) -> None:
        """The audit's exception lists (audit.json, audit.html) redacted in place."""
        for category in exceptions.values():
            for item in category.get("items", []) if isinstance(category, dict) else []:
                key, path, other = item.get("key"), item.get("path"), item.get("conflict_with")
                item["reason"] = self.text(self.text(item.get("reason"), key, path), other, None)
                item["key"], item["conflict_with"] = self.key(key), self.key(other)
                if "path" in item:
                    item["path"] = self.path(path)
