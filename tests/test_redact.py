"""`audit --redact-keys`: keys that embed patient names never reach manifest.csv."""

from __future__ import annotations

import csv
import os
import re
from pathlib import Path

import pytest
from cloudexit.testing import synthetic

NAME = "DOE^JANE 19700101"


@pytest.mark.slow
def test_redacted_manifest_hides_names_in_keys(cli, s3, tmp_path: Path) -> None:
    bucket = f"redact-{os.getpid()}"
    client = s3.client()
    client.create_bucket(Bucket=bucket)
    keys = []
    for i, o in enumerate(synthetic.generate(synthetic.Profile.ct_bench(2, matrix=16))):
        keys.append(f"{NAME}/CT/{i}.dcm")
        client.put_object(Bucket=bucket, Key=keys[-1], Body=o.body())
    client.put_object(Bucket=bucket, Key=f"{NAME}/report.txt", Body=b"report")
    truncated = next(iter(synthetic.generate(synthetic.Profile.ct_bench(1, matrix=16)))).body()[:300]
    client.put_object(Bucket=bucket, Key=f"{NAME}/broken.dcm", Body=truncated)  # an exception
    db, dest = tmp_path / "s.db", tmp_path / "archive"
    assert cli("inventory", f"s3://{bucket}", "--db", str(db), "-q").exit_code == 0
    assert cli("migrate", "--to", str(dest), "--db", str(db), "-q").exit_code == 3
    plain = cli("audit", "--out", str(tmp_path / "plain"), "--db", str(db), "-q")
    assert plain.exit_code == 3, plain.output
    assert NAME in (tmp_path / "plain" / "manifest.csv").read_text()

    manifests = []
    for out in ("r1", "r2"):
        result = cli("audit", "--out", str(tmp_path / out), "--db", str(db), "--redact-keys", "-q")
        assert result.exit_code == 3, result.output  # complete, with an exception to review
        text = (tmp_path / out / "manifest.csv").read_text()
        assert "DOE" not in text and "JANE" not in text and "19700101" not in text
        for name in ("audit.json", "audit.html"):  # the exception lists too
            assert "DOE" not in (tmp_path / out / name).read_text(), name
        manifests.append(text)
        assert cli("audit", "verify", str(tmp_path / out)).exit_code == 0
    assert manifests[0] == manifests[1]  # stable: the same key hashes the same way
    lines = list(csv.DictReader(manifests[0].splitlines()))
    assert len(lines) == 4
    segment = re.compile(r"^k-[0-9a-f]{16}$")
    firsts = set()
    for line in lines:
        parts = line["key"].split("/")
        assert all(segment.match(p) for p in parts), line["key"]
        firsts.add(parts[0])
        path = line["path"].split("/")
        assert all(segment.match(p) or p in ("_non-dicom", "_quarantine", "unreadable") or re.match(r"^[0-9.]+(\.dcm)?$", p) for p in path)
    assert len(firsts) == 1  # one folder, one hash: the structure still shows
    both = cli("audit", "--out", str(tmp_path / "x"), "--db", str(db), "--redact-keys", "--include-phi")
    assert both.exit_code == 2 and "choose one" in both.output
