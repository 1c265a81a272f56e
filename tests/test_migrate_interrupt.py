"""Ctrl-C during `migrate`, in a real subprocess: it says at once what it is doing, a second
Ctrl-C stops it now, and nothing half-done reaches a final path."""

from __future__ import annotations

import hashlib
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from dbutil import rows

from cloudexit.testing import synthetic
from cloudexit.stores.filesystem import TEMP_PREFIX


def _lines(stream: object) -> queue.Queue[tuple[float, str]]:
    """The lines of a pipe as they come, with the time each arrived."""
    out: queue.Queue[tuple[float, str]] = queue.Queue()

    def pump() -> None:
        for line in stream:  # type: ignore[attr-defined]
            out.put((time.monotonic(), line))

    threading.Thread(target=pump, daemon=True).start()
    return out


def _wait_line(lines: queue.Queue[tuple[float, str]], text: str, timeout: float) -> tuple[float, str]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            at, line = lines.get(timeout=0.1)
        except queue.Empty:
            continue
        if text in line:
            return at, line
    raise AssertionError(f"no line with {text!r} within {timeout} s")


@pytest.mark.slow
def test_ctrl_c_says_at_once_and_a_second_one_stops_now(cli, s3, bucket: str, db: Path, tmp_path: Path) -> None:
    profile = synthetic.Profile(patients=1, studies_per_patient=1, ct_slices_per_series=6, ct_matrix=32,
                                cr_per_study=0, multiframe_objects=2, multiframe_bytes=6 * 2**20,
                                awkward=False, seed=3)
    objects = list(synthetic.generate(profile))  # a generator: the upload would use it up
    synthetic.upload(s3.client(), bucket, objects, part_size=5 * 2**20)
    truth = {o.sop_uid: hashlib.sha256(o.body()).hexdigest() for o in objects}
    assert cli("inventory", f"s3://{bucket}", "--db", str(db), "-q").exit_code == 0
    dest = tmp_path / "archive"
    env = {**os.environ, **s3.env(), "PYTHONPATH": os.pathsep.join(sys.path)}
    env.pop("AWS_PROFILE", None)
    # 1 MB/s: the two 6 MiB objects are still in flight when the small ones are done.
    proc = subprocess.Popen([sys.executable, "-m", "cloudexit.cli", "migrate", "--to", str(dest),
                             "--db", str(db), "--bwlimit", "1M", "--processes", "1", "-q"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    err = _lines(proc.stderr)
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:  # placed on an observed condition: rows in the DB
            if db.exists() and rows(db, "SELECT count(*) AS n FROM sqlite_master WHERE name = 'transfers'")[0]["n"] \
                    and rows(db, "SELECT count(*) AS n FROM transfers WHERE state = 'verified'")[0]["n"] >= 3 \
                    and rows(db, "SELECT count(*) AS n FROM transfers WHERE state = 'fetching'")[0]["n"] >= 1:
                break
            time.sleep(0.1)
            if proc.poll() is not None:
                break
        else:
            counts = rows(db, "SELECT state, count(*) AS n FROM transfers GROUP BY state") if db.exists() else []
            raise AssertionError(f"the migration did not get going: {[tuple(r) for r in counts]}")
        if proc.poll() is not None:
            said = []
            while not err.empty():
                said.append(err.get()[1])
            raise AssertionError(f"migrate ended before the Ctrl-C (exit {proc.returncode}): {said}")
        sent = time.monotonic()
        proc.send_signal(signal.SIGINT)
        at, line = _wait_line(err, "stopping: finishing", 5)
        assert at - sent < 2, at - sent  # at once, not after the in-flight work
        assert "objects in flight (Ctrl-C again to stop now)" in line
        again = time.monotonic()
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=30)
        stopped = time.monotonic() - again
    finally:
        if proc.poll() is None:
            proc.kill()
    rest = "".join(line for _, line in list(err.queue))
    assert proc.returncode == 130, rest
    assert stopped < 8, stopped  # the first Ctrl-C alone waits up to 10 s for the work in flight
    assert "cloudexit migrate --resume" in rest and "Traceback" not in rest
    # Nothing half-placed: every file at a final path holds its object's exact bytes. Most are
    # recorded verified; one a worker placed (verified, fsynced, renamed) as the second Ctrl-C
    # stopped the engine is not recorded yet: the resume re-verifies it before it counts.
    verified = {r["path"]: r["sha256"] for r in rows(db, "SELECT path, sha256 FROM transfers "
                                                         "WHERE state = 'verified'")}
    finals = [p for p in dest.rglob("*") if p.is_file() and not p.name.startswith(TEMP_PREFIX)]
    assert finals and verified
    for path in finals:
        rel = str(path.relative_to(dest))
        assert hashlib.sha256(path.read_bytes()).hexdigest() == (verified[rel] if rel in verified
                                                                 else truth[path.stem]), rel
    assert rows(db, "SELECT count(*) AS n FROM transfers WHERE state = 'fetching'")[0]["n"] == 0
    done = cli("migrate", "--resume", "--db", str(db), "-q")
    assert done.exit_code == 0, done.output
    # The resume took every object, the unrecorded one included, as its exact bytes.
    placed = {p.stem: hashlib.sha256(p.read_bytes()).hexdigest() for p in dest.rglob("*")
              if p.is_file() and not p.name.startswith(TEMP_PREFIX)}
    assert placed == truth
    assert rows(db, "SELECT count(*) AS n FROM transfers WHERE state = 'verified'")[0]["n"] == len(truth)
