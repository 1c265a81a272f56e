"""A PACS that dies in the middle of a delivery (kill -9 of Orthanc, as a crash or power cut would)
and comes back: the run pauses its deliveries, probes, and finishes with every instance stored
once; `status` shows the delivery progress per PACS."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest
from dbutil import rows
from orthanc import OrthancServer
from pacsrun import delivery_states, pacs_events, start_delivering, stored

from cloudexit.testing.s3server import SeaweedServer


def _verified(db: Path) -> int:
    """Copies verified in the archive (the first --to): the run keeps filling it while the PACS is down."""
    return rows(db, "SELECT count(*) AS n FROM transfers WHERE dest LIKE 'file://%' AND state = 'verified'")[0]["n"]


@pytest.mark.slow
def test_pacs_killed_mid_delivery_then_back(cli: Any, s3: SeaweedServer, s3_env: SeaweedServer,
                                            bucket: str, db: Path, tmp_path: Path,
                                            pacs: OrthancServer) -> None:
    dest = pacs.dicom_url
    # Slow enough (bwlimit) that the PACS dies while deliveries are going on.
    proc, objects = start_delivering(cli, s3, bucket, db, tmp_path / "archive", dest, 150, 10)
    try:
        stored_before = stored(db, dest)
        assert 10 <= stored_before < len(objects)
        pacs.kill()
        # The run notices, pauses deliveries (the archive keeps filling), and says so in status.
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not rows(
                db, "SELECT 1 FROM events WHERE kind = 'migrate.pacs_down'"):
            time.sleep(0.1)
        live = json.loads(cli("status", "--db", str(db), "--json").output)["migration"]
        assert live["live"] and dest in live["deliveries"]
        assert live["deliveries"][dest]["objects"] == len(objects)
        assert live["deliveries"][dest]["done"] < len(objects)
        # Back once the archive has taken 5 more copies while the PACS was down (the run goes on
        # without it), unless the archive was already complete.
        target = min(_verified(db) + 5, len(objects))
        deadline = time.monotonic() + 60
        while _verified(db) < target and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.05)
        assert proc.poll() is None, proc.communicate()
        pacs.start()
        # A C-STORE sent as the PACS died can wait out its DIMSE timeout (10 s for these small
        # objects, PacsConfig; it was 300 s) before its association counts as lost.
        _, err = proc.communicate(timeout=600)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err
    assert delivery_states(db, dest) == {"stored": len(objects)}
    # Every instance is in the PACS once; nothing lost in the crash.
    assert pacs.instance_count() == len({o.sop_uid for o in objects}) == len(objects)
    kinds = pacs_events(db)
    assert "migrate.pacs_down" in kinds and kinds.index("migrate.pacs_up") > kinds.index("migrate.pacs_down")
    text = cli("status", "--db", str(db)).output
    assert f"delivered to {dest}: {len(objects)}/{len(objects)}" in text
