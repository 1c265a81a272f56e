"""A PACS that hangs (the Orthanc process stopped with SIGSTOP: the kernel still accepts TCP
connections, nothing answers) frees a delivery thread within the configured timeouts, and the
instance is sent again once the PACS is back (SIGCONT), not lost."""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from dbutil import rows
from orthanc import OrthancServer, write_objects
from pacsrun import delivery_states, pacs_events, start_delivering

from cloudexit.core.config import PacsConfig
from cloudexit.stores import StoreUnavailable
from cloudexit.stores.cstore import open_store as open_cstore
from cloudexit.stores.dicomweb import open_store as open_dicomweb
from cloudexit.testing import synthetic
from cloudexit.testing.s3server import SeaweedServer

SHORT = PacsConfig(connect_timeout=2, acse_timeout=2, dimse_timeout=2, network_timeout=2, http_timeout=2)


@contextmanager
def hung(pacs: OrthancServer) -> Iterator[None]:
    """Orthanc stopped (SIGSTOP) for the block; always continued (SIGCONT) after."""
    assert pacs.proc is not None
    os.kill(pacs.proc.pid, signal.SIGSTOP)
    try:
        yield
    finally:
        os.kill(pacs.proc.pid, signal.SIGCONT)


def _small_dicom(tmp_path: Path, n: int) -> list[Any]:
    objects = [o for o in synthetic.generate(synthetic.Profile.tiny())
               if o.kind == "dicom" and o.case == "normal"][:n]
    return write_objects(objects, tmp_path)


def _in_thread(call: Any) -> tuple[threading.Thread, list[Any]]:
    answer: list[Any] = []

    def run() -> None:
        try:
            answer.append(call())
        except BaseException as exc:  # noqa: BLE001 - the answer the test looks at
            answer.append(exc)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, answer


def test_default_is_seconds_for_small_objects_and_grows_with_size() -> None:
    pacs = PacsConfig()
    assert pacs.answer_timeout(pacs.dimse_timeout, 500_000) < 11
    assert pacs.answer_timeout(pacs.dimse_timeout, 200 * 2**20) == pytest.approx(110)
    assert pacs.answer_timeout(pacs.dimse_timeout, 2**40) == pacs.max_timeout


@pytest.mark.slow
def test_cstore_to_a_hung_pacs_frees_its_thread(pacs: OrthancServer, tmp_path: Path) -> None:
    (first, first_path), (second, second_path) = _small_dicom(tmp_path, 2)
    store = open_cstore(pacs.dicom_url, timeouts=SHORT, parallel=1)
    try:
        assert store.deliver(first, first_path).status == "stored"  # an association now pooled
        with hung(pacs):
            started = time.monotonic()
            thread, answer = _in_thread(lambda: store.deliver(second, second_path))
            # One DIMSE wait on the pooled association, then two association attempts that wait
            # for their A-ASSOCIATE answer (plus the store's short pauses between attempts).
            bound = SHORT.dimse_timeout + 2 * SHORT.acse_timeout + 5
            thread.join(bound)
            took = time.monotonic() - started
            assert not thread.is_alive(), f"the C-STORE thread is still held after {took:.0f} s"
        assert isinstance(answer[0], StoreUnavailable), answer
        # Back: the same instance goes in on a fresh association.
        assert store.deliver(second, second_path).status == "stored"
    finally:
        store.close()
    assert pacs.find_instance(second.sop_uid)


@pytest.mark.slow
def test_stowrs_to_a_hung_pacs_frees_its_thread(pacs: OrthancServer, tmp_path: Path) -> None:
    ((item, path),) = _small_dicom(tmp_path, 1)
    store = open_dicomweb(pacs.dicomweb_url, timeouts=SHORT, parallel=1)
    try:
        with hung(pacs):
            started = time.monotonic()
            thread, answer = _in_thread(lambda: store.deliver(item, path))
            bound = store.attempts * (SHORT.http_timeout + 2) + 2
            thread.join(bound)
            assert not thread.is_alive(), f"the STOW-RS thread is still held after {time.monotonic() - started:.0f} s"
        assert isinstance(answer[0], StoreUnavailable), answer
        assert store.deliver(item, path).status == "stored"
    finally:
        store.close()


@pytest.mark.slow
def test_migrate_pauses_a_hung_pacs_and_delivers_later(cli: Any, s3: SeaweedServer, s3_env: SeaweedServer,
                                                       bucket: str, db: Path, tmp_path: Path,
                                                       pacs: OrthancServer) -> None:
    dest = pacs.dicom_url
    # Slow enough (bwlimit) that deliveries are going on when the PACS hangs.
    proc, objects = start_delivering(cli, s3, bucket, db, tmp_path / "archive", dest, 60, 5,
                                     "--dimse-timeout", "2", "--acse-timeout", "2",
                                     "--pacs-connect-timeout", "2")
    try:
        with hung(pacs):
            started = time.monotonic()
            while time.monotonic() - started < 60 and not rows(
                    db, "SELECT 1 FROM events WHERE kind = 'migrate.pacs_down'"):
                time.sleep(0.1)
            paused_after = time.monotonic() - started
            # Delivery threads freed in seconds (2 s DIMSE + 2 x 2 s association), not 300 s.
            assert paused_after < 15, paused_after
        _, err = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err
    assert delivery_states(db, dest) == {"stored": len(objects)}
    assert pacs.instance_count() == len(objects)
    kinds = pacs_events(db)
    assert kinds.index("migrate.pacs_up") > kinds.index("migrate.pacs_down")
