"""What `cloudexit inventory` loads before its first request: no pydicom while the struct walk
reads every header, and no boto3 client on a given endpoint (start-up, docs/performance.md)."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
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
                  "client": getattr(source._local, "client", None) is not None}))
"""


def _inventory(s3: SeaweedServer, bucket: str, db: Path) -> dict:
    out = subprocess.run([sys.executable, "-c", _RUN, f"s3://{bucket}", str(db), s3.endpoint_url],
                         capture_output=True, text=True, timeout=120, check=False,
                         env={**os.environ, **s3.env(), "PYTHONPATH": str(ROOT)})
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.splitlines()[-1])


def test_clean_headers_need_no_pydicom_and_no_boto3_client(s3: SeaweedServer, bucket: str,
                                                             tmp_path: Path) -> None:
    plain = [o for o in synthetic.generate(synthetic.Profile.tiny())
             if o.kind == "dicom" and o.case == "normal"][:5]
    synthetic.upload(s3.client(), bucket, plain)
    first = _inventory(s3, bucket, tmp_path / "a.db")
    assert first == {"pydicom": False, "client": False, "new": len(plain),
                     "kinds": {"dicom": len(plain)}}
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
                      "kinds": {"dicom": len(plain) + 1}}
