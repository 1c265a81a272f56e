"""A PACS that dies in the middle of a delivery (kill -9 of Orthanc, as a crash or power cut would)
and comes back: the run pauses its deliveries, probes, and finishes with every instance stored
once; `status` shows the delivery progress per PACS."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from dbutil import rows
from orthanc import OrthancServer

from cloudexit.testing import synthetic
from cloudexit.testing.s3server import SeaweedServer


def _stored(db: Path, dest: str) -> int:
    return rows(db, "SELECT count(*) AS n FROM transfers WHERE dest = ? AND state = 'stored'", (dest,))[0]["n"]


def test_pacs_killed_mid_delivery_then_back(cli: Any, s3: SeaweedServer, s3_env: SeaweedServer,
                                            bucket: str, db: Path, tmp_path: Path,
                                            pacs: OrthancServer) -> None:
    objects = synthetic.upload(s3.client(), bucket,
                               synthetic.generate(synthetic.Profile.ct_bench(150, matrix=128)))
    assert cli("inventory", f"s3://{bucket}", "--db", str(db), "-q").exit_code == 0
    dest = pacs.dicom_url
    # Slow enough (bwlimit) that the PACS dies while deliveries are going on.
    proc = subprocess.Popen([sys.executable, "-m", "cloudexit.cli", "migrate", "--to", str(tmp_path / "archive"),
                             "--to", dest, "--db", str(db), "--bwlimit", "1M", "-q"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while _stored(db, dest) < 10 and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.05)
        assert proc.poll() is None, proc.communicate()
        stored_before = _stored(db, dest)
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
        time.sleep(2)
        pacs.start()
        # A C-STORE sent as the PACS died can wait out its DIMSE timeout (10 s for these small
        # objects, PacsConfig; it was 300 s) before its association counts as lost.
        _, err = proc.communicate(timeout=600)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err
    states = {r["state"]: r["n"] for r in rows(
        db, "SELECT state, count(*) AS n FROM transfers WHERE dest = ? GROUP BY state", (dest,))}
    assert states == {"stored": len(objects)}, states
    # Every instance is in the PACS once; nothing lost in the crash.
    assert pacs.instance_count() == len({o.sop_uid for o in objects}) == len(objects)
    kinds = [r["kind"] for r in rows(db, "SELECT kind FROM events WHERE kind LIKE 'migrate.pacs_%' ORDER BY id")]
    assert "migrate.pacs_down" in kinds and kinds.index("migrate.pacs_up") > kinds.index("migrate.pacs_down")
    text = cli("status", "--db", str(db)).output
    assert f"delivered to {dest}: {len(objects)}/{len(objects)}" in text
