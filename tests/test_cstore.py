"""C-STORE delivery against real parts: Orthanc, DCMTK findscu, and a pynetdicom SCP that
answers with failure statuses."""

from __future__ import annotations

import re
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from cloudexit.testing import synthetic
from cloudexit.core.errors import UsageError
from cloudexit.stores import Delivery, Item, Store, StoreError, StoreUnavailable, open_store
from cloudexit.stores.cstore import CStoreStore
from cloudexit.stores.cstore import open_store as open_cstore
from cloudexit.stores.dicomfile import dataset_sha256
from orthanc import OrthancServer, StatusSCP, write_objects


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> list[tuple[Item, str]]:
    return write_objects(synthetic.generate(synthetic.Profile.tiny()), tmp_path_factory.mktemp("tiny"))


def _deliver_all(store: CStoreStore, items: list[tuple[Item, str]]) -> list[Delivery]:
    with ThreadPoolExecutor(store.parallel) as pool:
        return list(pool.map(lambda pair: store.deliver(*pair), items))


def _findscu_count(server: OrthancServer, study_uid: str) -> int:
    """An independent count: DCMTK's findscu asks Orthanc for the study's instances."""
    out = subprocess.run(
        ["findscu", "-S", "-aet", "CLOUDEXIT", "-aec", server.aet, "-k", "QueryRetrieveLevel=STUDY",
         "-k", f"StudyInstanceUID={study_uid}", "-k", "NumberOfStudyRelatedInstances",
         "127.0.0.1", str(server.dicom_port)], capture_output=True, text=True, timeout=60)
    found = re.findall(r"\(0020,1208\) IS \[(\d+)", out.stdout + out.stderr)
    return int(found[0]) if found else 0


def test_open_store_from_the_protocol(pacs: OrthancServer, monkeypatch: pytest.MonkeyPatch) -> None:
    store = open_store(pacs.dicom_url)
    assert isinstance(store, Store) and store.kind == "dicom"
    assert store.id == pacs.dicom_url and store.calling_aet == "CLOUDEXIT"
    store.check()
    assert open_cstore(pacs.dicom_url + "?calling=ARCHIVE1&parallel=2").calling_aet == "ARCHIVE1"
    assert open_cstore(pacs.dicom_url + "?calling=X", calling_aet="CLI").calling_aet == "CLI"
    monkeypatch.setenv("CLOUDEXIT_CALLING_AET", "FROMENV")
    assert open_cstore(pacs.dicom_url).calling_aet == "FROMENV"
    with pytest.raises(UsageError):
        open_store("dicom://127.0.0.1:104")  # no AE title
    with pytest.raises(UsageError):
        open_cstore("dicom://THIS-AE-TITLE-IS-TOO-LONG@127.0.0.1:104")


@pytest.mark.needs("dcmtk")
def test_tiny_pacs_into_orthanc(pacs: OrthancServer, tiny: list[tuple[Item, str]]) -> None:
    store = open_cstore(pacs.dicom_url)
    try:
        results = _deliver_all(store, tiny)
    finally:
        store.close()
    by_case = {}
    for (item, _path), d in zip(tiny, results):
        by_case.setdefault(item.kind, []).append(d)
        if item.kind != "dicom":
            assert d.status == "failed" and d.code == "not-dicom"
    dicom = [(item, path, d) for (item, path), d in zip(tiny, results) if item.kind == "dicom"]
    conflicts = [(item, d) for item, _, d in dicom if d.status == "conflict"]
    # The second copy of the shared SOP Instance UID: Orthanc said success, kept the first.
    assert len(conflicts) == 1 and "kept it" in (conflicts[0][1].detail or "")
    assert all(d.status == "stored" and d.code == "0x0000" for _, _, d in dicom if d.status != "conflict")
    sops = {item.sop_uid for item, _, _ in dicom}
    assert pacs.instance_count() == len(sops)
    # What Orthanc stored is what we sent, dataset byte for byte (no-preamble one included).
    for item, path, d in dicom:
        if d.status == "stored":
            stored = pacs.stored_file(item.sop_uid or "")
            assert dataset_sha256(data=stored) == dataset_sha256(path), item.key
    # DCMTK's findscu counts the same per study.
    for study in {item.study_uid for item, _, _ in dicom}:
        expected = len({i.sop_uid for i, _, _ in dicom if i.study_uid == study})
        assert _findscu_count(pacs, study or "") == expected


def test_conflict_found_across_runs(pacs: OrthancServer, tiny: list[tuple[Item, str]]) -> None:
    """A later run sends the other copy: the store is told which SOP UIDs are shared."""
    first, second = [(i, p) for i, p in tiny if i.kind == "dicom" and i.sop_uid and
                     sum(1 for j, _ in tiny if j.kind == "dicom" and j.sop_uid == i.sop_uid) > 1]
    run1 = open_cstore(pacs.dicom_url)
    assert run1.deliver(*first).status == "stored"
    run1.close()
    run2 = open_store(pacs.dicom_url)  # as the engine opens it, then tells it what it knows
    run2.expect(contexts=[(first[0].sop_class_uid, first[0].transfer_syntax)],  # type: ignore[attr-defined]
                duplicates=[first[0].sop_uid])
    again = run2.deliver(*first)
    assert again.status == "stored" and again.extra.get("confirmed")
    other = run2.deliver(*second)
    run2.close()
    assert other.status == "conflict" and other.code == "0x0000"
    assert other.extra["pacs_dataset_sha256"] == dataset_sha256(first[1])
    assert pacs.instance_count() == 1


def test_rejections_are_recorded_per_instance(status_scp: StatusSCP, tiny: list[tuple[Item, str]]) -> None:
    dicom = [(i, p) for i, p in tiny if i.kind == "dicom"][:6]
    wanted = {dicom[0][0].sop_uid: 0xA700, dicom[1][0].sop_uid: 0x0122,
              dicom[2][0].sop_uid: 0xC000, dicom[3][0].sop_uid: 0xB000}
    status_scp.statuses.update({k or "": v for k, v in wanted.items()})
    store = open_cstore(status_scp.url, parallel=2)
    results = _deliver_all(store, dicom)
    store.close()
    got = [(d.status, d.code) for d in results]
    assert got == [("failed", "0xA700"), ("failed", "0x0122"), ("failed", "0xC000"),
                   ("warning", "0xB000"), ("stored", "0x0000"), ("stored", "0x0000")]
    assert "Out of Resources" in (results[0].detail or "")
    assert "sop class not supported" in (results[1].detail or "").lower()
    assert "Coercion" in (results[3].detail or "")
    assert results[3].ok and not results[0].ok


def test_associations_are_reused(status_scp: StatusSCP, tiny: list[tuple[Item, str]]) -> None:
    dicom = [(i, p) for i, p in tiny if i.kind == "dicom"]
    shared = {i.sop_uid for i, _ in dicom if sum(1 for j, _ in dicom if j.sop_uid == i.sop_uid) > 1}
    dicom = [(i, p) for i, p in dicom if i.sop_uid not in shared]
    pairs = {(i.sop_class_uid or "", i.transfer_syntax or "") for i, _ in dicom}
    store = open_cstore(status_scp.url, parallel=2, contexts=pairs)
    _deliver_all(store, dicom * 3)
    store.close()
    assert len(status_scp.received) == 3 * len(dicom)
    assert status_scp.associations <= 2  # contexts known up front: one association per worker


def test_unconfirmable_duplicate_is_a_conflict(status_scp: StatusSCP,
                                               tiny: list[tuple[Item, str]]) -> None:
    """A PACS without C-GET: a shared SOP Instance UID cannot be checked, so it is not a success."""
    first, second = [(i, p) for i, p in tiny if i.kind == "dicom" and i.sop_uid and
                     sum(1 for j, _ in tiny if j.kind == "dicom" and j.sop_uid == i.sop_uid) > 1]
    store = open_cstore(status_scp.url, parallel=1)
    assert store.deliver(*first).status == "stored"
    d = store.deliver(*second)
    store.close()
    assert d.status == "conflict" and "could not be fetched back" in (d.detail or "")


def test_aborted_association_is_retried_once(status_scp: StatusSCP, tiny: list[tuple[Item, str]]) -> None:
    dicom = [(i, p) for i, p in tiny if i.kind == "dicom"][:4]
    victim = dicom[1][0].sop_uid or ""
    status_scp.abort_first.add(victim)
    store = open_cstore(status_scp.url, parallel=1)
    results = [store.deliver(*pair) for pair in dicom]
    store.close()
    assert [d.status for d in results] == ["stored"] * 4
    # Sent again on a fresh association only because the first was never acknowledged.
    assert status_scp.received.count(victim) == 2
    assert all(status_scp.received.count(i.sop_uid or "") == 1 for i, _ in dicom if i.sop_uid != victim)


def test_refused_presentation_context_fails_the_item(status_scp: StatusSCP, tmp_path: Path) -> None:
    # A SOP Class the SCP does not support at all: refused at association, recorded per item.
    obj = next(o for o in synthetic.generate(synthetic.Profile.tiny()) if o.kind == "dicom")
    ((item, path),) = write_objects([obj], tmp_path)
    odd = Item(**{**item.__dict__, "sop_class_uid": "1.2.3.4.5.6.7"})
    store = open_cstore(status_scp.url, parallel=1)
    d = store.deliver(odd, path)
    store.close()
    assert d.status == "failed" and d.code == "0x0122" and "refused" in (d.detail or "")


@pytest.mark.slow  # stops and restarts Orthanc
def test_pacs_down_mid_run_then_back(pacs: OrthancServer, tiny: list[tuple[Item, str]]) -> None:
    dicom = [(i, p) for i, p in tiny if i.kind == "dicom" and i.sop_uid][:8]
    store = open_cstore(pacs.dicom_url, parallel=2)
    store.attempts = 2
    try:
        for pair in dicom[:4]:
            assert store.deliver(*pair).status == "stored"
        pacs.kill()
        with pytest.raises(StoreUnavailable):
            store.deliver(*dicom[4])
        pacs.start()
        # The engine retries what was not acknowledged, and may re-send acknowledged ones.
        results = [store.deliver(*pair) for pair in dicom[3:]]
    finally:
        store.close()
    assert all(d.status == "stored" for d in results)
    assert pacs.instance_count() == len({i.sop_uid for i, _ in dicom})


def test_rejection_is_seen_when_the_pacs_hangs_up_at_once() -> None:
    """A PACS that sends A-ASSOCIATE-RJ and closes the connection at once (Orthanc does):
    pynetdicom then reports about 1 rejection in 5 as an abort; we still say "rejected".
    The peer is a raw socket: the timing is the fault, and a real PACS produces it only by
    chance."""
    import socket
    import struct
    import threading

    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(8)
    port = server.getsockname()[1]
    reject = bytes([0x03, 0x00]) + struct.pack(">I", 4) + bytes([0x00, 0x01, 0x01, 0x07])  # called AE unknown

    def serve() -> None:
        while True:
            try:
                conn, _ = server.accept()
            except OSError:
                return
            conn.recv(65536)  # the A-ASSOCIATE-RQ
            conn.sendall(reject)
            conn.close()

    threading.Thread(target=serve, daemon=True).start()
    try:
        for _ in range(30):
            with pytest.raises(StoreError, match="rejected the association"):
                open_cstore(f"dicom://NOTTHEPACS@127.0.0.1:{port}").check()
    finally:
        server.close()


def test_check_fails_early(pacs: OrthancServer) -> None:
    with pytest.raises(StoreError, match="rejected the association") as wrong:
        open_cstore(pacs.dicom_url.replace("ORTHANC@", "NOTTHEPACS@")).check()
    assert "calling AE" in str(wrong.value)
    from cloudexit.testing.s3server import free_port

    with pytest.raises(StoreUnavailable):
        open_cstore(f"dicom://ORTHANC@127.0.0.1:{free_port()}").check()

