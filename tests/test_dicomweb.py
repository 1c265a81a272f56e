"""STOW-RS delivery against Orthanc's DICOMweb plugin: batches, per-instance results, auth,
conflicts, the server going down and coming back."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from cloudexit.testing import synthetic
from cloudexit.core.errors import UsageError
from cloudexit.stores import Delivery, Item, Store, StoreError, StoreUnavailable, open_store
from cloudexit.stores.dicomfile import dataset_sha256
from cloudexit.stores.dicomweb import (
    DicomwebStore,
    auth_headers,
    parse_stow_response,
)
from cloudexit.stores.dicomweb import open_store as open_dicomweb
from orthanc import OrthancServer, write_objects


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> list[tuple[Item, str]]:
    return write_objects(synthetic.generate(synthetic.Profile.tiny()), tmp_path_factory.mktemp("tiny"))


class CountingStore(DicomwebStore):
    """Counts STOW-RS requests (the HTTP exchange itself is real)."""

    requests = 0

    def _stow(self, pairs: list[tuple[Item, str]]) -> list[Delivery]:
        type(self).requests += 1
        return super()._stow(pairs)


def test_tiny_pacs_in_batches_from_threads(pacs: OrthancServer, tiny: list[tuple[Item, str]]) -> None:
    store = open_store(pacs.dicomweb_url)
    assert isinstance(store, Store) and store.kind == "dicomweb" and store.id == pacs.dicomweb_url
    store.check()
    counting = CountingStore(store.base, parallel=8, batch_size=8, linger=0.2)
    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(lambda pair: counting.deliver(*pair), tiny))
    counting.close()
    dicom = [(i, p, d) for (i, p), d in zip(tiny, results) if i.kind == "dicom"]
    assert all(d.status == "failed" and d.code == "not-dicom" for (i, _), d in zip(tiny, results)
               if i.kind != "dicom")
    conflicts = [d for _, _, d in dicom if d.status == "conflict"]
    assert len(conflicts) == 1 and "kept it" in (conflicts[0].detail or "")
    assert all(d.status == "stored" for _, _, d in dicom if d.status != "conflict")
    assert CountingStore.requests < len(dicom) // 2  # batched, not one request per instance
    assert pacs.instance_count() == len({i.sop_uid for i, _, _ in dicom})
    for item, path, d in dicom:
        if d.status == "stored":  # the raw-dataset object went out as Part 10, dataset intact
            assert dataset_sha256(data=pacs.stored_file(item.sop_uid or "")) == dataset_sha256(path)


def test_deliver_many_keeps_shared_sop_uids_apart(pacs: OrthancServer, tiny: list[tuple[Item, str]]) -> None:
    dicom = [(i, p) for i, p in tiny if i.kind == "dicom"]
    shared = [(i, p) for i, p in dicom if sum(1 for j, _ in dicom if j.sop_uid == i.sop_uid) > 1]
    store = open_dicomweb(pacs.dicomweb_url, duplicates={shared[0][0].sop_uid or ""})
    results = store.deliver_many(shared + dicom[:3])
    store.close()
    assert [d.status for d in results[:2]] == ["stored", "conflict"]
    assert results[0].extra.get("confirmed")
    assert all(d.status == "stored" for d in results[2:])


def test_stow_response_reasons() -> None:
    """Warnings and failures as a DICOMweb server words them (PS3.18 Table 10.5.3-1)."""
    body = json.dumps({
        "00081199": {"vr": "SQ", "Value": [
            {"00081155": {"vr": "UI", "Value": ["1.2.3"]}},
            {"00081155": {"vr": "UI", "Value": ["1.2.4"]}, "00081196": {"vr": "US", "Value": [0xB000]}}]},
        "00081198": {"vr": "SQ", "Value": [
            {"00081155": {"vr": "UI", "Value": ["1.2.5"]}, "00081197": {"vr": "US", "Value": [0xA700]}},
            {"00081155": {"vr": "UI", "Value": ["1.2.6"]}, "00081197": {"vr": "US", "Value": [0x0122]}}]},
    }).encode()
    got = parse_stow_response(body)
    assert (got["1.2.3"].status, got["1.2.3"].code) == ("stored", "0x0000")
    assert (got["1.2.4"].status, got["1.2.4"].code) == ("warning", "0xB000")
    assert (got["1.2.5"].status, got["1.2.5"].code, got["1.2.5"].detail) == (
        "failed", "0xA700", "Refused: Out of Resources")
    assert (got["1.2.6"].status, got["1.2.6"].code) == ("failed", "0x0122")
    assert parse_stow_response(b"") == {} and parse_stow_response(b"<html>") == {}


def test_unacknowledged_instance_fails(pacs: OrthancServer, tmp_path: Path, tiny) -> None:
    """Orthanc answers 400 for a part it cannot parse and names no SOP: that item failed."""
    (item, path) = next((i, p) for i, p in tiny if i.kind == "dicom")
    broken = tmp_path / "broken.dcm"
    broken.write_bytes(Path(path).read_bytes()[:200])
    bad = Item(**{**item.__dict__, "sop_uid": "1.2.826.0.1.3680043.8.498.1", "size": 200})
    store = open_dicomweb(pacs.dicomweb_url)
    good, failed = store.deliver_many([(item, path), (bad, str(broken))])
    store.close()
    assert good.status == "stored"
    assert failed.status == "failed" and failed.code == "HTTP 400"


@pytest.mark.needs("orthanc")
@pytest.mark.slow
def test_auth_from_env_or_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, tiny) -> None:
    for name in ("CLOUDEXIT_DICOMWEB_TOKEN", "CLOUDEXIT_DICOMWEB_USER", "CLOUDEXIT_DICOMWEB_PASSWORD",
                 "CLOUDEXIT_DICOMWEB_AUTH_FILE"):
        monkeypatch.delenv(name, raising=False)
    assert auth_headers({"CLOUDEXIT_DICOMWEB_TOKEN": "t0k"}) == {"Authorization": "Bearer t0k"}
    secret = "s3cret:with-colon"
    with OrthancServer(tmp_path / "auth", users={"pacsuser": secret}) as server:
        with pytest.raises(StoreError, match="refused our credentials") as refused:
            open_store(server.dicomweb_url).check()
        assert secret not in str(refused.value)
        monkeypatch.setenv("CLOUDEXIT_DICOMWEB_USER", "pacsuser")
        monkeypatch.setenv("CLOUDEXIT_DICOMWEB_PASSWORD", "wrong")
        with pytest.raises(StoreError):
            open_store(server.dicomweb_url).check()
        monkeypatch.delenv("CLOUDEXIT_DICOMWEB_USER")
        monkeypatch.delenv("CLOUDEXIT_DICOMWEB_PASSWORD")
        auth = tmp_path / "auth.txt"
        auth.write_text(f"pacsuser:{secret}\n")
        monkeypatch.setenv("CLOUDEXIT_DICOMWEB_AUTH_FILE", str(auth))
        store = open_store(server.dicomweb_url)
        store.check()
        item, path = next((i, p) for i, p in tiny if i.kind == "dicom")
        assert store.deliver(item, path).status == "stored"
        assert secret not in repr(store) and secret not in store.id
        store.close()
    with pytest.raises(UsageError, match="credentials in the URL"):
        open_store("dicomweb+https://user:pw@pacs.example.org/dicom-web")


@pytest.mark.slow  # stops and restarts Orthanc
def test_server_down_mid_run_then_back(pacs: OrthancServer, tiny: list[tuple[Item, str]]) -> None:
    dicom = [(i, p) for i, p in tiny if i.kind == "dicom"][:6]
    store = DicomwebStore(open_dicomweb(pacs.dicomweb_url).base, attempts=2, linger=0.01)
    try:
        assert [d.status for d in store.deliver_many(dicom[:3])] == ["stored"] * 3
        pacs.kill()
        with pytest.raises(StoreUnavailable):
            store.deliver(*dicom[3])
        pacs.start()
        results = store.deliver_many(dicom[2:])  # re-sends one already acknowledged
    finally:
        store.close()
    assert all(d.status == "stored" for d in results)
    assert pacs.instance_count() == len({i.sop_uid for i, _ in dicom})


def test_wrong_url_fails_early(pacs: OrthancServer) -> None:
    with pytest.raises(StoreError, match="DICOMweb"):
        open_store(pacs.dicomweb_url.replace("/dicom-web", "/not-here")).check()
