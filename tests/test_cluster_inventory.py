"""`inventory --cluster`: the header reads on real dask workers (`local:N`, and `dask scheduler`
/ `dask worker` processes on loopback) give the objects table of a plain inventory, also when a
worker is killed mid-run; workers that cannot read the bucket are named; plain tcp:// to another
machine is refused (patient IDs would cross it in clear)."""

from __future__ import annotations

import io
import subprocess
import sys
import zipfile
from pathlib import Path
from typing import Any

import pytest
from dasknodes import DaskNodes, node_env
from dbutil import rows

from cloudexit.testing import synthetic

# Every test here starts dask workers (seconds each), but the first.
pytestmark = pytest.mark.slow

NO_KEYS = ["env", "-u", "AWS_ACCESS_KEY_ID", "-u", "AWS_SECRET_ACCESS_KEY"]  # a worker without credentials


def _objects(db: Path) -> dict[str, tuple[Any, ...]]:
    """Every column of every object (the time of the update aside); the patient hash as which
    objects share it (each DB has its own patient key, so the hashes themselves differ)."""
    found = rows(db, "SELECT * FROM objects ORDER BY key")
    assert found
    patients: dict[str, int] = {}
    out = {}
    for r in found:
        row = dict(r)
        del row["updated_at"]
        if row["patient_hash"] is not None:
            row["patient_hash"] = patients.setdefault(row["patient_hash"], len(patients))
        out[r["key"]] = tuple(sorted(row.items()))
    return out


def _counted(db: Path) -> tuple[int, int]:
    """The round's header GETs and bytes (the egress counts of the reads)."""
    r = rows(db, "SELECT get_requests, header_bytes FROM inventory_rounds")[-1]
    return r["get_requests"], r["header_bytes"]


def _inventory(db: Path, bucket: str, *args: str, env: dict[str, str]) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-m", "cloudexit.cli", "inventory", f"s3://{bucket}", "--db",
                             str(db), *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def _ran_batches(address: str) -> dict[str, int]:
    """Header batches each worker has run (by name), from the workers' own task logs."""
    from distributed import Client

    def batches(dask_worker: Any) -> int:
        return len({e[0] for e in dask_worker.state.log if str(e[0]).startswith("cloudexit-headers-")})

    with Client(address, timeout=30) as client:
        names = {a: w["name"] for a, w in client.scheduler_info(n_workers=-1)["workers"].items()}
        return {names[a]: n for a, n in client.run(batches).items()}


def _add_zipped_study(s3: Any, bucket: str) -> None:
    """A zipped study of two instances: its members are recorded as objects too."""
    profile = synthetic.Profile(patients=1, studies_per_patient=1, ct_slices_per_series=2, ct_matrix=32,
                                cr_per_study=0, multiframe_objects=0, awkward=False, seed=3)
    data = io.BytesIO()
    with zipfile.ZipFile(data, "w", zipfile.ZIP_DEFLATED) as z:
        for i, o in enumerate(synthetic.generate(profile)):
            z.writestr(f"IM{i}.dcm", o.body())
    s3.client().put_object(Bucket=bucket, Key="zipped/study.zip", Body=data.getvalue())


# -- refused before anything starts ------------------------------------------------------------------
def test_plain_tcp_to_another_machine_refused_and_dask_missing(cli, awkward: str, db: Path) -> None:
    # Patient IDs come back from the header reads: never in clear over the network (nor the
    # S3 secret key with forward), whichever credentials mode.
    for mode in ("worker", "forward"):
        result = cli("inventory", f"s3://{awkward}", "--db", str(db), "--cluster", "tcp://10.11.12.13:8786",
                     "--cluster-credentials", mode)
        assert result.exit_code == 2, result.output
        assert ("inventory --cluster refused: tcp://10.11.12.13:8786 is plain tcp:// to another machine, "
                "so the patient IDs read from the headers would cross the network unencrypted") in result.output
        assert "tls://" in result.output and "Traceback" not in result.output
    with pytest.MonkeyPatch.context() as mp:  # dask not installed (None in sys.modules: ImportError)
        mp.setitem(sys.modules, "distributed", None)
        result = cli("inventory", f"s3://{awkward}", "--db", str(db), "--cluster", "local:1")
    assert result.exit_code == 2 and "pip install 'cloudexit[cluster]'" in result.output, result.output
    assert not db.exists()  # refused before the state DB was made


# -- real workers ------------------------------------------------------------------------------------
def test_local_cluster_gives_the_plain_inventory(cli, s3, awkward: str, tmp_path: Path) -> None:
    _add_zipped_study(s3, awkward)
    plain, spread = tmp_path / "plain" / "c.db", tmp_path / "spread" / "c.db"
    alone = cli("inventory", f"s3://{awkward}", "--db", str(plain), "-q")
    result = cli("inventory", f"s3://{awkward}", "--db", str(spread), "--cluster", "local:2")
    assert result.exit_code == alone.exit_code, result.output
    assert "dask dashboard: http://127.0.0.1:" in result.output
    assert _objects(spread) == _objects(plain)
    assert rows(spread, "SELECT count(*) AS n FROM objects WHERE member IS NOT NULL")[0]["n"] == 2
    assert _counted(spread) == _counted(plain) and _counted(plain)[0] > 0


def test_two_workers_give_the_plain_inventory(cli, s3, awkward: str, tmp_path: Path, dask_nodes: DaskNodes) -> None:
    plain, spread = tmp_path / "plain" / "c.db", tmp_path / "spread" / "c.db"
    alone = cli("inventory", f"s3://{awkward}", "--db", str(plain), "-q")
    dask_nodes.worker("w1")
    dask_nodes.worker("w2")
    dask_nodes.wait_for(2)
    proc = _inventory(spread, awkward, "--cluster", dask_nodes.address, env=node_env(s3))
    _out, err = proc.communicate(timeout=120)
    assert proc.returncode == alone.exit_code, err
    assert "dask dashboard: http://127.0.0.1:" in err
    assert _objects(spread) == _objects(plain)
    assert _counted(spread) == _counted(plain)
    ran = _ran_batches(dask_nodes.address)  # the reads ran on the workers
    assert set(ran) == {"w1", "w2"} and sum(ran.values()) > 0, ran


def test_a_worker_killed_mid_run_loses_nothing(cli, s3, fault_proxy: Any, bucket: str, tmp_path: Path,
                                              dask_nodes: DaskNodes) -> None:
    synthetic.upload(s3.client(), bucket, synthetic.generate(synthetic.Profile(
        patients=6, studies_per_patient=1, ct_slices_per_series=60, ct_matrix=16, cr_per_study=0,
        multiframe_objects=0, awkward=False, seed=9)))
    plain, spread = tmp_path / "plain" / "c.db", tmp_path / "spread" / "c.db"
    assert cli("inventory", f"s3://{bucket}", "--db", str(plain), "-q").exit_code == 0
    # Header GETs (object keys; listings have none) through the proxy take 50 ms: 360 objects
    # on 2 x 2 threads take ~5 s, so the kill lands mid-run.
    fault_proxy.delay(0.05, method="GET", key=".")
    dask_nodes.worker("w1")
    dask_nodes.worker("w2")
    dask_nodes.wait_for(2)
    proc = _inventory(spread, bucket, "--cluster", dask_nodes.address, "--workers", "2", "--endpoint-url",
                      fault_proxy.endpoint_url, "-q", env=node_env(s3))

    def read() -> int:
        if not spread.exists() or not rows(spread, "SELECT 1 FROM sqlite_master WHERE name = 'objects'"):
            return 0
        return int(rows(spread, "SELECT count(*) AS n FROM objects WHERE header_source = 'header'")[0]["n"])

    def mid_run() -> bool:  # 40 headers read and committed, many still to read
        done = read()
        assert done < 300, "the round went too fast to be cut mid-run"
        return done >= 40

    err = dask_nodes.kill_when("w2", proc, mid_run, "40 headers read and committed")
    assert proc.returncode == 0, err
    assert _objects(spread) == _objects(plain)
    assert _counted(spread) == _counted(plain)  # no batch counted twice
    assert _ran_batches(dask_nodes.address)["w1"] > 0


def test_workers_without_credentials_are_named(cli, s3, awkward: str, tmp_path: Path,
                                               dask_nodes: DaskNodes) -> None:
    plain = tmp_path / "plain" / "c.db"
    alone = cli("inventory", f"s3://{awkward}", "--db", str(plain), "-q")
    dask_nodes.worker("good")
    dask_nodes.worker("nokeys", wrap=NO_KEYS)
    dask_nodes.wait_for(2)
    refused = tmp_path / "refused" / "c.db"
    proc = _inventory(refused, awkward, "--cluster", dask_nodes.address, env=node_env(s3))
    _out, err = proc.communicate(timeout=120)
    assert proc.returncode == 1, err
    line = next(x for x in err.splitlines() if "cannot take part" in x)
    assert "dask worker(s) cannot take part in this inventory: nokeys: no usable credentials for" in line
    assert "good" not in line and "Traceback" not in err
    assert "--cluster-min-workers" in err and "--cluster-credentials forward" in err
    assert not refused.exists()  # refused before the state DB was made
    # With --cluster-min-workers 1 the round goes on without it, saying so.
    fewer = tmp_path / "fewer" / "c.db"
    proc = _inventory(fewer, awkward, "--cluster", dask_nodes.address, "--cluster-min-workers", "1",
                      env=node_env(s3))
    _out, err = proc.communicate(timeout=120)
    assert proc.returncode == alone.exit_code, err
    assert "warning: dask worker left out: nokeys: no usable credentials" in err
    assert _objects(fewer) == _objects(plain)
    # Forwarded (to a scheduler on this machine), the worker without keys reads with ours.
    forwarded = tmp_path / "forwarded" / "c.db"
    proc = _inventory(forwarded, awkward, "--cluster", dask_nodes.address, "--cluster-credentials", "forward",
                      "--workers", "1", env=node_env(s3))
    _out, err = proc.communicate(timeout=120)
    assert proc.returncode == alone.exit_code, err
    assert "left out" not in err
    assert _objects(forwarded) == _objects(plain)
    assert _ran_batches(dask_nodes.address)["nokeys"] > 0
