"""migrate under faults, with real parts: the fault proxy in front of SeaweedFS, kill -9 of a
subprocess, a tmpfs that fills up, the archive-tier emulator of the proxy."""

from __future__ import annotations

import hashlib
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import psutil
from dbutil import count, rows, wait_for

from cloudexit.testing import synthetic
from cloudexit.testing.s3server import SeaweedServer
from cloudexit.stores.claim import RESERVED




def state_counts(db: Path) -> dict[str, int]:
    return {r["state"]: r["n"] for r in rows(db, "SELECT state, count(*) AS n FROM transfers GROUP BY 1")}


def check_archive(db: Path, dest: Path, objects: list[synthetic.SyntheticObject]) -> None:
    """Every object verified once, byte-identical, no temp file left anywhere."""
    truth = {o.key: o for o in objects}
    found = {r["key"]: r for r in rows(db, "SELECT * FROM transfers")}
    assert set(found) == set(truth)
    for key, row in found.items():
        assert row["state"] in ("verified", "quarantined", "duplicate"), (key, row["state"], row["reason"])
        if row["state"] == "duplicate":
            continue
        body = truth[key].body()
        assert (dest / row["path"]).read_bytes() == body, key
        assert row["sha256"] == hashlib.sha256(body).hexdigest()
    assert not [p for p in dest.rglob(".cloudexit-*") if p.name not in RESERVED]  # no temp files
    assert len([p for p in dest.rglob("*") if p.is_file() and p.name not in RESERVED]) == len(found)


def migrate_ranged(cli, db: Path, dest: Path, proxy) -> object:
    """migrate through the proxy, the 20 MiB object in 4 MiB ranges."""
    return cli("migrate", "--to", str(dest), "--db", str(db), "--endpoint-url", proxy.endpoint_url,
               "--large-object", str(8 * 2**20), "--range-size", str(4 * 2**20), "-q")


@pytest.fixture(scope="module")
def ct_bucket(s3: SeaweedServer) -> tuple[str, list[synthetic.SyntheticObject]]:
    """40 CT slices (~0.5 MB) and one 20 MiB multipart object, uploaded once for this module."""
    bucket = f"faults-{os.getpid()}"
    profile = synthetic.Profile(patients=2, studies_per_patient=1, ct_slices_per_series=20,
                                cr_per_study=0, multiframe_objects=1, multiframe_bytes=20 * 2**20,
                                awkward=False, seed=7)
    objects = synthetic.upload(s3.client(), bucket, synthetic.generate(profile), part_size=5 * 2**20)
    return bucket, objects


@pytest.fixture
def ct_db(cli, ct_bucket, db: Path) -> Path:
    result = cli("inventory", f"s3://{ct_bucket[0]}", "--db", str(db), "-q")
    assert result.exit_code == 0, result.output
    return db


@pytest.mark.slow
def test_faults_are_detected_and_retried(cli, ct_bucket, ct_db: Path, tmp_path: Path, fault_proxy) -> None:
    bucket, objects = ct_bucket
    keys = [o.key for o in objects if not o.multipart]
    big = next(o.key for o in objects if o.multipart)
    fault_proxy.status(503, "SlowDown", method="GET", key=keys[0], times=2)
    fault_proxy.status(500, method="GET", key=keys[1], times=1)
    fault_proxy.drop(method="GET", key=keys[2], times=2)
    fault_proxy.drop(after_bytes=100_000, method="GET", key=keys[3], times=1)
    fault_proxy.truncate(at=200_000, key=keys[4], times=2)
    fault_proxy.flip(offset=300_000, key=keys[5], times=2)  # pixel data: only the hashes notice
    fault_proxy.flip(offset=200, key=keys[6], times=1)  # the header
    fault_proxy.flip(offset=7_000_000, key=big, times=1)  # inside a ranged part of the large object
    fault_proxy.truncate(at=1_000_000, key=big, times=1)
    dest = tmp_path / "archive"
    result = migrate_ranged(cli, ct_db, dest, fault_proxy)
    assert result.exit_code == 0, result.output
    check_archive(ct_db, dest, objects)
    run = rows(ct_db, "SELECT * FROM migration_runs")[0]
    assert run["retries"] >= 11
    assert run["bytes_downloaded"] > sum(o.size for o in objects)  # retries are counted
    assert fault_proxy.count("GET", key=keys[5]) == 3 and fault_proxy.count("GET", key=keys[6]) == 2


@pytest.mark.slow
def test_kill_9_at_random_points_then_resume(s3_env, ct_bucket, ct_db: Path, tmp_path: Path,
                                            fault_proxy) -> None:
    """kill -9 (engine and workers) at random moments; every object ends verified exactly once,
    and no verified object is ever fetched again."""
    bucket, objects = ct_bucket
    dest = tmp_path / "archive"
    cmd = [sys.executable, "-m", "cloudexit.cli", "migrate", "--db", str(ct_db), "--endpoint-url",
           fault_proxy.endpoint_url, "--bwlimit", "6M", "--large-object", str(8 * 2**20),
           "--range-size", str(2 * 2**20), "-q"]
    rng = random.Random(4)
    verified: set[str] = set()
    for round_ in range(4):
        proc = subprocess.Popen(cmd + (["--to", str(dest)] if round_ == 0 else ["--resume"]),
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
        # Wait until this round has really started (its heartbeat moved), then a random moment.
        beat = rows(ct_db, "SELECT max(heartbeat_at) AS b FROM migration_runs")[0]["b"] \
            if round_ else None

        def started(beat: str | None = beat, proc: subprocess.Popen[bytes] = proc) -> bool:
            now_beat = rows(ct_db, "SELECT max(heartbeat_at) AS b, max(pid) AS p FROM migration_runs")[0]
            return bool(now_beat["b"] and now_beat["b"] != beat and now_beat["p"] == proc.pid)

        wait_for(proc, started, f"round {round_ + 1} started")
        # A random kill point, placed on what the run has done: 1 to 5 more objects verified in
        # the DB, or 0.5 to 8 MiB more through the proxy (its counters were reset after the last
        # round), wherever that falls in an object or a range.
        if rng.random() < 0.5:
            target = count(ct_db, "state = 'verified'") + rng.randint(1, 5)
            wait_for(proc, lambda target=target: count(ct_db, "state = 'verified'") >= target,
                     f"{target} objects verified")
        else:
            wire = int(rng.uniform(0.5, 8) * 2**20)
            wait_for(proc, lambda wire=wire: fault_proxy.bytes_sent >= wire, f"{wire} bytes through the proxy")
        os.killpg(proc.pid, signal.SIGKILL)  # the engine and its workers, as a power cut would
        proc.wait()
        # Nothing verified before this round was fetched again in it.
        again = [s.key for s in fault_proxy.requests if s.method == "GET" and s.key in verified]
        assert not again, again
        fault_proxy.reset_counters()
        verified = {r["key"] for r in rows(ct_db, "SELECT key FROM transfers WHERE state = 'verified'")}
    result = subprocess.run(cmd + ["--resume"], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    again = [s.key for s in fault_proxy.requests if s.method == "GET" and s.key in verified]
    assert not again, again
    check_archive(ct_db, dest, objects)
    run = rows(ct_db, "SELECT * FROM migration_runs")[0]
    assert run["resumed"] == 4


@pytest.mark.slow
def test_kill_9_while_small_objects_run_many_at_once(s3_env, ct_bucket, ct_db: Path, tmp_path: Path,
                                                     fault_proxy) -> None:
    """No bandwidth limit, so the slices go through each worker's loop of many GETs
    (`multiget`); kill -9 of everything twice, then --resume: all verified once, none fetched
    again once verified, no temp file left."""
    bucket, objects = ct_bucket
    fault_proxy.delay(0.5, method="GET")  # slow GETs, 4 at once: the kills land mid-run
    dest = tmp_path / "archive"
    cmd = [sys.executable, "-m", "cloudexit.cli", "migrate", "--db", str(ct_db), "--endpoint-url",
           fault_proxy.endpoint_url, "--processes", "1", "--threads", "2", "-q"]
    verified: set[str] = set()
    for round_ in range(2):
        proc = subprocess.Popen(cmd + (["--to", str(dest)] if round_ == 0 else ["--resume"]),
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
        # Killed once this round verified 3 more objects (with GETs of the next ones in flight).
        target = len(verified) + 3
        wait_for(proc, lambda target=target: count(ct_db, "state = 'verified'") >= target, f"{target} objects verified")
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        again = [s.key for s in fault_proxy.requests if s.method == "GET" and s.key in verified]
        assert not again, again
        fault_proxy.reset_counters()
        verified = {r["key"] for r in rows(ct_db, "SELECT key FROM transfers WHERE state = 'verified'")}
    assert 0 < len(verified) < len(objects)  # the kills did land in the middle
    result = subprocess.run(cmd + ["--resume"], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    again = [s.key for s in fault_proxy.requests if s.method == "GET" and s.key in verified]
    assert not again, again
    check_archive(ct_db, dest, objects)


@pytest.mark.slow
def test_a_worker_killed_alone_stops_the_run_cleanly(s3_env, ct_bucket, ct_db: Path, tmp_path: Path,
                                                     fault_proxy) -> None:
    """kill -9 of one worker process (the OOM killer's way): the engine notices, stops with a
    clear message instead of waiting for ever, and --resume finishes the job."""
    bucket, objects = ct_bucket
    fault_proxy.delay(0.15, method="GET")
    dest = tmp_path / "archive"
    cmd = [sys.executable, "-m", "cloudexit.cli", "migrate", "--db", str(ct_db), "--endpoint-url",
           fault_proxy.endpoint_url, "-q"]
    proc = subprocess.Popen(cmd + ["--to", str(dest)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)
    # The victim: a child of the migrate process with a connection open to the proxy, i.e. a
    # worker fetching (found by what it does, not by multiprocessing's process names).
    engine = psutil.Process(proc.pid)

    def fetching_worker() -> psutil.Process | None:
        for child in engine.children():
            try:
                if any(c.raddr and c.raddr.port == fault_proxy.port for c in child.net_connections("tcp")):
                    return child
            except psutil.Error:  # ended meanwhile
                continue
        return None

    wait_for(proc, lambda: fetching_worker() is not None, "a worker connected to the proxy")
    victim = fetching_worker()
    assert victim is not None
    victim.kill()
    err, _ = proc.communicate(timeout=60)
    assert proc.returncode == 1, err
    assert "worker process" in err and "ended unexpectedly" in err and "cloudexit migrate --resume" in err
    fault_proxy.clear()
    result = subprocess.run(cmd + ["--resume"], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    check_archive(ct_db, dest, objects)


@pytest.mark.slow
def test_the_engine_killed_alone_takes_its_workers_with_it(s3_env, ct_bucket, ct_db: Path, tmp_path: Path,
                                                           fault_proxy) -> None:
    """kill -9 of the engine only (not its process group): its workers end at once too
    (PR_SET_PDEATHSIG), so no orphaned writer goes on in the archive. (A fork server would
    keep them: every child it forks holds the server's own "engine alive" pipe.)"""
    fault_proxy.delay(0.15, method="GET")
    cmd = [sys.executable, "-m", "cloudexit.cli", "migrate", "--db", str(ct_db), "--endpoint-url",
           fault_proxy.endpoint_url, "-q", "--to", str(tmp_path / "archive")]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    engine = psutil.Process(proc.pid)

    def fetching() -> list[psutil.Process]:
        found = []
        for child in engine.children(recursive=True):
            try:
                if any(c.raddr and c.raddr.port == fault_proxy.port for c in child.net_connections("tcp")):
                    found.append(child)
            except psutil.Error:
                continue
        return found

    wait_for(proc, lambda: bool(fetching()), "a worker connected to the proxy")
    family = engine.children(recursive=True)
    engine.kill()
    proc.wait(timeout=30)
    _, alive = psutil.wait_procs(family, timeout=10)
    assert not alive, [(p.pid, p.name(), p.cmdline()[:3]) for p in alive]


@pytest.mark.slow
def test_partial_files_resume_with_range(s3, s3_env, bucket: str, db: Path, tmp_path: Path,
                                         fault_proxy, cli) -> None:
    """A kill in the middle of a large (ranged) and a small (streamed) object: the bytes on
    disk are kept and only the rest is fetched."""
    profile = synthetic.Profile(patients=1, studies_per_patient=1, ct_slices_per_series=0,
                                cr_per_study=1, cr_matrix=1800, multiframe_objects=1,
                                multiframe_bytes=24 * 2**20, awkward=False, seed=11)
    objects = synthetic.upload(s3.client(), bucket, synthetic.generate(profile), part_size=5 * 2**20)
    assert cli("inventory", f"s3://{bucket}", "--db", str(db), "-q").exit_code == 0
    total = sum(o.size for o in objects)
    dest = tmp_path / "archive"
    cmd = [sys.executable, "-m", "cloudexit.cli", "migrate", "--db", str(db), "--endpoint-url",
           fault_proxy.endpoint_url, "--large-object", str(16 * 2**20), "--range-size", str(2 * 2**20),
           "-q"]
    proc = subprocess.Popen(cmd + ["--to", str(dest), "--bwlimit", "4M"], start_new_session=True,
                            stderr=subprocess.DEVNULL)
    # Part-way, and the DB has recorded a range on disk (the proxy's count runs ahead of what
    # the client read by its socket buffers, several MB on loopback).
    wait_for(proc, lambda: fault_proxy.bytes_sent > total * 0.4 and bool(rows(db, "SELECT 1 FROM transfer_ranges")),
             "a range on disk part-way through")
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    fault_proxy.reset_counters()
    result = subprocess.run(cmd + ["--resume"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    check_archive(db, dest, objects)
    run = rows(db, "SELECT * FROM migration_runs")[0]
    assert run["bytes_resumed"] >= 2**20
    # The resumed run fetched only what was not on disk yet.
    # (64 KiB: the answers of the endpoint checks, ListObjects XML)
    assert fault_proxy.bytes_sent <= total - run["bytes_resumed"] + 65536, (fault_proxy.bytes_sent, total)


@pytest.mark.slow
def test_link_down_and_back(s3_env, ct_bucket, ct_db: Path, tmp_path: Path, fault_proxy) -> None:
    bucket, objects = ct_bucket
    dest = tmp_path / "archive"
    proc = subprocess.Popen([sys.executable, "-m", "cloudexit.cli", "migrate", "--to", str(dest),
                             "--db", str(ct_db), "--endpoint-url", fault_proxy.endpoint_url,
                             "--bwlimit", "8M", "-q"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    # Cut the link once objects are moving (a fixed sleep raced the start-up on a busy machine).
    wait_for(proc, lambda: count(ct_db, "state = 'verified'"), "an object verified")
    fault_proxy.down()
    deadline = time.monotonic() + 60
    waiting = None
    while time.monotonic() < deadline and not waiting:
        time.sleep(0.3)
        found = rows(ct_db, "SELECT waiting_since FROM migration_runs")
        waiting = found[0]["waiting_since"] if found else None
    ended = proc.poll()
    assert waiting, ("the run never noticed the link was down: "
                     + (f"it ended ({ended}): {proc.communicate()[1][-2000:]}" if ended is not None else "still running"))
    status = subprocess.run([sys.executable, "-m", "cloudexit.cli", "status", "--db", str(ct_db)],
                            capture_output=True, text=True)
    assert "waiting for the link since" in status.stdout
    # The link comes back once the waiting run has probed it and been refused at least once more.
    refused = fault_proxy.resets
    wait_for(proc, lambda: fault_proxy.resets > refused, "a probe of the link while it was down")
    fault_proxy.up()
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    check_archive(ct_db, dest, objects)
    run = rows(ct_db, "SELECT * FROM migration_runs")[0]
    assert run["link_outages"] == 1 and run["waiting_since"] is None
    kinds = [r["kind"] for r in rows(ct_db, "SELECT kind FROM events")]
    assert "migrate.link_down" in kinds and "migrate.link_up" in kinds


@pytest.mark.slow
def test_expired_credentials_stop_cleanly_and_resume(cli, ct_bucket, ct_db: Path, tmp_path: Path,
                                                     fault_proxy) -> None:
    bucket, objects = ct_bucket
    rule = fault_proxy.status(400, "ExpiredToken", message="The provided token has expired.",
                              method="GET", key=r"\.dcm$")
    dest = tmp_path / "archive"
    result = cli("migrate", "--to", str(dest), "--db", str(ct_db), "--endpoint-url",
                 fault_proxy.endpoint_url)
    assert result.exit_code == 1
    assert "refused the credentials" in result.output and "migrate --resume" in result.output
    assert rows(ct_db, "SELECT status FROM migration_runs")[0]["status"] == "stopped"
    # Nothing half-done at a final path: the objects the rule refused are not there, and what
    # is there (keys the rule does not match, fetched before the stop) is verified and whole.
    refused = {o.key for o in objects if o.key.endswith(".dcm")}
    verified = {r["path"]: r["key"] for r in rows(ct_db, "SELECT key, path FROM transfers WHERE state = 'verified'")}
    truth = {o.key: o for o in objects}
    for p in dest.rglob("*.dcm"):
        key = verified[str(p.relative_to(dest))]
        assert key not in refused and p.read_bytes() == truth[key].body()
    fault_proxy.remove(rule)
    result = cli("migrate", "--resume", "--db", str(ct_db), "--endpoint-url", fault_proxy.endpoint_url, "-q")
    assert result.exit_code == 0, result.output
    check_archive(ct_db, dest, objects)


@pytest.fixture
def small_tmpfs(tmp_path: Path):
    mount = tmp_path / "small"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=12m,mode=0700", "tmpfs", str(mount)],
                          capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


@pytest.mark.slow
def test_disk_full_stops_cleanly_then_resumes(cli, ct_bucket, ct_db: Path, small_tmpfs: Path) -> None:
    bucket, objects = ct_bucket
    dest = small_tmpfs / "archive"
    result = cli("migrate", "--to", str(dest), "--db", str(ct_db), "--large-object", str(8 * 2**20))
    assert result.exit_code == 1, result.output
    assert "cannot take more" in result.output and "No space left" in result.output
    assert "free space" in result.output and "migrate --resume" in result.output
    # Whatever is at a final path is complete and verified.
    for r in rows(ct_db, "SELECT * FROM transfers WHERE state = 'verified'"):
        assert hashlib.sha256((dest / r["path"]).read_bytes()).hexdigest() == r["sha256"]
    finals = {str(p.relative_to(dest)) for p in dest.rglob("*.dcm")}
    assert finals == {r["path"] for r in rows(ct_db, "SELECT path FROM transfers WHERE state = 'verified'")}
    subprocess.run(["mount", "-o", "remount,size=64m", str(small_tmpfs)], check=True)
    result = cli("migrate", "--resume", "--db", str(ct_db), "-q")
    assert result.exit_code == 0, result.output
    check_archive(ct_db, dest, objects)


@pytest.fixture
def read_only():
    """make(path) makes a folder read-only, fix() undoes it: chmod 0500 for a normal user; as
    root (who writes through permission bits) a read-only tmpfs mounted on it."""
    made: list[tuple[Path, bool]] = []

    def make(path: Path) -> None:
        path.mkdir(parents=True, exist_ok=True)
        if os.geteuid() != 0:
            path.chmod(0o500)
            made.append((path, False))
            return
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m,mode=0700,ro", "tmpfs", str(path)],
                              capture_output=True, text=True, check=False)
        if done.returncode != 0:
            pytest.skip(f"cannot mount a read-only tmpfs here: {done.stderr.strip()}")
        made.append((path, True))

    def fix() -> None:
        while made:
            path, mounted = made.pop()
            if mounted:
                subprocess.run(["umount", "-l", str(path)], check=True)
            else:
                path.chmod(0o700)

    yield make, fix
    fix()


@pytest.mark.slow
def test_archive_not_writable_stops_clearly_and_loses_nothing(cli, ct_bucket, ct_db: Path, tmp_path: Path,
                                                               read_only) -> None:
    _bucket, objects = ct_bucket
    make, fix = read_only
    dest = tmp_path / "archive"
    # 1. The whole archive folder: refused before anything moves.
    make(dest)
    result = cli("migrate", "--to", str(dest), "--db", str(ct_db))
    assert result.exit_code == 1, result.output
    assert f"the archive folder {dest} is not writable" in result.output
    assert "fix its permissions or mount" in result.output
    assert not rows(ct_db, "SELECT key FROM transfers WHERE state = 'verified'")
    fix()
    # 2. One study folder, found read-only while the run goes on: the run stops, names the
    # folder and what to do; that study's objects stay queued, nothing half-done at a final path.
    study = next(o.study_uid for o in objects if o.kind == "dicom")
    make(dest / study)
    result = cli("migrate", "--to", str(dest), "--db", str(ct_db), "--large-object", str(8 * 2**20))
    assert result.exit_code == 1, result.output
    assert f"the archive at {dest} is not writable" in result.output
    assert str(dest / study) in result.output
    assert "Read-only file system" in result.output or "Permission denied" in result.output
    assert "make that folder writable" in result.output and "migrate --resume" in result.output
    states = {r["key"]: r["state"] for r in rows(ct_db, "SELECT key, state FROM transfers")}
    blocked = [o.key for o in objects if o.study_uid == study]
    assert blocked and all(states[k] == "queued" for k in blocked), states
    for r in rows(ct_db, "SELECT * FROM transfers WHERE state = 'verified'"):
        assert hashlib.sha256((dest / r["path"]).read_bytes()).hexdigest() == r["sha256"]
    fix()
    result = cli("migrate", "--resume", "--db", str(ct_db), "-q")
    assert result.exit_code == 0, result.output
    check_archive(ct_db, dest, objects)


@pytest.mark.slow
def test_archived_objects_are_restored_meanwhile(cli, ct_bucket, db: Path, tmp_path: Path,
                                                 fault_proxy) -> None:
    """The proxy emulates the GLACIER tier (SeaweedFS records a class but serves anyway)."""
    bucket, objects = ct_bucket
    archived = [o for o in objects if not o.multipart][:3]
    for o in archived:
        fault_proxy.archive(f"^{o.key}$", "GLACIER", restore_delay=2.0)
    # Through the emulator, the inventory sees GLACIER and cannot read those headers: it leaves
    # them to migrate, which restores them (exit 0: no retry of the inventory would read them).
    inv = cli("inventory", f"s3://{bucket}", "--db", str(db), "--endpoint-url", fault_proxy.endpoint_url, "-q")
    assert inv.exit_code == 0, inv.output
    fault_proxy.reset_counters()
    dest = tmp_path / "archive"
    result = cli("migrate", "--to", str(dest), "--db", str(db), "--endpoint-url", fault_proxy.endpoint_url,
                 "--restore-poll", "1", "--restore-tier", "standard", "-q")
    assert result.exit_code == 0, result.output
    check_archive(db, dest, objects)
    restores = rows(db, "SELECT * FROM restores")
    assert {r["key"] for r in restores} == {o.key for o in archived}
    assert all(r["status"] == "restored" and r["tier"] == "Standard" for r in restores)
    assert fault_proxy.count("POST") == 3  # one RestoreObject each
    run = rows(db, "SELECT * FROM migration_runs")[0]
    assert run["restore_requests"] == 3
    # The others did not wait for the restores.
    order = [s.key for s in fault_proxy.requests if s.method == "GET" and s.key]
    first_archived = min(order.index(o.key) for o in archived if o.key in order)
    assert first_archived > len(objects) - len(archived) - 5


@pytest.mark.slow
def test_bwlimit_holds_the_rate(cli, ct_bucket, ct_db: Path, tmp_path: Path) -> None:
    bucket, objects = ct_bucket
    total = sum(o.size for o in objects)
    limit = 8 * 2**20  # "8M" in rclone's syntax: 8 MiB/s
    started = time.monotonic()
    result = cli("migrate", "--to", str(tmp_path / "a"), "--db", str(ct_db), "--bwlimit", "8M", "-q")
    elapsed = time.monotonic() - started
    assert result.exit_code == 0
    rate = total / elapsed
    assert rate <= limit * 1.05, (rate, limit)
    assert rate >= limit * 0.6, (rate, limit)


@pytest.mark.slow
def test_a_412_or_short_length_from_a_middlebox_is_not_a_change(cli, ct_bucket, ct_db: Path, tmp_path: Path,
                                                                fault_proxy) -> None:
    """Something on the way answers 412, or rewrites Content-Length shorter, while the source
    still has the inventoried version (HEAD shows the same ETag): a transport fault, retried. The
    tamper-evident log gets no "changed at the source" event and the objects are not marked
    changed."""
    bucket, objects = ct_bucket
    keys = [o.key for o in objects if not o.multipart]
    big = next(o.key for o in objects if o.multipart)
    fault_proxy.shorten(by=1000, key=keys[0], times=2)
    fault_proxy.status(412, "PreconditionFailed", method="GET", key=keys[1], times=1)
    fault_proxy.status(412, "PreconditionFailed", method="GET", key=big, times=1)  # one of its ranges
    dest = tmp_path / "archive"
    result = migrate_ranged(cli, ct_db, dest, fault_proxy)
    assert result.exit_code == 0, result.output
    check_archive(ct_db, dest, objects)
    assert not rows(ct_db, "SELECT * FROM events WHERE kind = 'migrate.changed'")
    assert not rows(ct_db, "SELECT key FROM objects WHERE change = 'changed'")
    assert fault_proxy.count("GET", key=keys[0]) >= 3 and fault_proxy.count("GET", key=keys[1]) >= 2
