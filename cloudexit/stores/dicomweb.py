"""Deliver into a PACS over DICOMweb: STOW-RS in multipart/related batches, plus the QIDO-RS
and WADO-RS that `cloudexit verify` uses to ask the PACS what it holds.

`--to dicomweb+https://HOST/PATH` (or `dicomweb+http://`): PATH is the DICOMweb root
(Orthanc: `/dicom-web`); instances are POSTed to `PATH/studies`.

Credentials never come from the URL (it is logged and recorded in the state DB); first found:
* `CLOUDEXIT_DICOMWEB_TOKEN`: `Authorization: Bearer TOKEN`;
* `CLOUDEXIT_DICOMWEB_USER` and `CLOUDEXIT_DICOMWEB_PASSWORD`: HTTP basic;
* `CLOUDEXIT_DICOMWEB_AUTH_FILE`: a file whose first line is `Bearer TOKEN` or `USER:PASSWORD`.
`CLOUDEXIT_DICOMWEB_CA_BUNDLE` names a PEM file of CAs for a hospital's own TLS certificates.

Batching: `deliver()` is called per object from `parallel` threads. Callers queue their object;
the caller that fills a batch (`batch_size` objects or `batch_bytes`), or whose wait of `linger`
seconds runs out first, sends the queued objects in one STOW-RS request and hands every waiting
caller its own `Delivery`. `deliver_many(pairs)` sends a list directly (one request per batch).
Two objects with the same SOP Instance UID never share a request: the response names instances by
SOP Instance UID only.

Results per instance come from the response (DICOM JSON): ReferencedSOPSequence -> stored, or
warning with WarningReason; FailedSOPSequence -> failed with FailureReason (e.g. 0xA700, 0x0122);
an instance named in neither -> failed ("not acknowledged"). Server down, 5xx or a dropped
connection: retried, then `StoreUnavailable` (re-sending instances is harmless: the PACS keeps one
per SOP Instance UID). 401/403: `StoreError`. Duplicate SOP Instance UIDs are checked as in
`cloudexit.stores.cstore`, by fetching the PACS's copy back (WADO-RS) and comparing dataset hashes.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import threading
import time
import uuid
from collections.abc import Collection, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar
from urllib.parse import quote, urlsplit, urlunsplit

import urllib3

from cloudexit.core.config import PacsConfig
from cloudexit.core.errors import UsageError
from cloudexit.stores import Delivery, Item, StoreError, StoreUnavailable
from cloudexit.stores.dicomfile import dataset_sha256, file_layout, meta_prefix, split_part10

ENV_TOKEN = "CLOUDEXIT_DICOMWEB_TOKEN"
ENV_USER = "CLOUDEXIT_DICOMWEB_USER"
ENV_PASSWORD = "CLOUDEXIT_DICOMWEB_PASSWORD"
ENV_AUTH_FILE = "CLOUDEXIT_DICOMWEB_AUTH_FILE"
ENV_CA_BUNDLE = "CLOUDEXIT_DICOMWEB_CA_BUNDLE"

DICOM_JSON = "application/dicom+json"
# DICOM JSON tags of the STOW-RS response (PS3.18 Table 10.5.3-1).
REFERENCED, FAILED = "00081199", "00081198"
SOP_CLASS, SOP_INSTANCE = "00081150", "00081155"
FAILURE_REASON, WARNING_REASON = "00081197", "00081196"


def open_store(url: str, duplicates: Collection[str] | None = None, parallel: int | None = None,
               batch_size: int | None = None, timeouts: PacsConfig | None = None) -> "DicomwebStore":
    """The store for `dicomweb+http(s)://HOST[:PORT]/PATH`."""
    parts = urlsplit(url)
    if parts.scheme not in ("dicomweb+http", "dicomweb+https") or not parts.hostname:
        raise UsageError(f"--to {_safe(url)}: expected dicomweb+https://HOST/PATH")
    if parts.username or parts.password:
        raise UsageError("--to: credentials in the URL would end up in logs and in the state DB",
                         hint=f"remove them and set {ENV_USER}/{ENV_PASSWORD}, {ENV_TOKEN} "
                              f"or {ENV_AUTH_FILE}")
    base = urlunsplit((parts.scheme[len("dicomweb+"):], parts.netloc, parts.path.rstrip("/"), "", ""))
    return DicomwebStore(base, auth_headers(), parallel=parallel or 16, batch_size=batch_size or 8,
                         duplicates=duplicates, ca_certs=os.environ.get(ENV_CA_BUNDLE) or None,
                         timeouts=timeouts)


def _safe(url: str) -> str:
    """A URL without its user-info part, for messages."""
    parts = urlsplit(url)
    netloc = parts.netloc.rsplit("@", 1)[-1]
    return urlunsplit((parts.scheme, netloc, parts.path, "", ""))


def auth_headers(env: Any = None) -> dict[str, str]:
    """The Authorization header from the environment or the auth file (none: no auth)."""
    env = os.environ if env is None else env
    if env.get(ENV_TOKEN):
        return {"Authorization": f"Bearer {env[ENV_TOKEN].strip()}"}
    if env.get(ENV_USER):
        return {"Authorization": _basic(env[ENV_USER], env.get(ENV_PASSWORD, ""))}
    path = env.get(ENV_AUTH_FILE)
    if not path:
        return {}
    try:
        with open(path, encoding="utf-8") as fh:
            line = next((ln.strip() for ln in fh if ln.strip()), "")
    except OSError as exc:
        raise UsageError(f"{ENV_AUTH_FILE}: cannot read {path} ({exc.strerror})") from exc
    if line.lower().startswith("bearer "):
        return {"Authorization": f"Bearer {line[7:].strip()}"}
    if ":" in line:
        user, password = line.split(":", 1)
        return {"Authorization": _basic(user, password)}
    raise UsageError(f"{ENV_AUTH_FILE}: {path} must hold `Bearer TOKEN` or `USER:PASSWORD` "
                     "on its first line")


def _basic(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


@dataclass
class _Pending:
    item: Item
    staged: str
    size: int
    taken: bool = False
    done: threading.Event = field(default_factory=threading.Event)
    result: Delivery | None = None
    error: BaseException | None = None


class _Body:
    """A multipart/related body streamed from the staged files (a 1 GB object is never in RAM)."""

    def __init__(self, segments: list[bytes | tuple[str, int]]) -> None:
        self.segments = segments
        self.length = sum(len(s) if isinstance(s, bytes) else s[1] for s in segments)

    def chunks(self) -> Iterator[bytes]:
        for seg in self.segments:
            if isinstance(seg, bytes):
                yield seg
                continue
            with open(seg[0], "rb") as fh:
                while chunk := fh.read(2**20):
                    yield chunk


class DicomwebStore:
    """A PACS that takes STOW-RS."""

    kind: ClassVar[str] = "dicomweb"

    def __init__(self, base: str, headers: dict[str, str] | None = None, parallel: int = 16,
                 batch_size: int = 8, batch_bytes: int = 64 * 2**20, linger: float = 0.05,
                 timeouts: PacsConfig | None = None, attempts: int = 3,
                 duplicates: Collection[str] | None = None, ca_certs: str | None = None) -> None:
        self.base = base
        self.url = "dicomweb+" + base
        self.id = self.url
        self.parallel = max(1, parallel)
        self.batch_size = max(1, batch_size)
        self.batch_bytes = batch_bytes
        self.linger = linger
        self.attempts = attempts
        self.timeouts = timeouts = timeouts or PacsConfig()
        self.duplicates = set(duplicates or ())
        self._headers = dict(headers or {})
        # Queries (QIDO-RS, WADO-RS for verify) may take long; each STOW-RS request sets a read
        # timeout by its size (`_request`), so a hung server frees its thread in seconds.
        self.http = urllib3.PoolManager(
            maxsize=self.parallel, block=False, retries=False, ca_certs=ca_certs,
            timeout=urllib3.Timeout(connect=timeouts.connect_timeout, read=timeouts.max_timeout))
        self._cond = threading.Condition()
        self._queue: list[_Pending] = []
        self._lock = threading.Lock()
        self._seen: dict[str, str] = {}  # SOP UID -> key delivered ok by this store

    def __repr__(self) -> str:  # never the Authorization header
        return f"DicomwebStore({self.url!r})"

    # -- HTTP ------------------------------------------------------------------------------------
    def _request(self, method: str, path: str, headers: dict[str, str] | None = None,
                 body: _Body | None = None) -> urllib3.BaseHTTPResponse:
        """One request, retried on connection errors and 5xx; raises for auth and outages."""
        url = self.base + path
        last = ""
        for attempt in range(1, self.attempts + 1):
            hdrs = {**self._headers, **(headers or {})}
            data: Any = None
            extra: dict[str, Any] = {}  # no timeout given: the pool's
            if body is not None:
                hdrs["Content-Length"] = str(body.length)
                data = body.chunks()
                t = self.timeouts
                extra["timeout"] = urllib3.Timeout(connect=t.connect_timeout,
                                                   read=t.answer_timeout(t.http_timeout, body.length))
            try:
                resp = self.http.request(method, url, headers=hdrs, body=data, preload_content=True,
                                         redirect=False, **extra)
            except urllib3.exceptions.HTTPError as exc:
                last = type(exc).__name__
                time.sleep(min(2.0, 0.5 * attempt))
                continue
            if resp.status in (401, 403):
                raise StoreError(f"{self.url} refused our credentials (HTTP {resp.status})",
                                 hint=f"set {ENV_USER}/{ENV_PASSWORD}, {ENV_TOKEN} or {ENV_AUTH_FILE}")
            if resp.status in (429, 502, 503, 504) or resp.status >= 500 and resp.status != 501:
                last = f"HTTP {resp.status}"
                time.sleep(min(2.0, 0.5 * attempt))
                continue
            return resp
        raise StoreUnavailable(f"{self.url} did not answer after {self.attempts} attempts ({last})")

    def expect(self, contexts: Iterable[tuple[str, str]] = (), duplicates: Iterable[str] = ()) -> None:
        """As `CStoreStore.expect`; STOW-RS needs no presentation contexts."""
        with self._lock:
            self.duplicates.update(duplicates)

    def check(self) -> None:
        """A QIDO-RS query: fails early on a wrong URL, credentials or a server that is down."""
        resp = self._request("GET", "/studies?limit=1", {"Accept": DICOM_JSON})
        if resp.status not in (200, 204):
            raise StoreError(f"{self.url} does not answer like a DICOMweb service (HTTP {resp.status})",
                             hint="give the DICOMweb root, e.g. dicomweb+https://pacs/dicom-web")

    # -- delivery --------------------------------------------------------------------------------
    def deliver(self, item: Item, staged: str) -> Delivery:
        pending = _Pending(item, staged, os.path.getsize(staged))
        batch: list[_Pending] = []
        with self._cond:
            self._queue.append(pending)
            deadline = time.monotonic() + self.linger
            while not pending.taken:
                full = (len(self._queue) >= self.batch_size
                        or sum(p.size for p in self._queue) >= self.batch_bytes)
                left = deadline - time.monotonic()
                if full or left <= 0:
                    batch, self._queue = self._queue, []
                    for p in batch:
                        p.taken = True
                    self._cond.notify_all()
                    break
                self._cond.wait(left)
        if batch:
            self._send_pending(batch)
        pending.done.wait()
        if pending.error is not None:
            raise pending.error
        assert pending.result is not None
        return pending.result

    def _send_pending(self, batch: list[_Pending]) -> None:
        try:
            results = self.deliver_many([(p.item, p.staged) for p in batch])
            for p, r in zip(batch, results):
                p.result = r
        except BaseException as exc:  # every waiting caller sees the outage, not only the sender
            for p in batch:
                p.error = exc
        finally:
            for p in batch:
                p.done.set()

    def deliver_many(self, pairs: Sequence[tuple[Item, str]]) -> list[Delivery]:
        """Deliver objects in as few STOW-RS requests as the batch limits allow."""
        results: dict[int, Delivery] = {}
        todo = []
        for i, (item, staged) in enumerate(pairs):
            if item.kind != "dicom" or not item.sop_uid:
                results[i] = Delivery("failed", code="not-dicom",
                                      detail=f"object is {item.kind}, not DICOM a PACS can take")
            else:
                todo.append(i)
        while todo:
            batch, rest, sops, size = [], [], set(), 0
            for i in todo:
                item, staged = pairs[i]
                fits = len(batch) < self.batch_size and (not batch or size + item.size <= self.batch_bytes)
                if item.sop_uid in sops or not fits:
                    rest.append(i)
                    continue
                batch.append(i)
                sops.add(item.sop_uid)
                size += item.size
            for i, d in zip(batch, self._stow([pairs[i] for i in batch])):
                results[i] = d
            todo = rest
        for i, (item, staged) in enumerate(pairs):
            if results[i].ok:
                results[i] = self._confirm(item, staged, results[i])
        return [results[i] for i in range(len(pairs))]

    def _stow(self, pairs: list[tuple[Item, str]]) -> list[Delivery]:
        boundary = uuid.uuid4().hex
        segments: list[bytes | tuple[str, int]] = []
        for item, staged in pairs:
            segments.append(f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode())
            info = file_layout(staged)
            if not info.part10:  # a raw dataset: STOW-RS takes Part 10 files only
                segments.append(meta_prefix(item.sop_class_uid or "", item.sop_uid or "",
                                            item.transfer_syntax))
            segments.append((staged, os.path.getsize(staged)))
            segments.append(b"\r\n")
        segments.append(f"--{boundary}--\r\n".encode())
        headers = {"Content-Type": f'multipart/related; type="application/dicom"; boundary={boundary}',
                   "Accept": DICOM_JSON}
        resp = self._request("POST", "/studies", headers, _Body(segments))
        if resp.status == 413 and len(pairs) > 1:
            half = len(pairs) // 2
            return self._stow(pairs[:half]) + self._stow(pairs[half:])
        if resp.status in (404, 405, 415):
            raise StoreError(f"{self.url} does not take STOW-RS at /studies (HTTP {resp.status})",
                             hint="give the DICOMweb root, e.g. dicomweb+https://pacs/dicom-web")
        outcome = parse_stow_response(resp.data)
        results = []
        for item, _ in pairs:
            found = outcome.get(item.sop_uid or "")
            if found is None:
                found = Delivery("failed", location=item.sop_uid, code=f"HTTP {resp.status}",
                                 detail="the server did not acknowledge this instance")
            results.append(found)
        return results

    def _confirm(self, item: Item, staged: str, delivery: Delivery) -> Delivery:
        """For a shared SOP Instance UID, check the PACS holds *our* content (WADO-RS)."""
        sop = item.sop_uid or ""
        with self._lock:
            seen = self._seen.setdefault(sop, item.key)
        if sop not in self.duplicates and seen == item.key:
            return delivery
        try:
            theirs = hashlib.sha256(self.fetch(item.study_uid or "", item.series_uid or "", sop)[1]).hexdigest()
        except StoreError as exc:
            return Delivery("conflict", location=sop, code=delivery.code,
                            detail="duplicate SOP Instance UID: the PACS answered success but its copy "
                                   f"could not be fetched back to compare ({exc})")
        ours = dataset_sha256(staged)
        if theirs != ours:
            return Delivery("conflict", location=sop, code=delivery.code,
                            detail="the PACS already holds different content under this SOP Instance UID "
                                   "and kept it (it answered success)",
                            extra={"pacs_dataset_sha256": theirs, "our_dataset_sha256": ours})
        delivery.extra["confirmed"] = "dataset SHA-256 fetched back with WADO-RS"
        return delivery

    def close(self) -> None:
        self.http.clear()

    # -- queries for verify (QIDO-RS, WADO-RS) ---------------------------------------------------
    def _qido(self, path: str) -> list[dict[str, Any]]:
        resp = self._request("GET", path, {"Accept": DICOM_JSON})
        if resp.status == 204 or not resp.data.strip():
            return []
        if resp.status != 200:
            raise StoreError(f"QIDO-RS {path.split('?')[0]} failed: HTTP {resp.status}")
        return list(json.loads(resp.data))

    def count_studies(self, study_uids: list[str]) -> dict[str, int]:
        counts: dict[str, int] = {}
        for uid in study_uids:
            for ds in self._qido(f"/studies?StudyInstanceUID={quote(uid)}&includefield=00201208"):
                counts[_value(ds, "0020000D") or uid] = int(_value(ds, "00201208") or 0)
        return counts

    def count_series(self, study_uid: str) -> dict[str, int]:
        return {str(_value(ds, "0020000E")): int(_value(ds, "00201209") or 0)
                for ds in self._qido(f"/studies/{quote(study_uid)}/series?includefield=00201209")}

    def list_instances(self, study_uid: str, series_uid: str) -> set[str]:
        return {str(_value(ds, "00080018"))
                for ds in self._qido(f"/studies/{quote(study_uid)}/series/{quote(series_uid)}/instances")}

    def fetch(self, study_uid: str, series_uid: str, sop_uid: str, sop_class_uid: str | None = None,
              transfer_syntax: str | None = None) -> tuple[str, bytes]:
        """WADO-RS one instance as stored (transfer-syntax=*): (transfer syntax, dataset bytes)."""
        path = f"/studies/{quote(study_uid)}/series/{quote(series_uid)}/instances/{quote(sop_uid)}"
        accept = 'multipart/related; type="application/dicom"; transfer-syntax=*'
        resp = self._request("GET", path, {"Accept": accept})
        if resp.status != 200:
            raise StoreError(f"WADO-RS returned HTTP {resp.status}")
        part = first_part(resp.data, resp.headers.get("Content-Type", ""))
        ts, data = split_part10(part)
        if ts is None:
            raise StoreError("WADO-RS returned something that is not a DICOM file")
        return ts, data


def _value(ds: dict[str, Any], tag: str) -> Any:
    values = ds.get(tag, {}).get("Value") or [None]
    return values[0]


def parse_stow_response(data: bytes) -> dict[str, Delivery]:
    """Per SOP Instance UID, what a STOW-RS response says happened."""
    try:
        doc = json.loads(data) if data.strip() else {}
    except ValueError:
        return {}
    if isinstance(doc, list):
        doc = doc[0] if doc else {}
    out: dict[str, Delivery] = {}
    for entry in doc.get(REFERENCED, {}).get("Value") or []:
        sop = _value(entry, SOP_INSTANCE)
        warning = _value(entry, WARNING_REASON)
        if warning is not None:
            code = int(warning)
            out[sop] = Delivery("warning", location=sop, code=f"0x{code:04X}", detail=_meaning(code))
        else:
            out[sop] = Delivery("stored", location=sop, code="0x0000")
    for entry in doc.get(FAILED, {}).get("Value") or []:
        sop = _value(entry, SOP_INSTANCE)
        reason = _value(entry, FAILURE_REASON)
        code = int(reason) if reason is not None else None
        out[sop] = Delivery("failed", location=sop, code=f"0x{code:04X}" if code is not None else None,
                            detail=_meaning(code) if code is not None else "failed, no reason given")
    return out


# Reasons a STOW-RS response gives (PS3.18 10.5.3, PS3.4 Annex B): no pynetdicom needed here.
_REASONS = {0x0110: "Processing failure", 0x0122: "Refused: SOP Class not supported",
            0x0124: "Refused: Not authorized", 0x0210: "Duplicate invocation",
            0x0211: "Unrecognized operation", 0x0212: "Mistyped argument",
            0xA700: "Refused: Out of Resources", 0xA900: "Error: Data Set does not match SOP Class",
            0xC000: "Error: Cannot understand", 0xC122: "Referenced Transfer Syntax not supported",
            0xB000: "Coercion of Data Elements", 0xB006: "Elements Discarded",
            0xB007: "Data Set does not match SOP Class"}


def _meaning(code: int) -> str:
    if code in _REASONS:
        return _REASONS[code]
    for low, text in ((0xA700, "Refused: Out of Resources"), (0xA900, "Error: Data Set does not match SOP Class"),
                      (0xC000, "Error: Cannot understand")):
        if low <= code <= low + 0xFF or (low == 0xC000 and low <= code <= 0xCFFF):
            return text
    return "unknown reason"


def first_part(body: bytes, content_type: str) -> bytes:
    """The first body part of a multipart/related response."""
    if not content_type.lower().startswith("multipart/"):
        return body
    boundary = ""
    for param in content_type.split(";")[1:]:
        name, _, value = param.strip().partition("=")
        if name.lower() == "boundary":
            boundary = value.strip('"')
    if not boundary:
        raise StoreError("multipart response without a boundary")
    delim = b"--" + boundary.encode()
    start = body.find(delim)
    if start < 0:
        raise StoreError("multipart response without parts")
    head_end = body.find(b"\r\n\r\n", start)
    end = body.find(b"\r\n" + delim, head_end)
    if head_end < 0 or end < 0:
        raise StoreError("truncated multipart response")
    return body[head_end + 4:end]
