"""What `cloudexit inventory` loads before its first request: no pydicom while the struct walk
reads every header, no boto3 client on a given endpoint, and neither boto3 nor botocore when
the credentials are in the environment (start-up, docs/performance.md)."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import pydicom

from cloudexit.testing import synthetic
from cloudexit.testing.s3server import SeaweedServer

ROOT = Path(__file__).resolve().parent.parent

_RUN = """
import json, sys
from cloudexit.core.config import SourceConfig
from cloudexit.inventory import Inventory
from cloudexit.s3.source import Source
from cloudexit.state.db import State

state = State(sys.argv[2], create=True)
source = Source(sys.argv[1], SourceConfig(endpoint_url=sys.argv[3]))
summary = Inventory(state, source).run()
kinds = dict(state.query("SELECT kind, count(*) FROM objects GROUP BY kind"))
print(json.dumps({"pydicom": "pydicom" in sys.modules, "new": summary.new, "kinds": kinds,
                  "client": getattr(source._local, "client", None) is not None,
                  "boto": sorted({"boto3", "botocore"} & set(sys.modules))}))
"""


def _env(s3: SeaweedServer) -> dict[str, str]:
    """Credentials in the environment, and no profile that could name others."""
    env = {k: v for k, v in os.environ.items() if k not in ("AWS_PROFILE", "AWS_DEFAULT_PROFILE")}
    return {**env, **s3.env(), "PYTHONPATH": str(ROOT)}


def _inventory(s3: SeaweedServer, bucket: str, db: Path) -> dict:
    out = subprocess.run([sys.executable, "-c", _RUN, f"s3://{bucket}", str(db), s3.endpoint_url],
                         capture_output=True, text=True, timeout=120, check=False, env=_env(s3))
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.splitlines()[-1])


def test_clean_headers_need_no_pydicom_and_no_boto3_client(s3: SeaweedServer, bucket: str,
                                                             tmp_path: Path) -> None:
    plain = [o for o in synthetic.generate(synthetic.Profile.tiny())
             if o.kind == "dicom" and o.case == "normal"][:5]
    synthetic.upload(s3.client(), bucket, plain)
    first = _inventory(s3, bucket, tmp_path / "a.db")
    assert first == {"pydicom": False, "client": False, "new": len(plain),
                     "kinds": {"dicom": len(plain)}, "boto": []}
    # A header the struct walk leaves to pydicom (a GB18030 Patient ID) imports it then, from
    # a header thread, and is read as before.
    ds = pydicom.dcmread(io.BytesIO(plain[0].body()))
    ds.SpecificCharacterSet = "GB18030"
    ds.PatientID = "\u5f20\u4e09-001"
    ds.SOPInstanceUID = ds.SOPInstanceUID + ".1"
    body = io.BytesIO()
    ds.save_as(body)
    s3.client().put_object(Bucket=bucket, Key="gb18030.dcm", Body=body.getvalue())
    second = _inventory(s3, bucket, tmp_path / "b.db")
    assert second == {"pydicom": True, "client": False, "new": len(plain) + 1,
                      "kinds": {"dicom": len(plain) + 1}, "boto": []}


_CLI = """
import json, sys
from cloudexit.cli import main

try:
    main(sys.argv[1:], standalone_mode=False)
finally:
    print(json.dumps(sorted({"boto3", "botocore", "sqlite_utils", "pydicom"} & set(sys.modules))))
"""


def _cli(s3: SeaweedServer, *args: str) -> list[str]:
    out = subprocess.run([sys.executable, "-c", _CLI, *args], capture_output=True, text=True, timeout=120,
                         check=False, env=_env(s3))
    assert out.returncode == 0, out.stderr[-3000:]
    loaded: list[str] = json.loads(out.stdout.splitlines()[-1])
    return loaded


def test_cli_inventory_and_migrate_import_no_boto3_with_credentials_in_the_environment(
        s3: SeaweedServer, bucket: str, tmp_path: Path) -> None:
    """The whole commands, as a user runs them (AWS_ENDPOINT_URL and keys in the environment):
    neither boto3 nor botocore (~0.2 s of CPU at every start) nor sqlite_utils is imported, and
    migrate's engine no longer imports pydicom up front (~0.17 s) for clean headers."""
    plain = [o for o in synthetic.generate(synthetic.Profile.tiny())
             if o.kind == "dicom" and o.case == "normal"][:3]
    synthetic.upload(s3.client(), bucket, plain)
    db = str(tmp_path / "c.db")
    assert _cli(s3, "inventory", f"s3://{bucket}", "--db", db, "--quiet") == []
    assert _cli(s3, "migrate", "--to", str(tmp_path / "archive"), "--db", db, "--quiet") == []
    assert len(list((tmp_path / "archive").rglob("*.dcm"))) == len(plain)


class _CountingEvent(threading.Event):
    """`threading.Event` that counts how its waits ended (woken, or timed out)."""

    def __init__(self) -> None:
        super().__init__()
        self.woken = self.timed_out = 0

    def wait(self, timeout: float | None = None) -> bool:
        flag = super().wait(timeout)
        if flag:
            self.woken += 1
        else:
            self.timed_out += 1
        return flag


def test_writer_is_woken_by_finished_reads_not_a_timer(s3_env: SeaweedServer, bucket: str,
                                                      tmp_path: Path) -> None:
    """With one header thread (4 reads in flight, woken at every one), the writer collects
    reads as they finish: it used to poll every 50 ms, which capped a fast store at ~1,300
    reads/s. (Waits that time out are not counted against it: on a loaded machine one read can
    take longer than 50 ms.)"""
    from cloudexit.core.config import InventoryConfig, SourceConfig
    from cloudexit.inventory import Inventory
    from cloudexit.s3.source import Source
    from cloudexit.state.db import State

    plain = [o for o in synthetic.generate(synthetic.Profile.tiny())
             if o.kind == "dicom" and o.case == "normal"]
    synthetic.upload(s3_env.client(), bucket, plain)
    with State(tmp_path / "s.db", create=True) as state:
        inventory = Inventory(state, Source(f"s3://{bucket}", SourceConfig(s3_env.endpoint_url)),
                              InventoryConfig(workers=1))
        inventory._wake = wake = _CountingEvent()
        summary = inventory.run()
    assert summary.new == len(plain)
    assert wake.woken >= len(plain) // 2
