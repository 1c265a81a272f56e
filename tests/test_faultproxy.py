"""The fault proxy, proved through boto3 against the real SeaweedFS test server."""

from __future__ import annotations

import hashlib
import http.client
import io
import os
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Iterator

import pytest
from boto3.s3.transfer import TransferConfig
from botocore.auth import SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials
from botocore.exceptions import (ClientError, ConnectionClosedError, EndpointConnectionError,
                                 FlexibleChecksumError, IncompleteReadError, ReadTimeoutError,
                                 ResponseStreamingError)

from cloudexit.testing.s3server import ACCESS_KEY, REGION, SECRET_KEY
from faultproxy import FaultProxy

# What botocore raises when a connection is reset or refused.
CONNECTION_ERRORS = (ConnectionClosedError, EndpointConnectionError)
# What reading a body cut short raises (urllib3 notices, or botocore's length check).
STREAM_ERRORS = (ResponseStreamingError, IncompleteReadError)


def no_retries(proxy: FaultProxy, **config: Any) -> Any:
    return proxy.client(retries={"mode": "standard", "total_max_attempts": 1}, **config)


@pytest.fixture
def proxy(fault_proxy: FaultProxy) -> FaultProxy:
    return fault_proxy


@pytest.fixture
def obj(s3: Any, bucket: str) -> Iterator[tuple[str, str, bytes]]:
    """An object of 1 MiB of random bytes, written directly (not through the proxy)."""
    data = os.urandom(1 << 20)
    s3.client().put_object(Bucket=bucket, Key="dir/obj.bin", Body=data)
    yield bucket, "dir/obj.bin", data


# -- transparent forwarding --------------------------------------------------------------------

def test_forwards_signed_requests_with_original_host(proxy: FaultProxy, bucket: str) -> None:
    client = proxy.client()
    client.put_object(Bucket=bucket, Key="a b+c/ü.txt", Body=b"0123456789")
    head = client.head_object(Bucket=bucket, Key="a b+c/ü.txt")
    assert head["ContentLength"] == 10
    got = client.get_object(Bucket=bucket, Key="a b+c/ü.txt", Range="bytes=2-4",
                            IfMatch=head["ETag"])
    assert got["Body"].read() == b"234"
    with pytest.raises(ClientError) as err:
        client.get_object(Bucket=bucket, Key="a b+c/ü.txt", IfMatch='"nope"')
    assert err.value.response["ResponseMetadata"]["HTTPStatusCode"] == 412
    keys = [o["Key"] for o in client.list_objects_v2(Bucket=bucket)["Contents"]]
    assert keys == ["a b+c/ü.txt"]
    client.delete_object(Bucket=bucket, Key="a b+c/ü.txt")
    assert proxy.count("GET", key="a b+c/ü.txt") == 2
    assert proxy.count("HEAD") == 1 and proxy.count("PUT") == 1 and proxy.count("DELETE") == 1
    # Keep-alive: all of that went over one client connection.
    assert proxy.connections == 1


def test_streams_large_bodies_and_multipart(proxy: FaultProxy, bucket: str) -> None:
    data = os.urandom(12 << 20)
    client = proxy.client()
    config = TransferConfig(multipart_threshold=5 << 20, multipart_chunksize=5 << 20)
    client.upload_fileobj(io.BytesIO(data), bucket, "big", Config=config)
    assert proxy.count("PUT", key="big") == 3  # three parts
    out = io.BytesIO()
    client.download_fileobj(bucket, "big", out, Config=config)
    assert hashlib.md5(out.getvalue()).digest() == hashlib.md5(data).digest()
    assert proxy.bytes_received >= len(data) and proxy.bytes_sent >= len(data)


def test_chunked_upload_passes_through(proxy: FaultProxy, bucket: str, s3: Any) -> None:
    # boto3 sends Content-Length over plain http, so build a chunked PUT by hand.
    url = f"{proxy.endpoint_url}/{bucket}/chunked"
    request = AWSRequest("PUT", url, headers={"Transfer-Encoding": "chunked",
                                              "x-amz-content-sha256": "UNSIGNED-PAYLOAD"})
    SigV4Auth(Credentials(ACCESS_KEY, SECRET_KEY), "s3", REGION).add_auth(request)
    conn = http.client.HTTPConnection("127.0.0.1", proxy.port, timeout=10)
    conn.putrequest("PUT", f"/{bucket}/chunked", skip_host=True, skip_accept_encoding=True)
    for name, value in request.headers.items():
        conn.putheader(name, value)
    conn.putheader("Host", f"127.0.0.1:{proxy.port}")
    conn.endheaders()
    for piece in (b"hello ", b"chunked ", b"world"):
        conn.send(b"%x\r\n%s\r\n" % (len(piece), piece))
    conn.send(b"0\r\n\r\n")
    response = conn.getresponse()
    assert response.status == 200, response.read()
    conn.close()
    assert s3.client().get_object(Bucket=bucket, Key="chunked")["Body"].read() == \
        b"hello chunked world"


# -- faults ------------------------------------------------------------------------------------

def test_slowdown_is_retried_and_then_succeeds(proxy: FaultProxy, obj: tuple) -> None:
    bucket, key, data = obj
    rule = proxy.status(503, "SlowDown", method="GET", key=key, times=2)
    client = proxy.client(retries={"mode": "standard", "total_max_attempts": 3})
    assert client.get_object(Bucket=bucket, Key=key)["Body"].read() == data
    assert rule.fired == 2 and rule.expired
    assert proxy.count("GET", key=key) == 3


def test_errors_are_s3_xml(proxy: FaultProxy, obj: tuple) -> None:
    bucket, key, _ = obj
    proxy.status(500, method="GET", key=key, times=1)
    proxy.status(503, method="GET", key=key)
    client = no_retries(proxy)
    with pytest.raises(ClientError) as err:
        client.get_object(Bucket=bucket, Key=key)
    assert err.value.response["Error"]["Code"] == "InternalError"
    assert err.value.response["ResponseMetadata"]["HTTPStatusCode"] == 500
    with pytest.raises(ClientError) as err:
        client.get_object(Bucket=bucket, Key=key)
    assert err.value.response["Error"]["Code"] == "SlowDown"
    # Other keys and methods are untouched; a PUT's body is consumed, keeping the connection.
    client.put_object(Bucket=bucket, Key="other", Body=b"x" * 100_000)
    assert client.get_object(Bucket=bucket, Key="other")["Body"].read() == b"x" * 100_000


def test_drop_before_headers(proxy: FaultProxy, obj: tuple) -> None:
    bucket, key, data = obj
    proxy.drop(method="GET", key=key, times=1)
    with pytest.raises(CONNECTION_ERRORS):
        no_retries(proxy).get_object(Bucket=bucket, Key=key)
    proxy.drop(method="GET", key=key, times=1)
    client = proxy.client(retries={"mode": "standard", "total_max_attempts": 2})
    assert client.get_object(Bucket=bucket, Key=key)["Body"].read() == data
    assert proxy.resets == 2


def test_drop_after_forwarding_loses_only_the_answer(proxy: FaultProxy, bucket: str,
                                                     s3: Any) -> None:
    proxy.drop(method="PUT", forward=True, times=1)
    with pytest.raises(CONNECTION_ERRORS):
        no_retries(proxy).put_object(Bucket=bucket, Key="landed", Body=b"data")
    assert s3.client().get_object(Bucket=bucket, Key="landed")["Body"].read() == b"data"


def test_drop_mid_body(proxy: FaultProxy, obj: tuple) -> None:
    bucket, key, _ = obj
    proxy.drop(method="GET", key=key, after_bytes=1000, times=1)
    body = no_retries(proxy).get_object(Bucket=bucket, Key=key)["Body"]
    with pytest.raises(STREAM_ERRORS):
        body.read()
    assert proxy.requests[-1].bytes_sent == 1000


def test_truncate_keeps_length_header_and_cuts_body(proxy: FaultProxy, obj: tuple) -> None:
    bucket, key, data = obj
    proxy.truncate(at=5000, key=key, times=1)
    got = no_retries(proxy).get_object(Bucket=bucket, Key=key)
    assert got["ContentLength"] == len(data)
    with pytest.raises(STREAM_ERRORS):
        got["Body"].read()
    assert proxy.bytes_sent == 5000
    # Expired: the next read is whole.
    assert no_retries(proxy).get_object(Bucket=bucket, Key=key)["Body"].read() == data


def test_shorten_announces_and_sends_fewer_bytes(proxy: FaultProxy, obj: tuple) -> None:
    bucket, key, data = obj
    proxy.shorten(by=1000, key=key, times=1)
    client = no_retries(proxy, response_checksum_validation="when_required")
    got = client.get_object(Bucket=bucket, Key=key)
    assert got["ContentLength"] == len(data) - 1000
    assert got["Body"].read() == data[:-1000]  # a whole, well-formed answer, only shorter
    assert client.get_object(Bucket=bucket, Key=key)["Body"].read() == data


def test_pace_holds_the_rate_of_a_body(proxy: FaultProxy, obj: tuple) -> None:
    bucket, key, data = obj
    proxy.pace(4 * len(data))  # 1 MiB at 4 MiB/s: about 0.25 s
    started = time.monotonic()
    assert no_retries(proxy).get_object(Bucket=bucket, Key=key)["Body"].read() == data
    assert time.monotonic() - started >= 0.2
    proxy.pace(None)


def test_flip_corrupts_one_bit(proxy: FaultProxy, obj: tuple) -> None:
    bucket, key, data = obj
    proxy.flip(offset=123_456, key=key, times=1)
    # Without checksum validation the corruption goes through unnoticed by botocore...
    client = no_retries(proxy, response_checksum_validation="when_required")
    got = client.get_object(Bucket=bucket, Key=key)
    body = got["Body"].read()
    assert got["ResponseMetadata"]["HTTPStatusCode"] == 200 and len(body) == len(data)
    assert hashlib.md5(body).hexdigest() != got["ETag"].strip('"')
    diff = [i for i in range(len(data)) if body[i] != data[i]]
    assert diff == [123_456] and body[123_456] ^ data[123_456] == 1
    # ...and with it (SeaweedFS sends x-amz-checksum-crc32), botocore catches it.
    proxy.flip(offset=0, key=key, times=1)
    with pytest.raises(FlexibleChecksumError):
        no_retries(proxy).get_object(Bucket=bucket, Key=key)["Body"].read()


def test_down_cuts_the_link_until_up(proxy: FaultProxy, obj: tuple) -> None:
    bucket, key, data = obj
    client = no_retries(proxy)
    assert client.get_object(Bucket=bucket, Key=key)["Body"].read() == data  # a kept-alive conn
    proxy.down()
    for _ in range(2):  # the kept-alive connection, then a new one
        with pytest.raises(CONNECTION_ERRORS):
            client.head_object(Bucket=bucket, Key=key)
    proxy.up()
    assert client.get_object(Bucket=bucket, Key=key)["Body"].read() == data


def test_down_aborts_a_transfer_in_flight(proxy: FaultProxy, bucket: str, s3: Any) -> None:
    # Bigger than the socket buffers, so the proxy is still sending when the link is cut.
    s3.client().put_object(Bucket=bucket, Key="big", Body=os.urandom(32 << 20))
    body = no_retries(proxy).get_object(Bucket=bucket, Key="big")["Body"]
    assert len(body.read(10)) == 10
    proxy.down()
    with pytest.raises(STREAM_ERRORS):
        body.read()


def test_delay_slows_responses(proxy: FaultProxy, obj: tuple) -> None:
    bucket, key, _ = obj
    proxy.delay(1.0, method="HEAD", times=1)
    client = no_retries(proxy, read_timeout=0.3)
    with pytest.raises(ReadTimeoutError):
        client.head_object(Bucket=bucket, Key=key)
    proxy.delay(0.4, method="HEAD", times=1)
    started = time.monotonic()
    no_retries(proxy).head_object(Bucket=bucket, Key=key)
    assert time.monotonic() - started >= 0.4


def test_probability_is_seeded(s3: Any, obj: tuple) -> None:
    bucket, key, _ = obj

    def failures(seed: int) -> list[bool]:
        with FaultProxy(s3.endpoint_url, seed=seed) as proxy:
            proxy.status(500, method="HEAD", probability=0.5)
            client = no_retries(proxy)
            outcome = []
            for _ in range(20):
                try:
                    client.head_object(Bucket=bucket, Key=key)
                    outcome.append(False)
                except ClientError:
                    outcome.append(True)
            return outcome

    first = failures(7)
    assert first == failures(7)
    assert 3 <= sum(first) <= 17


def test_times_is_exact_under_concurrency(proxy: FaultProxy, obj: tuple) -> None:
    bucket, key, _ = obj
    proxy.status(503, method="HEAD", times=5)
    client = no_retries(proxy, max_pool_connections=8)

    def head(_: int) -> bool:
        try:
            client.head_object(Bucket=bucket, Key=key)
            return True
        except ClientError:
            return False

    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(head, range(40)))
    assert results.count(False) == 5
    assert proxy.count("HEAD", key=key) == 40


# -- archive-tier emulation --------------------------------------------------------------------

def test_archive_needs_restore_then_delay(proxy: FaultProxy, bucket: str, s3: Any) -> None:
    direct = s3.client()
    direct.put_object(Bucket=bucket, Key="cold/a.dcm", Body=b"frozen")
    direct.put_object(Bucket=bucket, Key="hot/b.dcm", Body=b"warm")
    proxy.archive(r"^cold/", "DEEP_ARCHIVE", restore_delay=0.5)
    client = no_retries(proxy)

    contents = client.list_objects_v2(Bucket=bucket)["Contents"]
    listed = {o["Key"]: o["StorageClass"] for o in contents}
    assert listed == {"cold/a.dcm": "DEEP_ARCHIVE", "hot/b.dcm": "STANDARD"}
    head = client.head_object(Bucket=bucket, Key="cold/a.dcm")
    assert head["StorageClass"] == "DEEP_ARCHIVE" and "Restore" not in head
    with pytest.raises(ClientError) as err:
        client.get_object(Bucket=bucket, Key="cold/a.dcm")
    assert err.value.response["Error"]["Code"] == "InvalidObjectState"
    assert err.value.response["ResponseMetadata"]["HTTPStatusCode"] == 403
    with pytest.raises(ClientError) as err:  # missing archived keys are still 404
        client.get_object(Bucket=bucket, Key="cold/missing.dcm")
    assert err.value.response["Error"]["Code"] == "NoSuchKey"
    assert client.get_object(Bucket=bucket, Key="hot/b.dcm")["Body"].read() == b"warm"

    restore = {"Days": 2, "GlacierJobParameters": {"Tier": "Bulk"}}
    first = client.restore_object(Bucket=bucket, Key="cold/a.dcm", RestoreRequest=restore)
    assert first["ResponseMetadata"]["HTTPStatusCode"] == 202
    with pytest.raises(ClientError) as err:
        client.restore_object(Bucket=bucket, Key="cold/a.dcm", RestoreRequest=restore)
    assert err.value.response["Error"]["Code"] == "RestoreAlreadyInProgress"
    assert err.value.response["ResponseMetadata"]["HTTPStatusCode"] == 409
    assert client.head_object(Bucket=bucket, Key="cold/a.dcm")["Restore"] == \
        'ongoing-request="true"'
    with pytest.raises(ClientError) as err:
        client.get_object(Bucket=bucket, Key="cold/a.dcm")
    assert err.value.response["Error"]["Code"] == "InvalidObjectState"

    time.sleep(0.6)
    head = client.head_object(Bucket=bucket, Key="cold/a.dcm")
    assert head["Restore"].startswith('ongoing-request="false", expiry-date="')
    assert head["StorageClass"] == "DEEP_ARCHIVE"
    assert client.get_object(Bucket=bucket, Key="cold/a.dcm")["Body"].read() == b"frozen"
    again = client.restore_object(Bucket=bucket, Key="cold/a.dcm", RestoreRequest=restore)
    assert again["ResponseMetadata"]["HTTPStatusCode"] == 200


def test_stop_closes_kept_alive_connections(s3: Any) -> None:
    proxy = FaultProxy(s3.endpoint_url).start()
    port = proxy.port
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    conn.request("HEAD", "/")  # unsigned, so refused upstream, but the connection stays open
    conn.getresponse().read()
    proxy.stop()
    try:
        assert conn.sock.recv(1) == b""  # the proxy closed it
    except ConnectionResetError:
        pass
    conn.close()
    with pytest.raises(ConnectionRefusedError):
        http.client.HTTPConnection("127.0.0.1", port, timeout=5).connect()
