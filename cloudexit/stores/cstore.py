"""Deliver into a PACS over DICOM: C-STORE (pynetdicom), plus the C-FIND and C-GET that
`cloudexit verify` uses to ask the PACS what it holds.

`--to dicom://AET@HOST:PORT[?calling=OURAET&parallel=N]`: AET is the PACS's (called) AE title.
Our (calling) AE title is, first found: `open_store(url, calling_aet=...)` (the CLI's
`--calling-aet`), the URL's `calling=`, env `CLOUDEXIT_CALLING_AET`, then `CLOUDEXIT`.

How it behaves (the `Store` contract in `cloudexit.stores`):
* Presentation contexts: one per (SOP Class, Transfer Syntax) pair, each with that single
  transfer syntax, so files go out exactly as they were archived (no transcoding). The pairs come
  from `contexts=` (the inventory's distinct pairs) or are learned item by item: an item whose pair
  is new makes its worker re-associate with the grown list.
* `parallel` associations at most, kept in a pool and reused; a worker borrows one per
  C-STORE. An association that aborts or times out is dropped and the C-STORE re-sent on a fresh
  one: a PACS keeps one instance per SOP Instance UID, so a re-send cannot duplicate.
* Statuses are data: 0x0000 -> stored; 0xB000/0xB006/0xB007 -> warning (stored, code kept);
  anything else -> failed with its code and meaning (0xA700 out of resources, 0x0122 SOP class
  not supported...). A pair the PACS refused at association time fails its items the same way.
* The PACS not answering (connection refused, association aborted again and again) raises
  `StoreUnavailable`; a rejected association (wrong AE titles) raises `StoreError`.
* Duplicate SOP Instance UIDs: Orthanc (and dcm4chee by default) answer success to a second,
  different object with a known SOP Instance UID and keep the first. For a UID the run knows to be
  shared (`duplicates=`, or already delivered from another key by this store), the PACS's copy is
  fetched back with C-GET and its dataset hash compared with ours: different -> `conflict`.
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading
import time
from collections.abc import Collection, Iterable
from typing import Any, ClassVar
from urllib.parse import parse_qs, urlsplit

from pydicom.dataset import Dataset
from pydicom.uid import ImplicitVRLittleEndian
from pynetdicom import AE, _config, build_context, build_role, evt
from pynetdicom.association import Association
from pynetdicom.presentation import PresentationContext
from pynetdicom.sop_class import (
    StudyRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelGet,
    Verification,
)
from pynetdicom.status import STORAGE_SERVICE_CLASS_STATUS

from cloudexit.core.config import PacsConfig
from cloudexit.core.errors import UsageError
from cloudexit.stores import Delivery, Item, QueryRefused, StoreError, StoreUnavailable
from cloudexit.stores.dicomfile import dataset_sha256, file_layout

# Send files from disk as they are (no decode/re-encode): faster and byte-exact. pynetdicom only
# offers this as a process-wide switch; cloudexit never relies on the other behaviour.
_config.STORE_SEND_CHUNKED_DATASET = True
# pynetdicom logs every PDU at INFO, with dataset summaries: keep patient data out of our logs.
logging.getLogger("pynetdicom").setLevel(logging.WARNING)

DEFAULT_CALLING_AET = "CLOUDEXIT"
WARNING_CODES = frozenset({0xB000, 0xB006, 0xB007})
MAX_CONTEXTS = 128  # the DICOM limit per association (odd context IDs 1..255)


def open_store(url: str, calling_aet: str | None = None,
               contexts: Iterable[tuple[str, str]] | None = None,
               duplicates: Collection[str] | None = None, parallel: int | None = None,
               timeouts: PacsConfig | None = None) -> "CStoreStore":
    """The store for `dicom://AET@HOST:PORT[?calling=AET&parallel=N]`."""
    parts = urlsplit(url)
    query = {k: v[-1] for k, v in parse_qs(parts.query).items()}
    if parts.scheme != "dicom" or not parts.hostname or not parts.username or parts.password:
        raise UsageError(f"--to {url}: expected dicom://AET@HOST:PORT",
                         hint="AET is the PACS's AE title, e.g. dicom://ORTHANC@pacs.example.org:4242")
    try:
        port = parts.port or 104
    except ValueError as exc:
        raise UsageError(f"--to {url}: the port is not a number") from exc
    calling = calling_aet or query.get("calling") or os.environ.get("CLOUDEXIT_CALLING_AET") \
        or DEFAULT_CALLING_AET
    workers = parallel or int(query.get("parallel", "4"))
    return CStoreStore(parts.username, parts.hostname, port, calling_aet=calling, parallel=workers,
                       contexts=contexts, duplicates=duplicates, timeouts=timeouts)


def _check_aet(aet: str, what: str) -> str:
    if not aet or len(aet) > 16 or "\\" in aet or not aet.isprintable():
        raise UsageError(f"{what} AE title {aet!r}: 1 to 16 printable characters, no backslash")
    return aet


def status_meaning(code: int) -> str:
    category, text = STORAGE_SERVICE_CLASS_STATUS.get(code, ("", ""))
    if text:
        return text
    if 0xA700 <= code <= 0xA7FF:
        return "Refused: Out of Resources"
    if 0xA900 <= code <= 0xA9FF:
        return "Error: Data Set does not match SOP Class"
    if 0xC000 <= code <= 0xCFFF:
        return "Error: Cannot understand"
    return "unknown status"


def delivery_for_status(status: Dataset, sop_uid: str | None) -> Delivery:
    """A C-STORE response as a Delivery (never for an empty response: that is a lost link)."""
    code = int(status.Status)
    comment = str(status.get("ErrorComment", "") or "").strip()
    meaning = status_meaning(code)
    detail = f"{meaning}: {comment}" if comment else meaning
    hexcode = f"0x{code:04X}"
    if code == 0x0000:
        return Delivery("stored", location=sop_uid, code=hexcode)
    if code in WARNING_CODES:
        return Delivery("warning", location=sop_uid, code=hexcode, detail=detail)
    return Delivery("failed", location=sop_uid, code=hexcode, detail=detail)


class _Link:
    """One association and the context pairs it was negotiated with."""

    def __init__(self, assoc: Association, proposed: frozenset[tuple[str, str]]) -> None:
        self.assoc = assoc
        self.proposed = proposed
        self.accepted = frozenset((c.abstract_syntax, c.transfer_syntax[0])
                                  for c in assoc.accepted_contexts if c.transfer_syntax)


class CStoreStore:
    """A PACS that takes C-STORE."""

    kind: ClassVar[str] = "dicom"

    def __init__(self, called_aet: str, host: str, port: int, calling_aet: str = DEFAULT_CALLING_AET,
                 parallel: int = 4, contexts: Iterable[tuple[str, str]] | None = None,
                 duplicates: Collection[str] | None = None, timeouts: PacsConfig | None = None,
                 attempts: int = 3) -> None:
        self.called_aet = _check_aet(called_aet, "called")
        self.calling_aet = _check_aet(calling_aet, "calling")
        self.host, self.port = host, port
        self.url = f"dicom://{called_aet}@{host}:{port}"
        self.id = self.url
        self.parallel = max(1, parallel)
        self.timeouts = timeouts = timeouts or PacsConfig()
        self.attempts = attempts
        self.duplicates = set(duplicates or ())
        self.ae = AE(ae_title=self.calling_aet)
        self.ae.acse_timeout = timeouts.acse_timeout
        self.ae.network_timeout = timeouts.network_timeout
        self.ae.connection_timeout = timeouts.connect_timeout
        # C-FIND and C-GET (verify) may take long on a big study; each C-STORE and C-ECHO sets
        # its own, shorter, on its association (`_send`, `check`).
        self.ae.dimse_timeout = timeouts.max_timeout
        self.ae.maximum_associations = self.parallel + 2
        self._lock = threading.Lock()
        self._pairs: dict[tuple[str, str], None] = dict.fromkeys(
            (c, t) for c, t in (contexts or ()) if c and t)
        self._refused: set[tuple[str, str]] = set()
        self._idle: list[_Link] = []
        self._slots = threading.BoundedSemaphore(self.parallel)
        self._seen: dict[str, str] = {}  # SOP UID -> the key first delivered under it
        self._uid_locks = [threading.Lock() for _ in range(64)]  # striped by SOP Instance UID

    def __repr__(self) -> str:
        return f"CStoreStore({self.url!r}, calling={self.calling_aet!r})"

    # -- associations ---------------------------------------------------------------------------
    def _associate(self, contexts: list[PresentationContext], ext_neg: list[Any] | None = None,
                   handlers: list[Any] | None = None, watch_reject: bool = False) -> Association:
        rejected: list[Any] = []

        def on_pdu(event: Any) -> None:
            if type(event.pdu).__name__ == "A_ASSOCIATE_RJ":
                rejected.append(event.pdu)

        # The A-ASSOCIATE-RJ PDU itself, seen as it arrives: when the PACS closes the connection
        # right after it (Orthanc does), pynetdicom 3 reports about 1 rejection in 5 as an abort.
        # Only for the check: it is where a wrong AE title shows, and delivery associations
        # stay as pynetdicom makes them.
        if watch_reject:
            handlers = [*(handlers or []), (evt.EVT_PDU_RECV, on_pdu)]
        try:
            assoc = self.ae.associate(self.host, self.port, contexts=contexts, ae_title=self.called_aet,
                                      ext_neg=ext_neg, evt_handlers=handlers)
        except (OSError, RuntimeError) as exc:
            raise StoreUnavailable(f"the PACS at {self.host}:{self.port} did not answer: {exc}") from exc
        if assoc.is_established:
            return assoc
        if assoc.is_rejected or rejected:
            raise StoreError(
                f"the PACS at {self.host}:{self.port} rejected the association "
                f"(called AE {self.called_aet}, calling AE {self.calling_aet})",
                hint="check the PACS's AE title and that it accepts our calling AE title "
                     "(--calling-aet or ?calling=)")
        raise StoreUnavailable(f"the PACS at {self.host}:{self.port} did not answer "
                               "(connection refused, aborted or timed out)")

    def _propose(self, need: tuple[str, str]) -> tuple[list[PresentationContext], frozenset[tuple[str, str]]]:
        with self._lock:
            self._pairs.setdefault(need, None)
            others = [p for p in self._pairs if p != need and p not in self._refused]
        pairs = [need] + others[:MAX_CONTEXTS - 2]
        # Verification too: a PACS that refuses every storage context then still accepts the
        # association, and we learn "refused" rather than mistaking it for an outage.
        return [build_context(c, t) for c, t in pairs] + [build_context(Verification)], frozenset(pairs)

    def _borrow(self, need: tuple[str, str]) -> _Link:
        """An idle association that can carry `need`, or a new one that proposes it."""
        with self._lock:
            dead = [link for link in self._idle if not link.assoc.is_established]
            self._idle = [link for link in self._idle if link.assoc.is_established]
            found = next((link for link in self._idle if need in link.proposed), None)
            if found is not None:
                self._idle.remove(found)
            # Opening a new one: close an idle one, so we never hold more than `parallel`.
            stale = self._idle.pop(0) if found is None and self._idle else None
        for link in dead:
            self._drop(link)
        if found is not None:
            return found
        if stale is not None:
            self._drop(stale, release=True)
        contexts, proposed = self._propose(need)
        return _Link(self._associate(contexts), proposed)

    def _return(self, link: _Link) -> None:
        with self._lock:
            self._idle.append(link)

    @staticmethod
    def _drop(link: _Link, release: bool = False) -> None:
        try:
            if release and link.assoc.is_established:
                link.assoc.release()
            else:
                link.assoc.abort()
        except Exception:  # noqa: BLE001 - a dying association may fail to say goodbye
            pass

    def expect(self, contexts: Iterable[tuple[str, str]] = (), duplicates: Iterable[str] = ()) -> None:
        """What the engine knows before the run: the inventory's distinct (SOP Class, Transfer
        Syntax) pairs, and the SOP Instance UIDs more than one key claims (each is fetched back
        after a success: across runs and threads, only this catches Orthanc keeping another copy)."""
        with self._lock:
            self._pairs.update(dict.fromkeys((c, t) for c, t in contexts if c and t))
            self.duplicates.update(duplicates)

    # -- Store protocol ---------------------------------------------------------------------------
    def check(self) -> None:
        """C-ECHO: fails early on a wrong address, wrong AE titles or a PACS that is down."""
        assoc = self._associate([build_context(Verification)], watch_reject=True)
        assoc.dimse_timeout = self.timeouts.dimse_timeout
        try:
            status = assoc.send_c_echo()
            if "Status" not in status or int(status.Status) != 0:
                raise StoreError(f"the PACS at {self.host}:{self.port} refused C-ECHO")
        finally:
            assoc.release()

    def deliver(self, item: Item, staged: str) -> Delivery:
        if item.kind != "dicom":
            return Delivery("failed", code="not-dicom", detail=f"object is {item.kind}, not DICOM a PACS can take")
        info = file_layout(staged)
        sop_class = item.sop_class_uid or info.sop_class_uid
        ts = info.transfer_syntax or item.transfer_syntax or ImplicitVRLittleEndian
        if not sop_class or not item.sop_uid:
            return Delivery("failed", code="no-uids", detail="no SOP Class or SOP Instance UID")
        need = (sop_class, ts)
        if need in self._refused:
            return self._refused_delivery(item, need)
        payload: str | Dataset = staged if info.part10 else self._dataset(staged, sop_class, ts)
        # One SOP Instance UID at a time: the PACS keeps the copy it got first, so the copy sent
        # first must be the one confirmed first (else both could pass as ours, the conflict lost).
        with self._uid_locks[hash(item.sop_uid) % len(self._uid_locks)]:
            delivery = self._send(item, need, payload)
            if delivery.ok:
                delivery = self._confirm(item, staged, delivery, need)
        return delivery

    def _dataset(self, staged: str, sop_class: str, ts: str) -> Dataset:
        """A raw dataset without File Meta: pynetdicom needs a Dataset with a transfer syntax."""
        from pydicom import dcmread
        from pydicom.dataset import FileMetaDataset

        ds = dcmread(staged, force=True)
        ds.file_meta = FileMetaDataset()
        ds.file_meta.TransferSyntaxUID = ts
        ds.file_meta.MediaStorageSOPClassUID = sop_class
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        return ds

    def _refused_delivery(self, item: Item, need: tuple[str, str]) -> Delivery:
        return Delivery("failed", location=item.sop_uid, code="0x0122",
                        detail=f"Refused: SOP Class not supported (the PACS refused SOP Class {need[0]} "
                               f"with Transfer Syntax {need[1]} at association)")

    def _send(self, item: Item, need: tuple[str, str], payload: str | Dataset) -> Delivery:
        last = ""
        with self._slots:
            for attempt in range(1, self.attempts + 1):
                try:
                    link = self._borrow(need)
                except StoreUnavailable as exc:
                    last = str(exc)
                    time.sleep(min(2.0, 0.5 * attempt))
                    continue
                if need not in link.accepted:
                    with self._lock:
                        self._refused.add(need)
                    self._return(link)
                    return self._refused_delivery(item, need)
                # A hung PACS holds this thread only this long (not the 300 s a 1 GB object
                # may need): then the association is dropped and the object sent again.
                link.assoc.dimse_timeout = self.timeouts.answer_timeout(self.timeouts.dimse_timeout,
                                                                        item.size or 0)
                try:
                    status = link.assoc.send_c_store(payload)
                except (RuntimeError, OSError, ValueError) as exc:
                    status, last = Dataset(), f"{type(exc).__name__}: {exc}"
                if "Status" in status:
                    self._return(link)
                    return delivery_for_status(status, item.sop_uid)
                # No answer: the association was aborted or timed out. Drop it, send again on a
                # fresh one (same SOP Instance UID: the PACS cannot end up with two).
                last = last or "association aborted or no response"
                self._drop(link)
                time.sleep(0.2 * attempt)
        raise StoreUnavailable(f"the PACS at {self.host}:{self.port} did not take the object "
                               f"after {self.attempts} attempts ({last})")

    def _confirm(self, item: Item, staged: str, delivery: Delivery, pair: tuple[str, str]) -> Delivery:
        """For a shared SOP Instance UID, check the PACS holds *our* content."""
        sop = item.sop_uid
        assert sop is not None
        # Still needed: a UID first delivered from another key is fetched back and compared.
        # Look and claim need no lock of their own: deliver holds this UID's stripe lock.
        seen = self._seen.setdefault(sop, item.key)
        suspect = sop in self.duplicates or seen != item.key
        if not suspect:
            return delivery
        ours = dataset_sha256(staged)
        try:
            theirs = self.fetch_dataset_sha256(item, *pair)
        except StoreError as exc:
            return Delivery("conflict", location=sop, code=delivery.code,
                            detail="duplicate SOP Instance UID: the PACS answered success but its copy "
                                   f"could not be fetched back to compare ({exc})")
        if theirs != ours:
            return Delivery("conflict", location=sop, code=delivery.code,
                            detail="the PACS already holds different content under this SOP Instance UID "
                                   "and kept it (it answered success)",
                            extra={"pacs_dataset_sha256": theirs, "our_dataset_sha256": ours})
        self._seen[sop] = item.key
        delivery.extra["confirmed"] = "dataset SHA-256 fetched back with C-GET"
        return delivery

    def close(self) -> None:
        with self._lock:
            idle, self._idle = self._idle, []
        for link in idle:
            self._drop(link, release=True)

    # -- queries for verify ----------------------------------------------------------------------
    def _find(self, query: Dataset) -> list[Dataset]:
        assoc = self._associate([build_context(StudyRootQueryRetrieveInformationModelFind)])
        found: list[Dataset] = []
        try:
            for status, identifier in assoc.send_c_find(query, StudyRootQueryRetrieveInformationModelFind):
                if "Status" not in status:
                    raise self._query_lost("C-FIND", "DicomAlwaysAllowFind")
                code = int(status.Status)
                if code in (0xFF00, 0xFF01):
                    if identifier is not None:
                        found.append(identifier)
                elif code != 0:
                    raise StoreError(f"C-FIND refused by the PACS: 0x{code:04X}")
        finally:
            if assoc.is_established:
                assoc.release()
        return found

    def _query_lost(self, service: str, orthanc_option: str) -> StoreError:
        """No answer to a C-FIND or C-GET (the association aborted). A PACS that still answers
        C-ECHO is up and refused the request: Orthanc, for one, accepts C-STORE from any AE
        title but C-FIND (C-GET) only from registered ones (DicomAlwaysAllowFind false), and aborts."""
        try:
            self.check()
        except StoreError:
            return StoreUnavailable(f"the PACS at {self.host}:{self.port} stopped answering {service}")
        verb = "query" if service == "C-FIND" else "retrieve"
        return QueryRefused(
            f"the PACS at {self.host}:{self.port} is up (it answers C-ECHO) but closed the association "
            f"on our {service}: it most likely does not let calling AE title {self.calling_aet} {verb}",
            hint=f"register {self.calling_aet} for {service} in the PACS (Orthanc: add it to "
                 f"DicomModalities, or set {orthanc_option}), or verify through its DICOMweb URL: "
                 "--to dicomweb+https://HOST/PATH")

    def count_studies(self, study_uids: list[str]) -> dict[str, int]:
        """NumberOfStudyRelatedInstances per study the PACS has (absent: it has none)."""
        counts: dict[str, int] = {}
        for i in range(0, len(study_uids), 50):
            q = Dataset()
            q.QueryRetrieveLevel = "STUDY"
            q.StudyInstanceUID = study_uids[i:i + 50]
            q.NumberOfStudyRelatedInstances = None
            for ds in self._find(q):
                counts[str(ds.StudyInstanceUID)] = int(ds.get("NumberOfStudyRelatedInstances") or 0)
        return counts

    def count_series(self, study_uid: str) -> dict[str, int]:
        q = Dataset()
        q.QueryRetrieveLevel = "SERIES"
        q.StudyInstanceUID = study_uid
        q.SeriesInstanceUID = None
        q.NumberOfSeriesRelatedInstances = None
        return {str(ds.SeriesInstanceUID): int(ds.get("NumberOfSeriesRelatedInstances") or 0)
                for ds in self._find(q)}

    def list_instances(self, study_uid: str, series_uid: str) -> set[str]:
        q = Dataset()
        q.QueryRetrieveLevel = "IMAGE"
        q.StudyInstanceUID = study_uid
        q.SeriesInstanceUID = series_uid
        q.SOPInstanceUID = None
        return {str(ds.SOPInstanceUID) for ds in self._find(q)}

    def fetch(self, study_uid: str, series_uid: str, sop_uid: str, sop_class_uid: str,
              transfer_syntax: str) -> tuple[str, bytes]:
        """C-GET one instance: (transfer syntax, dataset bytes) as the PACS sends them."""
        got: list[tuple[str, bytes]] = []

        def on_store(event: Any) -> int:
            got.append((str(event.context.transfer_syntax), event.request.DataSet.getvalue()))
            return 0x0000

        # Ask for the archived transfer syntax first, so a PACS that kept it need not transcode.
        syntaxes = list(dict.fromkeys([transfer_syntax, "1.2.840.10008.1.2.1", ImplicitVRLittleEndian]))
        contexts = [build_context(StudyRootQueryRetrieveInformationModelGet)]
        contexts += [build_context(sop_class_uid, [ts]) for ts in syntaxes]
        roles = [build_role(sop_class_uid, scp_role=True)]
        assoc = self._associate(contexts, ext_neg=roles, handlers=[(evt.EVT_C_STORE, on_store)])
        try:
            if not any(c.abstract_syntax == StudyRootQueryRetrieveInformationModelGet
                       for c in assoc.accepted_contexts):
                raise StoreError("the PACS does not offer C-GET")
            q = Dataset()
            q.QueryRetrieveLevel = "IMAGE"
            q.StudyInstanceUID, q.SeriesInstanceUID, q.SOPInstanceUID = study_uid, series_uid, sop_uid
            last = None
            try:
                for status, _ in assoc.send_c_get(q, StudyRootQueryRetrieveInformationModelGet):
                    if "Status" not in status:
                        raise self._query_lost("C-GET", "DicomAlwaysAllowGet")
                    last = int(status.Status)
            except (ValueError, RuntimeError) as exc:
                raise StoreError(f"C-GET failed: {exc}") from exc
        finally:
            if assoc.is_established:
                assoc.release()
        if not got:
            raise StoreError(f"C-GET returned no instance (status 0x{last or 0:04X})"
                             if last not in (None, 0) else "C-GET returned no instance")
        return got[0]

    def fetch_dataset_sha256(self, item: Item, sop_class_uid: str, transfer_syntax: str) -> str:
        if not (item.study_uid and item.series_uid and item.sop_uid):
            raise StoreError("the inventory lacks the Study or Series Instance UID to fetch it back")
        _, data = self.fetch(item.study_uid, item.series_uid, item.sop_uid, sop_class_uid,
                             transfer_syntax)
        return hashlib.sha256(data).hexdigest()
