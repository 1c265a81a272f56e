"""One classification of the store's failures (cloudexit/s3/errors.py), and the same error from
the boto3 path (`Source`) and the lean path (`LeanS3`) for the same answer of a real store."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
from botocore.exceptions import (
    ClientError,
    EndpointConnectionError,
    NoCredentialsError,
    ReadTimeoutError,
    SSLError,
)

from cloudexit.core.config import SourceConfig
from cloudexit.core.errors import (
    BucketNotFound,
    CredentialsError,
    CustomerKeyRequired,
    EndpointUnreachable,
    ObjectArchived,
    SourceError,
    TLSError,
    UsageError,
)
from cloudexit.s3.errors import ErrorKind, Failure, classify, classify_answer
from cloudexit.s3.lean import LeanS3
from cloudexit.s3.source import ObjectChanged, ObjectGone, Source
from cloudexit.testing.s3server import SeaweedServer

K = ErrorKind
AWS_SSE_C = ("The object was stored using a form of Server Side Encryption. The correct "
             "parameters must be provided to retrieve the object.")
SEAWEED_SSE_C = ("Requests specifying Server Side Encryption with Customer provided keys must "
                 "provide the customer key.")


@pytest.mark.parametrize("status,code,message,kind", [
    (412, "PreconditionFailed", "", K.CHANGED),
    (412, "412", "", K.CHANGED),  # a HEAD's answer has no body: the code is the status
    (404, "NoSuchKey", "", K.GONE),
    (404, "404", "", K.GONE),
    (404, "NoSuchBucket", "", K.GONE),  # the message side tells bucket from object
    (403, "InvalidObjectState", "The operation is not valid for the object's storage class", K.ARCHIVED),
    (400, "InvalidRequest", AWS_SSE_C, K.SSE_C),
    (400, "InvalidArgument", SEAWEED_SSE_C, K.SSE_C),
    (400, "InvalidArgument", "Invalid argument", K.PERMANENT),
    (403, "InvalidAccessKeyId", "", K.CREDENTIALS),
    (403, "SignatureDoesNotMatch", "", K.CREDENTIALS),
    (400, "ExpiredToken", "", K.CREDENTIALS),
    (403, "RequestTimeTooSkewed", "", K.CREDENTIALS),
    (400, "InvalidTokenId", "", K.CREDENTIALS),  # any 400/401 code about a token
    (401, "Unauthorized", "", K.PERMANENT),
    (500, "InternalError", "", K.TRANSIENT),
    (503, "SlowDown", "", K.TRANSIENT),
    (502, "502", "", K.TRANSIENT),
    (429, "TooManyRequests", "", K.TRANSIENT),
    (400, "RequestTimeout", "", K.TRANSIENT),
    (403, "AccessDenied", "", K.DENIED),
    (403, "AllAccessDisabled", "", K.DENIED),
    (403, "403", "", K.DENIED),
    (409, "BucketNotEmpty", "", K.PERMANENT),
    (None, None, "", K.PERMANENT),
])
def test_an_answer_has_one_kind(status: int | None, code: str | None, message: str, kind: ErrorKind) -> None:
    assert classify_answer(status, code, message) == kind


def _client_error(status: int, code: str, message: str = "m") -> ClientError:
    return ClientError({"Error": {"Code": code, "Message": message},
                        "ResponseMetadata": {"HTTPStatusCode": status}}, "GetObject")


@pytest.mark.parametrize("exc,kind", [
    (_client_error(404, "NoSuchKey"), K.GONE),
    (_client_error(412, "PreconditionFailed"), K.CHANGED),
    (_client_error(403, "InvalidObjectState"), K.ARCHIVED),
    (_client_error(400, "InvalidRequest", AWS_SSE_C), K.SSE_C),
    (_client_error(403, "SignatureDoesNotMatch"), K.CREDENTIALS),
    (_client_error(403, "AccessDenied"), K.DENIED),
    (_client_error(503, "SlowDown"), K.TRANSIENT),
    (_client_error(409, "BucketNotEmpty"), K.PERMANENT),
    (EndpointConnectionError(endpoint_url="https://s3.example"), K.UNREACHABLE),
    (ReadTimeoutError(endpoint_url="https://s3.example"), K.UNREACHABLE),
    (SSLError(endpoint_url="https://s3.example", error="certificate verify failed"), K.TLS),
    (NoCredentialsError(), K.NO_CREDENTIALS),
])
def test_a_botocore_exception_has_the_kind_of_its_answer(exc: Exception, kind: ErrorKind) -> None:
    failure = classify(exc, "object 'a'")
    assert failure is not None and failure.kind == kind


def test_anything_else_is_not_classified() -> None:
    assert classify(ValueError("x"), "object 'a'") is None


@pytest.mark.parametrize("failure,what,error", [
    (Failure(K.GONE, "d", 404, "NoSuchKey"), "object 'a'", ObjectGone),
    (Failure(K.GONE, "d", 404, "NoSuchBucket"), "object 'a'", BucketNotFound),
    (Failure(K.GONE, "d", 404, "404"), "bucket b", BucketNotFound),  # HEAD of the bucket
    (Failure(K.CHANGED, "d", 412, "PreconditionFailed"), "object 'a'", ObjectChanged),
    (Failure(K.UNREACHABLE, "refused"), "object 'a'", EndpointUnreachable),
    (Failure(K.TLS, "not trusted"), "object 'a'", TLSError),
    (Failure(K.NO_CREDENTIALS, "none"), "object 'a'", CredentialsError),
    (Failure(K.CREDENTIALS, "d", 403, "InvalidAccessKeyId"), "object 'a'", CredentialsError),
    (Failure(K.DENIED, "d", 403, "AccessDenied"), "object 'a'", CredentialsError),
    (Failure(K.ARCHIVED, "d", 403, "InvalidObjectState"), "object 'a'", ObjectArchived),
    (Failure(K.SSE_C, "d", 400, "InvalidRequest"), "object 'a'", CustomerKeyRequired),
    (Failure(K.TRANSIENT, "d", 503, "SlowDown"), "object 'a'", SourceError),
    (Failure(K.PERMANENT, "d", 409, "BucketNotEmpty"), "object 'a'", SourceError),
])
def test_each_kind_has_one_error(failure: Failure, what: str, error: type[Exception]) -> None:
    got = Source("s3://b").error(failure, what)
    assert type(got) is error
    assert what in str(got) or failure.detail in str(got) or "b" in str(got)


# --- the same answer of a real store, through both paths ------------------------------------------

def _paths(s3: SeaweedServer, bucket: str, monkeypatch: pytest.MonkeyPatch,
           secret: str | None = None) -> tuple[Source, LeanS3]:
    for name, value in s3.env().items():
        monkeypatch.setenv(name, value)
    if secret is not None:
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", secret)
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    source = Source(f"s3://{bucket}", SourceConfig(endpoint_url=s3.endpoint_url, max_attempts=1))
    return source, LeanS3(source)


def _raised(call: Any) -> Exception:
    with pytest.raises(Exception) as info:
        call()
    return info.value


def _both(source: Source, lean: LeanS3, key: str, etag: str | None = None) -> tuple[Exception, Exception]:
    boto = _raised(lambda: source.read_range(key, 0, 9, etag))
    fast = _raised(lambda: lean.read_range(key, 0, 9, etag))
    return boto, fast


def test_boto3_and_lean_reads_raise_the_same_error(s3: SeaweedServer, bucket: str,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    s3.client().put_object(Bucket=bucket, Key="a.dcm", Body=b"0123456789")
    source, lean = _paths(s3, bucket, monkeypatch)
    try:
        cases = {
            "gone": _both(source, lean, "missing.dcm"),
            "changed": _both(source, lean, "a.dcm", etag="0" * 32),
        }
        missing_source, missing_lean = _paths(s3, bucket + "-missing", monkeypatch)
        cases["no bucket"] = _both(missing_source, missing_lean, "a.dcm")
        missing_lean.close()
    finally:
        lean.close()
    for case, (boto, fast) in cases.items():
        assert type(boto) is type(fast), case
        assert str(boto) == str(fast), case
    assert isinstance(cases["gone"][0], ObjectGone)
    assert isinstance(cases["changed"][0], ObjectChanged)
    assert isinstance(cases["no bucket"][0], BucketNotFound)


def test_refused_credentials_are_the_same_error_on_both_paths(s3: SeaweedServer, bucket: str,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    s3.client().put_object(Bucket=bucket, Key="a.dcm", Body=b"0123456789")
    source, lean = _paths(s3, bucket, monkeypatch, secret="wrong-secret")
    try:
        boto, fast = _both(source, lean, "a.dcm")
    finally:
        lean.close()
    assert type(boto) is type(fast) is CredentialsError
    assert str(boto) == str(fast) and "wrong-secret" not in str(boto)


def test_an_sse_c_object_needs_its_key_on_both_paths(s3: SeaweedServer, bucket: str,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """boto3's path said a bare SourceError here, the lean path CustomerKeyRequired: the
    inventory records the second as unreadable for want of the key."""
    s3.client().put_object(Bucket=bucket, Key="sealed.dcm", Body=b"0123456789",
                           SSECustomerAlgorithm="AES256", SSECustomerKey=os.urandom(32))
    source, lean = _paths(s3, bucket, monkeypatch)
    try:
        boto, fast = _both(source, lean, "sealed.dcm")
    finally:
        lean.close()
    assert type(boto) is type(fast) is CustomerKeyRequired
    assert str(boto) == str(fast)


@pytest.mark.parametrize("endpoint", ["notaurl", "s3.example.org:9000", "ftp://host", "http://",
                                      "http://host:notaport", "https://[::1", "https://host:99999"])
def test_an_endpoint_that_is_no_http_url_is_one_usage_error(cli: Any, tmp_path: Path, endpoint: str) -> None:
    """Before any client is made (botocore raised ValueError out of the CLI for some of these,
    and took others for a missing credential)."""
    with pytest.raises(UsageError, match="not an http"):
        Source("s3://bucket", SourceConfig(endpoint_url=endpoint))
    result = cli("inventory", "s3://bucket", "--db", str(tmp_path / "s.db"), "--endpoint-url", endpoint)
    assert result.exit_code == 2 and "Traceback" not in result.output, result.output
    assert "--endpoint-url" in result.output and "https://HOST" in result.output, result.output
