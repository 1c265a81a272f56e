"""`migrate --cluster`: real `dask scheduler` and `dask worker` processes on loopback, with
SeaweedFS; the result compared object for object with the single-machine run."""

from __future__ import annotations

import hashlib
import json
import re
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from dasknodes import node_env
from dbutil import count, rows, wait_for

import cloudexit
from cloudexit.cluster.address import parse
from cloudexit.core.errors import UsageError
from cloudexit.stores.filesystem import TEMP_PREFIX
from cloudexit.testing import synthetic
from cloudexit.testing.s3server import free_port

import dask  # installed with distributed

# Every test here starts dask schedulers and worker processes (seconds each, 10 s to tear down).
pytestmark = pytest.mark.slow


def _tree(root: Path) -> dict[str, str]:
    """Every file under `root` (relative path -> SHA-256), the cluster's token files aside."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in root.rglob("*") if p.is_file() and not p.name.startswith(".cloudexit-")}


def _outcome(db: Path) -> dict[str, tuple[str, str, str]]:
    return {r["key"]: (r["state"], r["path"], r["sha256"])
            for r in rows(db, "SELECT key, state, path, sha256 FROM transfers")}


def _temps(root: Path) -> list[Path]:
    return [p for p in root.rglob(f"{TEMP_PREFIX}*") if p.name.endswith(".part")]


def _inventory(cli: Any, bucket: str, db: Path) -> None:
    result = cli("inventory", f"s3://{bucket}", "--db", str(db), "-q")
    assert result.exit_code == 0, result.output


def _migrate(db: Path, *args: str, env: dict[str, str], stderr: Path | None = None) -> subprocess.Popen[str]:
    """`cloudexit migrate` in a process of its own; its stderr piped, or into the file `stderr`
    (to watch it while the run goes on)."""
    err: Any = subprocess.PIPE if stderr is None else open(stderr, "w")  # noqa: SIM115 - the child holds it
    return subprocess.Popen([sys.executable, "-m", "cloudexit.cli", "migrate", "--db", str(db), *args],
                            stdout=subprocess.PIPE, stderr=err, text=True, env=env)


# -- fast: what --cluster accepts and refuses --------------------------------------------------------
def test_cluster_addresses() -> None:
    assert parse("tcp://10.0.0.5:8786").url == "tcp://10.0.0.5:8786"
    assert parse("tls://scheduler.example.org").port == 8786
    assert parse("local:3").workers == 3
    assert parse("tcp://127.0.0.1:8786").loopback and parse("local:1").loopback
    assert not parse("tcp://10.0.0.5:8786").loopback
    for bad, says in [("tcp://[::1:8786", "not an address"), ("tcp://host:99999", "the port is not a number"),
                      ("tcp://host:0", "the port is not a number from 1 to 65535"),
                      ("local:0", "1 to 256"), ("http://x:1", "give tcp://HOST:PORT")]:
        with pytest.raises(UsageError, match=re.escape(says)):
            parse(bad)


def test_credentials_forwarding_refused_over_plain_tcp_to_another_machine(cli, awkward: str, db: Path,
                                                                          tmp_path: Path) -> None:
    _inventory(cli, awkward, db)
    result = cli("migrate", "--to", str(tmp_path / "archive"), "--db", str(db), "--cluster",
                 "tcp://10.11.12.13:8786", "--cluster-credentials", "forward")
    assert result.exit_code == 2, result.output
    assert ("--cluster-credentials forward refused: tcp://10.11.12.13:8786 is plain tcp:// to another "
            "machine, so the S3 secret key would cross the network unencrypted") in result.output
    assert "tls://" in result.output and "Traceback" not in result.output
    bad = cli("migrate", "--to", str(tmp_path / "archive"), "--db", str(db), "--cluster", "http://x:1")
    assert bad.exit_code == 2 and "give tcp://HOST:PORT, tls://HOST:PORT or local:N" in bad.output

    def refused(*args: str) -> str:
        result = cli("migrate", "--to", str(tmp_path / "archive"), "--db", str(db), *args)
        assert result.exit_code == 2 and "Traceback" not in result.output, result.output
        return result.output

    # A wait that cannot be read names its option.
    assert "--cluster-wait: cannot read duration 'soon'" in refused("--cluster", "local:1", "--cluster-wait", "soon")
    # tls:// needs dask's certificates: without them dask raised a TypeError from its connect.
    assert "dask has no TLS certificates configured" in refused("--cluster", "tls://127.0.0.1:8786")
    with dask.config.set({"distributed.comm.tls.ca-file": str(tmp_path / "no-ca.pem"),
                          "distributed.comm.tls.client.cert": str(tmp_path / "no-cert.pem")}):
        assert "dask's TLS settings cannot be used" in refused("--cluster", "tls://127.0.0.1:8786")
    with pytest.MonkeyPatch.context() as mp:  # dask not installed (None in sys.modules: ImportError)
        mp.setitem(sys.modules, "distributed", None)
        assert "pip install 'cloudexit[cluster]'" in refused("--cluster", "local:1")
    assert not (tmp_path / "archive").exists()  # refused before the run touched DEST


# -- real scheduler and workers ----------------------------------------------------------------------
def test_two_workers_give_the_single_machine_result(cli, s3, awkward: str, tmp_path: Path, dask_nodes) -> None:
    alone_db, cluster_db = tmp_path / "alone" / "c.db", tmp_path / "cluster" / "c.db"
    _inventory(cli, awkward, alone_db)
    _inventory(cli, awkward, cluster_db)
    alone = cli("migrate", "--to", str(tmp_path / "a"), "--db", str(alone_db), "-q")
    dask_nodes.worker("w1")
    dask_nodes.worker("w2")
    dask_nodes.wait_for(2)
    proc = _migrate(cluster_db, "--to", str(tmp_path / "b"), "--cluster", dask_nodes.address,
                    env=node_env(s3))
    _out, err = proc.communicate(timeout=120)
    assert proc.returncode == alone.exit_code, err
    assert "dask dashboard: http://127.0.0.1:" in err
    assert _outcome(cluster_db) == _outcome(alone_db)
    assert _tree(tmp_path / "b") == _tree(tmp_path / "a")
    assert not _temps(tmp_path / "b")
    fetched = rows(cluster_db, "SELECT worker, count(*) AS n FROM transfers WHERE state IN "
                               "('verified', 'quarantined') GROUP BY worker")
    assert {r["worker"] for r in fetched} <= {"w1", "w2"} and sum(r["n"] for r in fetched)
    status = json.loads(cli("status", "--db", str(cluster_db), "--json").output)
    seen = status["migration"]["workers"]
    assert {w["worker"] for w in seen} == {r["worker"] for r in fetched}
    assert sum(w["objects"] for w in seen) == sum(r["n"] for r in fetched)
    assert all(w["last_seen"] and w["bytes"] > 0 and w["errors"] == 0 for w in seen)
    assert not list((tmp_path / "b").glob(".cloudexit-cluster-*"))  # the DEST token is removed


def test_local_cluster(cli, awkward: str, db: Path, tmp_path: Path) -> None:
    _inventory(cli, awkward, db)
    result = cli("migrate", "--to", str(tmp_path / "archive"), "--db", str(db), "--cluster", "local:2", "-q")
    assert result.exit_code in (0, 3), result.output
    left = rows(db, "SELECT count(*) AS n FROM transfers WHERE state IN ('queued', 'fetching')")[0]["n"]
    assert left == 0
    assert rows(db, "SELECT count(DISTINCT worker) AS n FROM transfers WHERE worker IS NOT NULL")[0]["n"] >= 1


def test_worker_with_another_folder_at_dest_is_refused(cli, s3, awkward: str, db: Path, tmp_path: Path,
                                                       dask_nodes) -> None:
    if os.geteuid() != 0 or subprocess.run(["unshare", "-m", "true"], check=False, capture_output=True).returncode:
        pytest.skip("needs a mount namespace (root and unshare) to give one worker another folder at DEST")
    _inventory(cli, awkward, db)
    dest, other = tmp_path / "archive", tmp_path / "elsewhere"
    dest.mkdir()
    other.mkdir()
    dask_nodes.worker("good")
    # The other worker sees another folder at the archive's path, as a machine that mounted
    # the wrong share would.
    dask_nodes.worker("wrong-mount", wrap=["unshare", "-m", "--propagation", "private", "sh", "-c",
                                           f'mount --bind "{other}" "{dest}" && exec "$0" "$@"'])
    dask_nodes.wait_for(2)
    proc = _migrate(db, "--to", str(dest), "--cluster", dask_nodes.address, env=node_env(s3))
    _out, err = proc.communicate(timeout=120)
    assert proc.returncode == 1, err
    assert "dask worker(s) cannot take part in this migration: wrong-mount:" in err
    assert f"this worker does not see the same archive at {dest}" in err
    assert "good" not in err.split("cannot take part")[1].split("\n")[0]
    assert "--cluster-min-workers" in err and "Traceback" not in err
    # With --cluster-min-workers 1 the run goes on without it, saying so.
    proc = _migrate(db, "--to", str(dest), "--cluster", dask_nodes.address, "--cluster-min-workers", "1",
                    env=node_env(s3))
    _out, err = proc.communicate(timeout=120)
    assert proc.returncode in (0, 3), err
    assert "warning: dask worker left out: wrong-mount:" in err
    assert {r["worker"] for r in rows(db, "SELECT DISTINCT worker FROM transfers WHERE worker IS NOT NULL")} \
        == {"good"}
    assert not list(other.rglob("*"))


def test_a_worker_on_other_cloudexit_code_is_refused(cli, s3, awkward: str, db: Path, tmp_path: Path,
                                                     dask_nodes) -> None:
    """Tasks and results travel as pickles of cloudexit's classes: a worker on other code would
    fail every batch, and a failed batch runs again without end. It is named and refused at
    admission, by migrate and by inventory."""
    other = tmp_path / "other-release"
    shutil.copytree(Path(cloudexit.__file__).parent, other / "cloudexit",
                    ignore=shutil.ignore_patterns("__pycache__"))
    with open(other / "cloudexit" / "transfer" / "fetch.py", "a", encoding="utf-8") as f:
        f.write("\n# a patched copy\n")
    dask_nodes.worker("good")
    dask_nodes.worker("old-code", pythonpath=str(other))
    dask_nodes.wait_for(2)
    spread = subprocess.run([sys.executable, "-m", "cloudexit.cli", "inventory", f"s3://{awkward}", "--db",
                             str(tmp_path / "spread.db"), "--cluster", dask_nodes.address],
                            capture_output=True, text=True, env=node_env(s3), timeout=120)
    assert spread.returncode == 1, spread.stderr
    assert "cannot take part in this inventory: old-code: it runs other cloudexit code" in spread.stderr
    _inventory(cli, awkward, db)
    proc = _migrate(db, "--to", str(tmp_path / "archive"), "--cluster", dask_nodes.address, env=node_env(s3))
    _out, err = proc.communicate(timeout=120)
    assert proc.returncode == 1, err
    assert "dask worker(s) cannot take part in this migration: old-code: it runs other cloudexit code" in err
    assert "install the same cloudexit version on every worker" in err and "Traceback" not in err
    assert "good" not in err.split("cannot take part")[1].split("\n")[0]


def test_a_worker_that_does_not_answer_its_check_is_named_not_a_file_error(monkeypatch) -> None:
    """dask's TimeoutError is an OSError: a worker frozen during the admission check must read
    as a worker that did not answer, not as a problem with a file (the CLI's OSError line)."""
    import distributed

    from cloudexit.cluster import connect

    monkeypatch.setattr(connect, "ANSWER_TIMEOUT", 1.0)
    with distributed.LocalCluster(n_workers=1, processes=False, dashboard_address=None) as local, \
            distributed.Client(local) as client:
        (addr,) = client.scheduler_info()["workers"]
        found = connect.ask(client, time.sleep, 5, workers=[addr])
        ok, bad = connect.sort_answers(found, [addr])
    assert ok == [] and bad == {addr: f"{addr}: it did not answer within 1 s"}


# -- faults and the shared limit (real processes, killed with SIGKILL on observed progress) --------
def _ct(s3: Any, bucket: str, slices: int) -> dict[str, str]:
    """`slices` CT objects of 128 KB in 4 studies; key -> SHA-256."""
    profile = synthetic.Profile(patients=2, studies_per_patient=2, ct_slices_per_series=slices // 4,
                                ct_matrix=256, cr_per_study=0, multiframe_objects=0, awkward=False, seed=5)
    return {o.key: hashlib.sha256(o.body()).hexdigest()
            for o in synthetic.upload(s3.client(), bucket, synthetic.generate(profile))}


def _all_verified(db: Path, dest: Path, truth: dict[str, str]) -> None:
    got = {r["key"]: (r["state"], r["sha256"], r["path"]) for r in rows(db, "SELECT * FROM transfers")}
    assert {k: (s, h) for k, (s, h, _p) in got.items()} == {k: ("verified", h) for k, h in truth.items()}
    files = _tree(dest)
    assert files == {p: h for _s, h, p in got.values()}  # nothing more, nothing less, no duplicate
    assert not _temps(dest)


def _slow_run_on_two_workers(cli, s3, bucket: str, db: Path, dest: Path,
                             dask_nodes) -> tuple[dict[str, str], subprocess.Popen[str]]:
    """40 CT objects inventoried and a migration to `dest` started at 1 MB/s on workers w1 and
    w2 (slow enough to place a kill mid-run): the objects' SHA-256 by key, and the process."""
    truth = _ct(s3, bucket, 40)
    _inventory(cli, bucket, db)
    dask_nodes.worker("w1")
    dask_nodes.worker("w2")
    dask_nodes.wait_for(2)
    proc = _migrate(db, "--to", str(dest), "--cluster", dask_nodes.address, "--bwlimit", "1M", "-q",
                    env=node_env(s3))
    return truth, proc


@pytest.mark.slow
def test_a_worker_killed_mid_run_loses_nothing(cli, s3, bucket: str, db: Path, tmp_path: Path, dask_nodes) -> None:
    dest = tmp_path / "archive"
    truth, proc = _slow_run_on_two_workers(cli, s3, bucket, db, dest, dask_nodes)
    # w2 has placed objects and more are in flight: kill it
    err = dask_nodes.kill_when("w2", proc, lambda: count(db, "worker = 'w2' AND state = 'verified'") >= 2
                               and count(db, "state = 'fetching'") >= 4, "2 objects verified on w2, 4 in flight")
    assert proc.returncode == 0, err
    _all_verified(db, dest, truth)
    assert count(db, "worker = 'w1'") > 0


@pytest.mark.slow
def test_the_last_worker_gone_longer_than_the_wait_stops_the_run(cli, s3, bucket: str, db: Path, tmp_path: Path,
                                                                 dask_nodes) -> None:
    _ct(s3, bucket, 40)
    _inventory(cli, bucket, db)
    dask_nodes.worker("w1")
    dask_nodes.wait_for(1)
    proc = _migrate(db, "--to", str(tmp_path / "archive"), "--cluster", dask_nodes.address, "--bwlimit", "1M",
                    "-q", "--cluster-wait", "3s", env=node_env(s3))
    err = dask_nodes.kill_when("w1", proc, lambda: count(db, "state = 'verified'") >= 3, "3 objects verified")
    assert proc.returncode == 1, err
    errors = [line for line in err.splitlines() if line.startswith("Error:")]
    assert errors == [f"Error: no dask worker has been available for 3 s at {dask_nodes.address}"], err
    # What to do, not the hint for a worker process that died on this machine (memory, system log).
    assert (f"  hint: start workers (`dask worker {dask_nodes.address}`) on the machines that mount the "
            f"archive; then: cloudexit migrate --resume --cluster {dask_nodes.address}") in err, err
    assert "Traceback" not in err
    assert count(db, "state = 'fetching'") == 0  # what was in flight is queued again


@pytest.mark.slow
def test_coordinator_killed_then_resumed(cli, s3, bucket: str, db: Path, tmp_path: Path, dask_nodes) -> None:
    dest = tmp_path / "archive"
    truth, proc = _slow_run_on_two_workers(cli, s3, bucket, db, dest, dask_nodes)
    try:
        wait_for(proc, lambda: count(db, "state = 'verified'") >= 5 and count(db, "state = 'fetching'") >= 4,
                 "5 objects verified, 4 in flight", 90)
    finally:
        proc.kill()  # SIGKILL: the coordinator dies with batches running on the workers
        proc.wait()
    assert count(db, "state = 'fetching'") >= 4
    again = _migrate(db, "--resume", "--cluster", dask_nodes.address, "-q", env=node_env(s3))
    _out, err = again.communicate(timeout=180)
    assert again.returncode == 0, err
    _all_verified(db, dest, truth)


def _service_on(s3: Any, bucket: str, root: Path, token: str, sizes: dict[str, int]) -> tuple[Any, Any, tuple[Any, ...]]:
    """A worker's service of run `token` in this process (real worker processes, SeaweedFS),
    limited to 512 KB/s; a function making the task of one of `sizes`' objects, uploaded; and
    the service's config, endpoint and credentials."""
    import os as _os

    from cloudexit.cluster import service
    from cloudexit.core.config import MigrateConfig
    from cloudexit.s3.client import Credentials
    from cloudexit.s3.source import Source
    from cloudexit.stores.filesystem import FilesystemStore
    from cloudexit.transfer.tasks import Task

    client = s3.client()
    etags = {k: client.put_object(Bucket=bucket, Key=k, Body=_os.urandom(n))["ETag"].strip('"')
             for k, n in sizes.items()}
    root.mkdir(exist_ok=True)
    endpoint, _creds = Source(f"s3://{bucket}").lean_endpoint()
    creds = Credentials(s3.credentials["aws_access_key_id"], s3.credentials["aws_secret_access_key"])

    def task(i: int, key: str) -> Task:
        final = str(root / "_non-dicom" / key)
        return Task(id=i, key=key, etag=etags[key], size=sizes[key], kind="other", final=final,
                    temp=FilesystemStore.temp_beside(final, key, etags[key]), quarantine=None,
                    expect={}, provider={}, credentials=creds)

    run = service.Service(token, "w", MigrateConfig(), str(root), endpoint, 512 * 1024, None, creds)
    service._services[token] = run
    return run, task, (MigrateConfig(), endpoint, creds)


def test_a_batch_given_up_while_another_finishes_still_ends_the_service(s3_env, bucket: str, tmp_path: Path) -> None:
    """The coordinator killed: each batch on a worker finds it out at its own next look (once a
    second). A batch that finishes in between must not leave the service running the given-up
    objects for nobody: once none it waits for is left, its processes stop and its temps go."""
    import threading

    from cloudexit.cluster import service

    root, token = tmp_path / "archive", "given-up-race"
    run, task, _args = _service_on(s3_env, bucket, root, token,
                            {"q/small.bin": 512 * 1024, "p/big-1.bin": 4 * 2**20, "p/big-2.bin": 4 * 2**20})
    try:
        answers: dict[str, Any] = {}
        q = threading.Thread(target=lambda: answers.setdefault("q", run.run([task(1, "q/small.bin")])))
        q.start()  # first in the queue: done in about 3 s, after the other batch is given up
        p = threading.Thread(target=lambda: answers.setdefault("p", run.run(
            [task(2, "p/big-1.bin"), task(3, "p/big-2.bin")], given_up=lambda: True)))
        p.start()
        p.join(30)
        q.join(30)
        assert answers["p"] == [] and [m.outcome for m in answers["q"]] == ["verified"]
        deadline = time.monotonic() + 15
        while (token in service._services or _temps(root)) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert token not in service._services and run.pool.stopped  # long before the 4 MB objects end
        assert not _temps(root)
        assert not (root / "_non-dicom" / "p").exists() or not any((root / "_non-dicom" / "p").iterdir())
    finally:
        service._services.pop(token, None)
        run.end()


def test_a_run_starting_on_a_worker_waits_for_the_killed_runs_processes(s3_env, bucket: str, tmp_path: Path) -> None:
    """A resume right after a kill: its service must not start while the dead run's processes
    still write (for up to a second until a batch looks, then while they stop), or their late
    temp files land beside the new run's, in folders its listing has already seen."""
    import threading

    from cloudexit.cluster import service

    root, token = tmp_path / "archive", "killed-run"
    old, task, (config, endpoint, creds) = _service_on(s3_env, bucket, root, token, {"p/big-1.bin": 4 * 2**20, "p/big-2.bin": 4 * 2**20})
    try:
        dead = threading.Event()
        p = threading.Thread(target=old.run, args=([task(1, "p/big-1.bin"), task(2, "p/big-2.bin")], dead.is_set))
        p.start()
        deadline = time.monotonic() + 30
        while not _temps(root) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert _temps(root)  # the old run is writing
        dead.set()  # its coordinator is gone: dask released the batch's task
        service.start("resumed", config, str(root), endpoint, None, None, creds)
        assert old.ended.is_set() and old.pool.stopped and token not in service._services
        assert not _temps(root)
        p.join(10)
    finally:
        for t in (token, "resumed"):
            s = service._services.pop(t, None)
            if s is not None:
                s.end()
        old.end()


@pytest.mark.slow
def test_workers_of_a_coordinator_killed_stop_and_remove_their_temps(cli, s3, bucket: str, db: Path,
                                                                     tmp_path: Path, dask_nodes) -> None:
    """Without a resume: the services whose coordinator died (every batch given up) stop their
    cloudexit worker processes and remove the small objects' temp files they were writing."""
    import psutil

    dest = tmp_path / "archive"
    _truth, proc = _slow_run_on_two_workers(cli, s3, bucket, db, dest, dask_nodes)

    def working() -> list[psutil.Process]:
        found = []
        for worker in dask_nodes.workers.values():
            try:
                found += [p for p in psutil.Process(worker.pid).children(recursive=True)
                          if p.name() == "cloudexit-work"]
            except psutil.Error:
                pass
        return found

    try:
        wait_for(proc, lambda: count(db, "state = 'fetching'") >= 4 and _temps(dest), "4 in flight, temps written", 90)
    finally:
        proc.kill()  # SIGKILL: the coordinator dies with batches running on the workers
        proc.wait()
    assert working()
    wait_for(dask_nodes.workers["w1"], lambda: not working() and not _temps(dest),
             "the workers' processes ended and their temp files removed", 60)


def _rates(address: str) -> dict[str, float | None]:
    """The limit each worker's service of the running migration holds (bytes/s), by worker."""
    from distributed import Client

    def rates() -> list[float | None]:
        from cloudexit.cluster import service

        return [s.rate.rate for s in service._services.values() if not s.stop.is_set()]

    with Client(address, timeout=30) as client:
        return {addr: got[0] for addr, got in client.run(rates).items() if got}


@pytest.mark.slow
def test_bwlimit_holds_for_the_whole_cluster(cli, s3, bucket: str, db: Path, tmp_path: Path, dask_nodes) -> None:
    _ct(s3, bucket, 80)  # 10 MB
    _inventory(cli, bucket, db)
    dask_nodes.worker("w1")
    dask_nodes.worker("w2")
    dask_nodes.wait_for(2)
    limit = 2**20
    proc = _migrate(db, "--to", str(tmp_path / "archive"), "--cluster", dask_nodes.address, "--bwlimit", "1M",
                    "--json", env=node_env(s3))
    try:
        wait_for(proc, lambda: count(db, "state = 'fetching'") >= 4, "4 objects in flight", 90)
        # The budget is split between the workers, and again when a third joins.
        assert sorted(_rates(dask_nodes.address).values()) == [limit / 2] * 2
        dask_nodes.worker("w3")
        wait_for(proc, lambda: len(_rates(dask_nodes.address)) == 3, "3 workers with a rate", 60)
        wait_for(proc, lambda: sorted(_rates(dask_nodes.address).values()) == [limit / 3] * 3,
                 "the limit split in 3", 10)
        out, err = proc.communicate(timeout=180)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err
    summary = json.loads(out)
    assert summary["bytes_downloaded"] / summary["elapsed"] <= limit * 1.05
    assert "dask worker w3 joined the run" not in err  # --json: notices only for warnings
    assert {r["worker"] for r in rows(db, "SELECT DISTINCT worker FROM transfers")} <= {"w1", "w2", "w3"}


def test_local_cluster_runs_dask_with_quiet_timers() -> None:
    """dask's timers cost CPU per second, not per GB (docs/performance.md, cluster): `local:N`'s
    scheduler and workers run with DASK_SETTINGS (as docs/scale-out.md has the CLI daemons do)."""
    from cloudexit.cluster.connect import open_client

    def timers(dask_worker: Any) -> dict[str, float]:
        return {name: pc.callback_time for name, pc in dask_worker.periodic_callbacks.items()}

    cluster, client = open_client(parse("local:1"), 1)
    try:
        worker = next(iter(client.run(timers).values()))
        scheduler = timers(cluster.scheduler)
    finally:
        client.close()
        cluster.close()
    assert "profile" not in worker  # dask's statistical profiler is off
    assert worker["tick"] == scheduler["tick"] == 500 and worker["monitor"] == scheduler["monitor"] == 2000
    assert worker["memory_monitor"] == 1000
    assert "stealing" not in scheduler and not any(name.startswith("amm-") for name in scheduler)  # pinned, no data


# -- the scheduler restarting or gone, a worker cut off, egress of a killed worker ----------------------
def _said(path: Path, text: str) -> bool:
    return path.exists() and text in path.read_text()


@pytest.mark.slow
def test_the_scheduler_restarting_the_run_waits_and_carries_on(cli, s3, bucket: str, db: Path, tmp_path: Path,
                                                                dask_nodes) -> None:
    dest, log = tmp_path / "archive", tmp_path / "migrate.err"
    truth = _ct(s3, bucket, 40)
    _inventory(cli, bucket, db)
    for name in ("w1", "w2"):
        dask_nodes.worker(name)
    dask_nodes.wait_for(2)
    proc = _migrate(db, "--to", str(dest), "--cluster", dask_nodes.address, "--bwlimit", "1M", "-q",
                    "--cluster-wait", "2m", env=node_env(s3), stderr=log)
    try:
        wait_for(proc, lambda: count(db, "state = 'verified'") >= 5 and count(db, "state = 'fetching'") >= 4,
                 "5 objects verified, 4 in flight", 90)
        dask_nodes.kill_scheduler()
        wait_for(proc, lambda: _said(log, "waiting for the dask scheduler at " + dask_nodes.address),
                 "the run says it waits for the scheduler", 30)
        # Down for longer than dask's client tries to reconnect by itself (it gives up, closing).
        wait_for(proc, lambda: _said(log, "still waiting for the dask scheduler"), "dask's client gave up", 30)
        # dask workers end with their scheduler (dask has no worker reconnection): a supervisor
        # (systemd's Restart=always, as docs/scale-out.md says) starts them again.
        wait_for(proc, lambda: all(w.poll() is not None for w in dask_nodes.workers.values()),
                 "the dask workers ended", 60)
        verified = count(db, "state = 'verified'")
        dask_nodes.start_scheduler()
        for name in ("w1", "w2"):
            dask_nodes.worker(name)
        proc.communicate(timeout=180)
    finally:
        if proc.poll() is None:
            proc.kill()
    err = log.read_text()
    assert proc.returncode == 0, err
    assert f"the dask scheduler at {dask_nodes.address} answers again" in err and "Traceback" not in err
    assert verified < len(truth)
    _all_verified(db, dest, truth)  # each object verified once, its one file, no temp file


@pytest.mark.slow
def test_a_scheduler_gone_longer_than_the_wait_stops_the_run_and_resume_continues(
        cli, s3, bucket: str, db: Path, tmp_path: Path, dask_nodes) -> None:
    dest = tmp_path / "archive"
    truth = _ct(s3, bucket, 40)
    _inventory(cli, bucket, db)
    dask_nodes.worker("w1")
    dask_nodes.wait_for(1)
    proc = _migrate(db, "--to", str(dest), "--cluster", dask_nodes.address, "--bwlimit", "1M", "-q",
                    "--cluster-wait", "3s", env=node_env(s3))
    try:
        wait_for(proc, lambda: count(db, "state = 'verified'") >= 3, "3 objects verified", 90)
        dask_nodes.kill_scheduler()
        _out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 1, err
    errors = [line for line in err.splitlines() if line.startswith("Error:")]
    assert errors == [f"Error: the dask scheduler at {dask_nodes.address} has not answered for 3 s; is it "
                      f"running? Once it is: cloudexit migrate --resume --cluster {dask_nodes.address}"], err
    # The scheduler's own hint, not the one for a worker process that died (memory, system log).
    assert "  hint: its log says why it stopped" in err and "check memory" not in err, err
    assert "Traceback" not in err
    assert count(db, "state = 'fetching'") == 0  # what was in flight is queued again
    dask_nodes.start_scheduler()
    dask_nodes.worker("w1")  # without a nanny, a worker ends with its scheduler
    dask_nodes.wait_for(1)
    again = _migrate(db, "--resume", "--cluster", dask_nodes.address, "-q", env=node_env(s3))
    _out, err = again.communicate(timeout=180)
    assert again.returncode == 0, err
    _all_verified(db, dest, truth)


@pytest.mark.slow
def test_a_frozen_scheduler_stops_the_run_after_the_wait(cli, s3, bucket: str, db: Path, tmp_path: Path,
                                                         dask_nodes) -> None:
    """A scheduler that keeps its connections open but never answers (stopped, a frozen VM):
    the run waits `--cluster-wait` as for one gone, instead of waiting on it for ever."""
    _ct(s3, bucket, 40)
    _inventory(cli, bucket, db)
    dask_nodes.worker("w1")
    dask_nodes.wait_for(1)
    proc = _migrate(db, "--to", str(tmp_path / "archive"), "--cluster", dask_nodes.address, "--bwlimit", "1M",
                    "-q", "--cluster-wait", "3s", env=node_env(s3))
    try:
        wait_for(proc, lambda: count(db, "state = 'verified'") >= 3, "3 objects verified", 90)
        dask_nodes.freeze_scheduler()
        _out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 1, err
    errors = [line for line in err.splitlines() if line.startswith("Error:")]
    assert errors == [f"Error: the dask scheduler at {dask_nodes.address} has not answered for 3 s; is it "
                      f"running? Once it is: cloudexit migrate --resume --cluster {dask_nodes.address}"], err
    # The scheduler's own hint, not the one for a worker process that died (memory, system log).
    assert "  hint: its log says why it stopped" in err and "check memory" not in err, err
    assert "Traceback" not in err
    assert count(db, "state = 'fetching'") == 0  # what was in flight is queued again


@pytest.mark.slow
def test_an_unreachable_scheduler_is_said_at_once(cli, awkward: str, db: Path, tmp_path: Path) -> None:
    _inventory(cli, awkward, db)
    port = free_port()  # nothing listens there
    started = time.monotonic()
    result = cli("migrate", "--to", str(tmp_path / "archive"), "--db", str(db), "--cluster", f"tcp://127.0.0.1:{port}")
    took = time.monotonic() - started
    assert result.exit_code == 1, result.output
    assert f"Error: cannot reach the dask scheduler at tcp://127.0.0.1:{port}" in result.output
    assert "is `dask scheduler` running on 127.0.0.1? Check the address, the port" in result.output
    assert "Traceback" not in result.output
    assert took < 12, took  # dask's own default waits 30 s


@pytest.mark.slow
def test_a_worker_cut_off_then_back_loses_nothing_and_counts_nothing_twice(cli, s3, bucket: str, db: Path,
                                                                           tmp_path: Path, dask_nodes) -> None:
    from distributed import Client

    dest = tmp_path / "archive"
    dask_nodes.kill_scheduler()  # one that drops a worker silent for 5 s (dask's default: 5 minutes)
    dask_nodes.start_scheduler(worker_ttl="5s")
    truth, proc = _slow_run_on_two_workers(cli, s3, bucket, db, dest, dask_nodes)
    try:
        with Client(dask_nodes.address, timeout=30) as client:
            wait_for(proc, lambda: count(db, "worker = 'w2' AND state = 'verified'") >= 2
                     and count(db, "state = 'fetching'") >= 4, "2 objects verified on w2, 4 in flight", 90)
            # w2's dask worker stops answering (a hung machine, a cut cable) while its cloudexit
            # worker processes go on writing; the scheduler drops it, then it comes back.
            dask_nodes.signal("w2", signal.SIGSTOP)
            wait_for(proc, lambda: len(client.scheduler_info(n_workers=-1)["workers"]) == 1,
                     "the scheduler dropped w2", 60)
            dask_nodes.signal("w2", signal.SIGCONT)
        out, err = proc.communicate(timeout=180)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err
    _all_verified(db, dest, truth)
    run = rows(db, "SELECT * FROM migration_runs")[0]
    assert run["objects_verified"] == len(truth), dict(run)  # each once: w2's late work not counted
    assert count(db, "worker = 'w1'") > 0


@pytest.mark.slow
def test_egress_of_a_worker_killed_mid_object_is_counted(cli, s3, bucket: str, db: Path, tmp_path: Path,
                                                         dask_nodes, fault_proxy) -> None:
    mib = 2**20
    body = os.urandom(24 * mib)
    s3.client().put_object(Bucket=bucket, Key="big.bin", Body=body)
    _inventory(cli, bucket, db)  # straight to the server: the proxy counts the migration only
    pace = 2 * mib
    fault_proxy.shape(pace)  # all responses together (the object's ranges run side by side)
    dask_nodes.worker("w1")
    dask_nodes.wait_for(1)
    proc = _migrate(db, "--to", str(tmp_path / "archive"), "--cluster", dask_nodes.address, "--endpoint-url",
                    fault_proxy.endpoint_url, "--processes", "1", "--threads", "1", "--large-object", str(8 * mib),
                    "--range-size", str(8 * mib), "-q", env=node_env(s3))
    try:  # w1 is killed 18 MiB into the object: its batch never returns what it counted
        wait_for(proc, lambda: fault_proxy.bytes_sent >= 18 * mib, "18 MiB sent to w1", 60)
        dask_nodes.kill("w1")
        dask_nodes.worker("w2")  # the batch runs again there, from the start
        _out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err
    assert (tmp_path / "archive" / rows(db, "SELECT path FROM transfers")[0]["path"]).read_bytes() == body
    wire = fault_proxy.bytes_sent
    recorded = rows(db, "SELECT bytes_downloaded FROM migration_runs")[0]["bytes_downloaded"]
    print(f"\n{wire / mib:.1f} MiB sent by the server, {recorded / mib:.1f} MiB recorded")
    assert wire >= 42 * mib
    # The workers' counts reach the coordinator every 2 s (plus a heartbeat, and some slack for
    # a loaded machine): at most that much of w1's is lost (without the heartbeat counts, all
    # 18 MiB it received were).
    assert wire - 5 * pace <= recorded <= wire, (recorded, wire)
