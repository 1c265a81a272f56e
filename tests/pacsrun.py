"""A migrate run into an archive folder and a PACS, slowed (bwlimit) so that a test can fault the
PACS while deliveries are going on: shared by the PACS crash and hung-PACS tests."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

from dbutil import count, event_kinds, rows, wait_for

from cloudexit.testing import synthetic
from cloudexit.testing.s3server import SeaweedServer


def stored(db: Path, dest: str) -> int:
    return count(db, "dest = ? AND state = 'stored'", (dest,))


def delivery_states(db: Path, dest: str) -> dict[str, int]:
    return {r["state"]: r["n"] for r in rows(
        db, "SELECT state, count(*) AS n FROM transfers WHERE dest = ? GROUP BY state", (dest,))}


def pacs_events(db: Path) -> list[str]:
    return event_kinds(db, "migrate.pacs_%")


def start_delivering(cli: Any, s3: SeaweedServer, bucket: str, db: Path, archive: Path, dest: str,
                     instances: int, stored_first: int, *options: str) -> tuple[subprocess.Popen[str], list[Any]]:
    """Upload `instances` small CT objects, inventory them, start `migrate --to archive --to dest`
    at 1 MB/s and return once `stored_first` are stored at the PACS (the run still going)."""
    objects = synthetic.upload(s3.client(), bucket,
                               synthetic.generate(synthetic.Profile.ct_bench(instances, matrix=128)))
    assert cli("inventory", f"s3://{bucket}", "--db", str(db), "-q").exit_code == 0
    proc = subprocess.Popen([sys.executable, "-m", "cloudexit.cli", "migrate", "--to", str(archive),
                             "--to", dest, "--db", str(db), "--bwlimit", "1M", "-q", *options],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_for(proc, lambda: stored(db, dest) >= stored_first, f"{stored_first} stored at the PACS", 120)
        assert stored_first <= stored(db, dest) < len(objects)
    except BaseException:
        proc.kill()
        proc.communicate()
        raise
    return proc, objects
