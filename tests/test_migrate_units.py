"""The pure parts of migrate: SigV4 signing (against botocore's), checksums, the DICOM walk."""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import http.client
import io
import zlib

import pytest
from botocore.auth import S3SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials as BotoCredentials

from cloudexit.testing import synthetic
from cloudexit.stores import StoreError
from cloudexit.core.checksums import (
    ObjectHasher,
    crc_implementation,
    expectations,
    part_bounds,
    worth_computing,
)
from cloudexit.dicom.header import classify
from cloudexit.dicom.scan import scan
from cloudexit.stores.filesystem import FilesystemStore, safe_key_path
from cloudexit.s3.client import Credentials, Endpoint, Response, Signer

KEYS = ["a/b.dcm", "影像/张三 study/1.dcm", "odd/a+b%20c&d=e;f.dcm", "scans/with space/image 1.dcm",
        "C:/PACS/export/img.dcm", "tilde~and(parens)!*'.dcm"]


@pytest.mark.parametrize("key", KEYS)
@pytest.mark.parametrize("token", [None, "session-token-value"])
def test_signer_matches_botocore(key: str, token: str | None) -> None:
    ep = Endpoint.from_url("http://127.0.0.1:8333", "bucket", "us-east-1", True)
    request = AWSRequest(method="GET", url=f"http://127.0.0.1:8333{ep.path(key)}?partNumber=1",
                         headers={"If-Match": '"abc"', "Range": "bytes=5-"})
    request.headers["X-Amz-Content-SHA256"] = hashlib.sha256(b"").hexdigest()
    S3SigV4Auth(BotoCredentials("AKID", "SECRET", token), "s3", "us-east-1").add_auth(request)
    when = dt.datetime.strptime(request.context["timestamp"], "%Y%m%dT%H%M%SZ").replace(
        tzinfo=dt.timezone.utc)
    ours = Signer(Credentials("AKID", "SECRET", token), "us-east-1").sign(
        "GET", ep.host, ep.path(key), {"partNumber": "1"},
        {"If-Match": '"abc"', "Range": "bytes=5-"}, when=when)
    assert ours["authorization"] == request.headers["Authorization"]


def test_multipart_etag_and_composite_checksums() -> None:
    data = bytes(range(256)) * 50_000  # 12.8 MB
    part = 5 * 2**20
    parts = [data[i:i + part] for i in range(0, len(data), part)]
    etag = hashlib.md5(b"".join(hashlib.md5(p).digest() for p in parts)).hexdigest() + f"-{len(parts)}"
    crcs = b"".join(zlib.crc32(p).to_bytes(4, "big") for p in parts)
    composite = base64.b64encode(zlib.crc32(crcs).to_bytes(4, "big")).decode() + f"-{len(parts)}"
    checks = expectations(etag, {"x-amz-checksum-crc32": composite})
    hasher = ObjectHasher(len(data), checks, part_bounds(len(data), part_size=part))
    for i in range(0, len(data), 777_777):  # chunks that straddle part boundaries
        hasher.update(memoryview(data)[i:i + 777_777])
    result = hasher.verify()
    assert result.ok, result.failed
    assert result.passed == ["size", "etag-multipart", "x-amz-checksum-crc32"]
    assert hasher.sha256_hex() == hashlib.sha256(data).hexdigest()
    bad = ObjectHasher(len(data), checks, part_bounds(len(data), part_size=part))
    bad.update(data[:-1] + b"\x00")
    assert {name for name, _, _ in bad.verify().failed} == {"etag-multipart", "x-amz-checksum-crc32"}


def test_provider_crcs_and_sse_kms() -> None:
    data = b"123456789"
    # Check values of CRC-64/XZ (OSS, COS) and CRC-64/NVME, CRC-32C (AWS).
    checks = expectations(hashlib.md5(data).hexdigest(), {
        "x-oss-hash-crc64ecma": str(0x995DC9BBDF1939FA),
        "x-amz-checksum-crc64nvme": base64.b64encode((0xAE8B14860A799888).to_bytes(8, "big")).decode(),
        "x-amz-checksum-crc32c": base64.b64encode((0xE3069283).to_bytes(4, "big")).decode(),
        "x-amz-checksum-sha256": base64.b64encode(hashlib.sha256(data).digest()).decode()})
    hasher = ObjectHasher(len(data), checks)
    hasher.update(data)
    assert hasher.verify().passed == ["size", "md5", "x-amz-checksum-crc32c", "x-amz-checksum-crc64nvme",
                                      "x-amz-checksum-sha256", "x-oss-hash-crc64ecma"]
    assert crc_implementation("crc64ecma") in ("crcmod", "python")
    # SSE-KMS: the ETag is no MD5, so it is not checked.
    assert expectations("0" * 32, {}, sse="aws:kms") == []


def test_provider_crc_is_computed_only_without_an_md5_etag() -> None:
    """An MD5 ETag (single or multipart) that verifies proves the bytes: a CRC of the same bytes
    adds nothing. Without one (SSE-KMS, SSE-C, an unknown ETag form) the CRC is the check."""
    data = b"x" * 1000
    crc = base64.b64encode(zlib.crc32(data).to_bytes(4, "big")).decode()
    sha = base64.b64encode(hashlib.sha256(data).digest()).decode()
    headers = {"x-amz-checksum-crc32": crc, "x-amz-checksum-sha256": sha,
               "x-oss-hash-crc64ecma": "12345", "x-amz-checksum-crc32c": "AAAAAA==-3"}
    keep, covered = worth_computing(expectations(hashlib.md5(data).hexdigest(), headers))
    assert [c.name for c in keep] == ["md5", "x-amz-checksum-sha256"]  # SHA-256 costs nothing more
    assert {c.name for c in covered} == {"x-amz-checksum-crc32", "x-amz-checksum-crc32c",
                                         "x-oss-hash-crc64ecma"}
    keep, _ = worth_computing(expectations("0" * 32 + "-3", headers))
    assert [c.name for c in keep] == ["etag-multipart", "x-amz-checksum-sha256"]
    for sse in ("aws:kms", "customer"):
        keep, covered = worth_computing(expectations("0" * 32, headers, sse=sse))
        assert not covered and {c.name for c in keep} == set(headers)
    keep, covered = worth_computing(expectations("not-an-md5", {"x-amz-checksum-crc32": crc}))
    assert [c.name for c in keep] == ["x-amz-checksum-crc32"] and not covered
    hasher = ObjectHasher(len(data), keep)
    hasher.update(data)
    assert hasher.verify().passed == ["size", "x-amz-checksum-crc32"]
    # A flipped byte is still caught by the MD5 alone.
    keep, _ = worth_computing(expectations(hashlib.md5(data).hexdigest(), {"x-amz-checksum-crc32": crc}))
    bad = ObjectHasher(len(data), keep)
    bad.update(data[:-1] + b"y")
    assert [name for name, _, _ in bad.verify().failed] == ["md5"]


def test_dicom_walk_agrees_with_pydicom() -> None:
    for obj in synthetic.generate(synthetic.Profile.tiny()):
        body = obj.body()
        full = classify(body, len(body))
        for length in (2048, 64 * 1024, len(body)):
            found = scan(body[:length], len(body))
            if found.need_more:
                continue
            if found.decided:
                assert (found.kind, found.sop_uid, found.study_uid, found.series_uid) == \
                    (full.kind, full.sop_uid, full.study_uid, full.series_uid), obj.case
            break
    assert scan(b"\x89PNG\r\n\x1a\n" + bytes(200), 208).decided is False


def test_paths_stay_inside_and_avoid_our_names(tmp_path) -> None:
    store = FilesystemStore(tmp_path)
    assert safe_key_path("../../etc/passwd") == "%2E%2E/%2E%2E/etc/passwd"
    assert safe_key_path("_quarantine/x.dcm") == "%5Fquarantine/x.dcm"
    assert safe_key_path("a/.cloudexit-123.part") == "a/%2Ecloudexit-123.part"
    assert store.path_for("k", "dicom", "1.2", "../x", "1.3") .startswith("1.2/x-")
    with pytest.raises(StoreError, match="refusing to write outside"):
        store.absolute("../outside")


class _Canned:
    def __init__(self, data: bytes) -> None:
        self.data = data

    def makefile(self, mode: str) -> io.BufferedReader:
        return io.BufferedReader(io.BytesIO(self.data))


@pytest.mark.parametrize("answer", [
    (b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nETag: \"abc\"\r\nX-A: 1\r\nx-a: 2\r\n"
     b"X-Fold: a\r\n  b\r\nX-Amz-Checksum-Crc32:  AAAAAA== \r\n\r\nhello"),
    b"HTTP/1.1 206 Partial Content\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n",
    b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.0 404 Not Found\r\nConnection: close\r\n\r\n<Error/>",
])
def test_lean_response_reads_like_http_client(answer: bytes) -> None:
    ours, stdlib = Response(_Canned(answer), method="GET"), http.client.HTTPResponse(_Canned(answer), method="GET")
    ours.begin()
    stdlib.begin()
    assert (ours.status, ours.reason, ours.version, ours.will_close, ours.length, ours.chunked) == \
        (stdlib.status, stdlib.reason, stdlib.version, stdlib.will_close, stdlib.length, stdlib.chunked)
    assert ours.getheaders() == stdlib.getheaders()
    for name in ("content-length", "ETAG", "x-a", "x-fold", "missing"):
        assert ours.getheader(name) == stdlib.getheader(name), name
    assert ours.read() == stdlib.read()
