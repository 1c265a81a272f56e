"""Where migrated objects go: one Protocol, several sinks.

The migrate engine (`cloudexit.engine`) downloads each object once, verifies it, and hands the
verified file to every destination of the run. A destination is a `Store`:

* `FilesystemStore` (`--to /srv/pacs-archive` or `file:///srv/pacs-archive`): the archive on
  disk. It is also where downloads *land*: the engine's workers stream each object into a temp
  file beside its final path and rename it into place (`Placer`), so the archive copy costs no
  extra copy. It is the only landing store in this version.
* C-STORE (`--to dicom://AET@HOST:PORT`) and STOW-RS (`--to dicomweb+https://HOST/PATH`) are
  *delivery* stores (issue 5): `deliver()` gets a verified local file and its inventory facts
  (SOP Class, Transfer Syntax for presentation contexts) and answers with a `Delivery` that the
  engine records per object and destination (table `transfers`, column `dest` = `Store.id`).

How a delivery store plugs in (the contract the engine relies on):
1. `open_store(url)` maps the URL to the class; `check()` fails early (unreachable, refused,
   not writable) with a `StoreError` whose message says what to fix.
2. `deliver()` is called from a pool of `parallel` threads after the object verified; it must be
   idempotent per `item.key` (an aborted association is retried) and never raise for a per-object
   refusal: a failure is data (`Delivery(status="failed", code=..., detail=...)`). It raises
   `StoreUnavailable` when the whole destination is down (the engine pauses and probes, as for the
   S3 side) and `StoreError` for conditions that must stop the run.
3. A `conflict` status means the destination already holds another object under the same SOP
   Instance UID (Orthanc keeps the first copy): recorded, never reported as success.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Protocol, runtime_checkable

from cloudexit.core.errors import CloudexitError, UsageError

if TYPE_CHECKING:
    from cloudexit.core.config import PacsConfig


class StoreError(CloudexitError):
    """The destination cannot take objects (full, not writable, refused): the run stops."""


class StoreUnavailable(StoreError):
    """The destination does not answer right now (a PACS restarting): pause and retry."""


class QueryRefused(StoreError):
    """The PACS is up but will not answer our queries (C-FIND): most likely our calling AE title
    may store but not query. `verify` asks its DICOMweb URL (QIDO-RS) instead when it knows one."""


@dataclass(frozen=True)
class Item:
    """What a store is told about one verified object."""

    key: str
    size: int
    sha256: str
    kind: str  # dicom | other | unreadable
    sop_uid: str | None = None
    sop_class_uid: str | None = None
    study_uid: str | None = None
    series_uid: str | None = None
    transfer_syntax: str | None = None


@dataclass
class Delivery:
    """A store's answer for one object."""

    status: str  # stored | warning (stored, with a note) | conflict | failed
    location: str | None = None  # path in the archive, or SOP Instance UID in a PACS
    code: str | None = None  # e.g. C-STORE status 0xB000, HTTP 409
    detail: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.status in ("stored", "warning")


@runtime_checkable
class Store(Protocol):
    """A destination of a migration run."""

    kind: ClassVar[str]  # "filesystem" | "dicom" | "dicomweb"
    url: str  # as the user gave it (credentials never part of it)
    id: str  # stable identity recorded in the state DB (e.g. "file:///srv/pacs-archive")
    parallel: int  # deliveries it takes at once

    def check(self) -> None:
        """Fail early and clearly if the destination cannot take objects."""

    def deliver(self, item: Item, staged: str) -> Delivery:
        """Store the verified file at `staged` (read-only for the store)."""

    def close(self) -> None:
        """Release connections."""


def open_store(url: str, calling_aet: str | None = None, timeouts: PacsConfig | None = None) -> Store:
    """The store for a `--to` value; `calling_aet` (our AE title) and `timeouts` go to a PACS."""
    from pathlib import Path

    text = url.strip()
    if text.startswith(("dicom://", "dicomweb+http://", "dicomweb+https://")):
        module = "cstore" if text.startswith("dicom://") else "dicomweb"
        try:
            mod = __import__(f"cloudexit.stores.{module}", fromlist=["open_store"])
        except ImportError as exc:
            raise UsageError(f"--to {text}: this destination type is not available in this version",
                             hint="migrate into a folder (--to /srv/pacs-archive) for now") from exc
        if module == "cstore":
            return mod.open_store(text, calling_aet=calling_aet, timeouts=timeouts)  # type: ignore[no-any-return]
        return mod.open_store(text, timeouts=timeouts)  # type: ignore[no-any-return]
    if "://" in text and not text.startswith("file://"):
        raise UsageError(f"--to {text}: unknown destination",
                         hint="give a folder (/srv/pacs-archive or file:///srv/pacs-archive), "
                              "dicom://AET@HOST:PORT or dicomweb+https://HOST/PATH")
    from cloudexit.stores.filesystem import FilesystemStore

    path = text[len("file://"):] if text.startswith("file://") else text
    if not path:
        raise UsageError("--to needs a folder")
    return FilesystemStore(Path(path))
