"""Multipart objects whose parts are of unequal sizes (AWS allows any part size from 5 MiB):
the multipart ETag is recomputed with each part's real size, asked of the source, on SeaweedFS
and on moto's S3 server."""

from __future__ import annotations

import hashlib
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Iterator

import boto3
import pytest
from botocore.config import Config
from dbutil import rows

from cloudexit.testing.s3server import ACCESS_KEY, REGION, SECRET_KEY

MiB = 2**20
SHAPES = {"a/8-10-6.bin": [8 * MiB, 10 * MiB, 6 * MiB], "a/5-7-3.bin": [5 * MiB, 7 * MiB, 3 * MiB],
          "a/5-5-2.bin": [5 * MiB, 5 * MiB, 2 * MiB]}  # the last: equal parts, the usual case


class MotoServer:
    """moto's S3 server (`moto_server`) on a free loopback port, for one test module."""

    def __init__(self) -> None:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            self.port = sock.getsockname()[1]
        self.endpoint_url = f"http://127.0.0.1:{self.port}"
        server = Path(sys.executable).with_name("moto_server")
        self.proc = subprocess.Popen([str(server), "-H", "127.0.0.1", "-p", str(self.port)],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 30
        while True:
            try:
                socket.create_connection(("127.0.0.1", self.port), 0.2).close()
                return
            except OSError:
                if time.monotonic() > deadline or self.proc.poll() is not None:
                    self.stop()
                    raise RuntimeError("moto_server did not start") from None
                time.sleep(0.1)

    def client(self) -> Any:
        return boto3.client("s3", endpoint_url=self.endpoint_url, region_name=REGION,
                            aws_access_key_id=ACCESS_KEY, aws_secret_access_key=SECRET_KEY,
                            config=Config(s3={"addressing_style": "path"}))

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)


@pytest.fixture(scope="module")
def moto() -> Iterator[MotoServer]:
    server = MotoServer()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(params=["seaweedfs", "moto"])
def server(request: pytest.FixtureRequest, s3: Any) -> Any:
    return s3 if request.param == "seaweedfs" else request.getfixturevalue("moto")


def upload_parts(client: Any, bucket: str, key: str, sizes: list[int]) -> bytes:
    data = os.urandom(sum(sizes))
    upload = client.create_multipart_upload(Bucket=bucket, Key=key)["UploadId"]
    parts, offset = [], 0
    for number, n in enumerate(sizes, 1):
        answer = client.upload_part(Bucket=bucket, Key=key, UploadId=upload, PartNumber=number,
                                    Body=data[offset:offset + n])
        parts.append({"ETag": answer["ETag"], "PartNumber": number})
        offset += n
    client.complete_multipart_upload(Bucket=bucket, Key=key, UploadId=upload, MultipartUpload={"Parts": parts})
    return data


@pytest.mark.parametrize("ranged", [False, True], ids=["one-get", "ranges"])
@pytest.mark.slow
def test_unequal_parts_verify_and_migrate(cli, server: Any, db: Path, tmp_path: Path, ranged: bool) -> None:
    client = server.client()
    bucket = f"parts-{os.getpid()}-{int(ranged)}-{time.monotonic_ns() % 10**6}"
    client.create_bucket(Bucket=bucket)
    bodies = {key: upload_parts(client, bucket, key, sizes) for key, sizes in SHAPES.items()}
    # The server itself computes the ETag with the real part sizes (AWS's rule).
    for key, sizes in SHAPES.items():
        md5s = b"".join(hashlib.md5(bodies[key][sum(sizes[:i]):sum(sizes[:i + 1])]).digest()
                        for i in range(len(sizes)))
        etag = client.head_object(Bucket=bucket, Key=key)["ETag"].strip('"')
        assert etag == f"{hashlib.md5(md5s).hexdigest()}-{len(sizes)}"
    endpoint = ["--endpoint-url", server.endpoint_url]
    result = cli("inventory", f"s3://{bucket}", "--db", str(db), "-q", *endpoint)
    assert result.exit_code == 0, result.output
    dest = tmp_path / "archive"
    extra = ["--large-object", str(8 * MiB), "--range-size", str(4 * MiB)] if ranged else []
    result = cli("migrate", "--to", str(dest), "--db", str(db), "-q", *endpoint, *extra)
    assert result.exit_code == 0, [tuple(r) for r in rows(db, "SELECT key, state, reason FROM transfers")]
    found = {r["key"]: r for r in rows(db, "SELECT * FROM transfers")}
    for key, sizes in SHAPES.items():
        row = found[key]
        assert row["state"] == "verified", (key, row["reason"])
        assert "etag-multipart" in row["checks"].split(","), row["checks"]
        assert (dest / row["path"]).read_bytes() == bodies[key]
        # What was learned is kept with the version it belongs to (not asked again).
        recorded = json.loads(row["part_sizes"]) if row["part_sizes"] else None
        if sizes[0] == sizes[1]:
            assert recorded is None  # the guess from part 1 was right: nothing asked
        else:
            assert recorded == {"etag": row["etag"], "sizes": sizes}
    run = rows(db, "SELECT * FROM migration_runs")[0]
    total = sum(sum(s) for s in SHAPES.values())
    assert run["bytes_downloaded"] == total  # each object downloaded once: no re-download
    assert run["retries"] == 0
