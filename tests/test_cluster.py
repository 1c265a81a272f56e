"""`migrate --cluster`: real `dask scheduler` and `dask worker` processes on loopback, with
SeaweedFS; the result compared object for object with the single-machine run."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from dasknodes import node_env
from dbutil import rows

from cloudexit.cluster.address import parse
from cloudexit.stores.filesystem import TEMP_PREFIX
from cloudexit.testing import synthetic

pytest.importorskip("distributed")


def _tree(root: Path) -> dict[str, str]:
    """Every file under `root` (relative path -> SHA-256), the cluster's token files aside."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in root.rglob("*") if p.is_file() and not p.name.startswith(".cloudexit-")}


def _outcome(db: Path) -> dict[str, tuple[str, str, str]]:
    return {r["key"]: (r["state"], r["path"], r["sha256"])
            for r in rows(db, "SELECT key, state, path, sha256 FROM transfers")}


def _temps(root: Path) -> list[Path]:
    return [p for p in root.rglob(f"{TEMP_PREFIX}*") if p.name.endswith(".part")]


@pytest.fixture
def awkward(s3: Any, bucket: str) -> str:
    """The tiny synthetic PACS with its awkward cases (odd keys, non-DICOM, unreadable, a
    multipart multi-frame object)."""
    synthetic.upload(s3.client(), bucket, synthetic.generate(synthetic.Profile.tiny()), part_size=5 * 2**20)
    return bucket


def _inventory(cli: Any, bucket: str, db: Path) -> None:
    result = cli("inventory", f"s3://{bucket}", "--db", str(db), "-q")
    assert result.exit_code == 0, result.output


def _migrate(db: Path, *args: str, env: dict[str, str]) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-m", "cloudexit.cli", "migrate", "--db", str(db), *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


# -- fast: what --cluster accepts and refuses --------------------------------------------------------
def test_cluster_addresses() -> None:
    assert parse("tcp://10.0.0.5:8786").url == "tcp://10.0.0.5:8786"
    assert parse("tls://scheduler.example.org").port == 8786
    assert parse("local:3").workers == 3
    assert parse("tcp://127.0.0.1:8786").loopback and parse("local:1").loopback
    assert not parse("tcp://10.0.0.5:8786").loopback


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
