"""PACS fixtures with real parts: Orthanc from Debian, and a pynetdicom SCP that answers with
the statuses a test asks for.

* `OrthancServer(workdir)`: `/usr/sbin/Orthanc` with its own JSON config: random free HTTP and
  DICOM ports on 127.0.0.1, storage in `workdir`, the DICOMweb plugin, C-STORE/C-FIND/C-GET open
  to any calling AE (our default CLOUDEXIT is also declared as a modality). `overwrite=True`
  sets "OverwriteInstances" (a second object with a known SOP Instance UID replaces the first,
  as some PACS are configured). `stop()` and
  `start()` keep ports and storage, for "PACS down mid-run" tests. `options` (a dict, or
  keywords) overrides config entries (e.g. `{"StorageCompression": True}`); `storage` is its
  storage folder and `attachments()` maps each file there to its instance and attachment kind.
* fixtures: `orthanc` (one per session), `pacs` (the same Orthanc, emptied before the test),
  `overwriting_pacs` (a second Orthanc with OverwriteInstances, emptied before the test),
  `status_scp` (an in-process Storage SCP; `status_scp.statuses[sop_uid] = 0xA700` makes it answer
  that status for that instance, everything else gets 0x0000).
* `write_objects(objects, folder)`: synthetic objects as files plus the `Item` a store gets.

Register them in tests/conftest.py with:
    from orthanc import orthanc, overwriting_orthanc, overwriting_pacs, pacs, status_scp  # noqa: F401
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import time
import urllib.request
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import pytest
from chromium_pipe import CHROMIUM

from cloudexit.testing.s3server import free_port
from cloudexit.stores import Item

ORTHANC = "/usr/sbin/Orthanc"
DICOMWEB_PLUGIN = "/usr/share/orthanc/plugins/libOrthancDicomWeb.so"
AET = "ORTHANC"

# The system parts some tests need: how to tell one is there, and the line that installs it
# (scripts/test installs them when it can). One table, so every such test skips the same way.
SYSTEM_PARTS: dict[str, tuple[Callable[[], bool], str]] = {
    "orthanc": (lambda: os.path.exists(ORTHANC) and os.path.exists(DICOMWEB_PLUGIN),
                "apt-get install orthanc orthanc-dicomweb"),
    "dcmtk": (lambda: shutil.which("findscu") is not None, "apt-get install dcmtk"),
    "chromium": (lambda: CHROMIUM is not None, "apt-get install chromium fonts-wqy-microhei"),
}


def needs(*parts: str) -> None:
    """Skip the calling test (or fixture) unless every named system part is installed, saying
    which one is missing and how to install it. Tests use it as `@pytest.mark.needs("dcmtk")`."""
    for part in parts:
        present, install = SYSTEM_PARTS[part]
        if not present():
            pytest.skip(f"needs {part}: {install}")


class OrthancServer:
    """One Orthanc process with its own config, ports and storage."""

    def __init__(self, workdir: Path, aet: str = AET, users: dict[str, str] | None = None,
                 overwrite: bool = False, options: dict[str, Any] | None = None, **more: Any) -> None:
        """`options` (a dict) and keywords: Orthanc configuration entries that replace the
        defaults below, e.g. {"StorageCompression": True}, or DicomAlwaysAllowFind=False,
        DicomModalities={} (a PACS that lets any AE store, only registered ones query)."""
        self.workdir = Path(workdir)
        self.aet = aet
        self.users = users
        self.http_port = free_port()
        self.dicom_port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        self.config = self.workdir / "orthanc.json"
        storage = self.storage = self.workdir / "storage"
        storage.mkdir(parents=True, exist_ok=True)
        self.config.write_text(json.dumps({
            "Name": "cloudexit-test",
            "StorageDirectory": str(storage), "IndexDirectory": str(storage),
            "HttpPort": self.http_port, "DicomPort": self.dicom_port, "DicomAet": aet,
            "RemoteAccessAllowed": False, "AuthenticationEnabled": bool(users),
            "RegisteredUsers": users or {},
            "HttpServerEnabled": True, "DicomServerEnabled": True,
            "DicomCheckCalledAet": True,
            "DicomAlwaysAllowStore": True, "DicomAlwaysAllowFind": True,
            "DicomAlwaysAllowGet": True, "DicomAlwaysAllowMove": True,
            "DicomModalities": {"cloudexit": ["CLOUDEXIT", "127.0.0.1", 11112]},
            "Plugins": [DICOMWEB_PLUGIN],
            "DicomWeb": {"Enable": True, "Root": "/dicom-web/"},
            "StorageCompression": False, "OverwriteInstances": overwrite,
            "LimitFindResults": 0, "LimitFindInstances": 0,
            "DicomScuTimeout": 30, "DicomAssociationCloseDelay": 0,
            "SaveJobs": False, "ConcurrentJobs": 2,
            **(options or {}), **more,
        }))

    # -- addresses --------------------------------------------------------------------------------
    @property
    def http_url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def dicom_url(self) -> str:
        return f"dicom://{self.aet}@127.0.0.1:{self.dicom_port}"

    @property
    def dicomweb_url(self) -> str:
        return f"dicomweb+http://127.0.0.1:{self.http_port}/dicom-web"

    # -- life cycle -------------------------------------------------------------------------------
    def start(self, timeout: float = 30.0) -> None:
        log = open(self.workdir / "orthanc.log", "ab")  # noqa: SIM115 - Orthanc writes it for its lifetime
        self.proc = subprocess.Popen([ORTHANC, str(self.config)], stdout=log, stderr=subprocess.STDOUT,
                                     cwd=self.workdir)
        log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"Orthanc exited: see {self.workdir / 'orthanc.log'}")
            try:
                # Ready means both ends answer: the DICOM port can open after the HTTP one.
                self.rest("GET", "/system")
                socket.create_connection(("127.0.0.1", self.dicom_port), timeout=1).close()
                return
            except OSError:
                time.sleep(0.1)
        raise RuntimeError("Orthanc did not answer in time")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def kill(self) -> None:
        """Die without saying goodbye (power cut, OOM kill)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.proc = None

    def __enter__(self) -> "OrthancServer":
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- REST -------------------------------------------------------------------------------------
    def rest(self, method: str, path: str, body: bytes | None = None) -> Any:
        req = urllib.request.Request(self.http_url + path, data=body, method=method)
        if self.users:
            user, password = next(iter(self.users.items()))
            token = base64.b64encode(f"{user}:{password}".encode()).decode()
            req.add_header("Authorization", f"Basic {token}")
        with urllib.request.urlopen(req, timeout=30) as resp:
            data = resp.read()
        return json.loads(data) if data.strip() else None

    def clear(self) -> None:
        for patient in self.rest("GET", "/patients"):
            self.rest("DELETE", f"/patients/{patient}")

    def instance_count(self) -> int:
        return int(self.rest("GET", "/statistics")["CountInstances"])

    def find_instance(self, sop_uid: str) -> str | None:
        found = self.rest("POST", "/tools/lookup", sop_uid.encode())
        return next((f["ID"] for f in found if f["Type"] == "Instance"), None)

    def stored_file(self, sop_uid: str) -> bytes:
        oid = self.find_instance(sop_uid)
        assert oid, sop_uid
        req = urllib.request.Request(f"{self.http_url}/instances/{oid}/file")
        with urllib.request.urlopen(req, timeout=30) as resp:
            return resp.read()

    def attachments(self) -> dict[str, tuple[str, str]]:
        """Every attachment file in the storage area: {uuid: (SOP Instance UID, attachment
        name)}, from the REST API (the mapping lives only in Orthanc's index)."""
        found = {}
        for oid in self.rest("GET", "/instances"):
            sop = self.rest("GET", f"/instances/{oid}/simplified-tags")["SOPInstanceUID"]
            for name in self.rest("GET", f"/instances/{oid}/attachments"):
                info = self.rest("GET", f"/instances/{oid}/attachments/{name}/info")
                found[info["Uuid"]] = (sop, name)
        return found

    def delete_instance(self, sop_uid: str) -> None:
        oid = self.find_instance(sop_uid)
        assert oid, sop_uid
        self.rest("DELETE", f"/instances/{oid}")


def write_objects(objects: Iterable[Any], folder: Path) -> list[tuple[Item, str]]:
    """Synthetic objects as files in `folder`, with the Item the engine would hand a store."""
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for n, obj in enumerate(objects):
        data = obj.body()
        path = folder / f"{n:05d}.dcm"
        path.write_bytes(data)
        item = Item(key=obj.key, size=len(data), sha256=hashlib.sha256(data).hexdigest(), kind=obj.kind,
                    sop_uid=obj.sop_uid, sop_class_uid=obj.sop_class_uid, study_uid=obj.study_uid,
                    series_uid=obj.series_uid, transfer_syntax=obj.transfer_syntax)
        out.append((item, str(path)))
    return out


@pytest.fixture(scope="session")
def orthanc(tmp_path_factory: pytest.TempPathFactory) -> Iterator[OrthancServer]:
    needs("orthanc")
    with OrthancServer(tmp_path_factory.mktemp("orthanc")) as server:
        yield server


@pytest.fixture
def pacs(orthanc: OrthancServer) -> OrthancServer:
    """The session's Orthanc, running and empty."""
    return _running_and_empty(orthanc)


def _running_and_empty(server: OrthancServer) -> OrthancServer:
    if server.proc is None or server.proc.poll() is not None:
        server.start()
    server.clear()
    return server


@pytest.fixture(scope="session")
def overwriting_orthanc(tmp_path_factory: pytest.TempPathFactory) -> Iterator[OrthancServer]:
    if not os.path.exists(ORTHANC):
        pytest.skip("Orthanc is not installed (apt-get install orthanc orthanc-dicomweb)")
    with OrthancServer(tmp_path_factory.mktemp("orthanc-overwrite"), overwrite=True) as server:
        yield server


@pytest.fixture
def overwriting_pacs(overwriting_orthanc: OrthancServer) -> OrthancServer:
    """An Orthanc that keeps the LAST object sent for a SOP Instance UID ("OverwriteInstances"),
    running and empty."""
    return _running_and_empty(overwriting_orthanc)


class StatusSCP:
    """An in-process Storage SCP that answers each SOP Instance UID with a chosen status."""

    def __init__(self) -> None:
        from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, AllStoragePresentationContexts, evt
        from pynetdicom.sop_class import Verification

        self.aet = "STATUSSCP"
        self.port = free_port()
        self.statuses: dict[str, int] = {}
        self.received: list[str] = []  # SOP Instance UIDs, in order, repeats included
        self.abort_first: set[str] = set()  # abort the association on the first C-STORE of these
        self.associations = 0
        ae = AE(ae_title=self.aet)
        for cx in AllStoragePresentationContexts:
            ae.add_supported_context(cx.abstract_syntax, ALL_TRANSFER_SYNTAXES)
        ae.add_supported_context(Verification)
        ae.maximum_associations = 32
        self.server = ae.start_server(("127.0.0.1", self.port), block=False,
                                      evt_handlers=[(evt.EVT_C_STORE, self._on_store),
                                                    (evt.EVT_ACCEPTED, self._on_accepted)])

    def _on_accepted(self, event: Any) -> None:
        self.associations += 1

    def _on_store(self, event: Any) -> int:
        sop = str(event.request.AffectedSOPInstanceUID)
        self.received.append(sop)
        if sop in self.abort_first:
            self.abort_first.discard(sop)
            event.assoc.abort()
            return 0x0000
        return self.statuses.get(sop, 0x0000)

    @property
    def url(self) -> str:
        return f"dicom://{self.aet}@127.0.0.1:{self.port}"

    def close(self) -> None:
        self.server.shutdown()


@pytest.fixture
def status_scp() -> Iterator[StatusSCP]:
    scp = StatusSCP()
    try:
        yield scp
    finally:
        scp.close()
