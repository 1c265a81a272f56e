"""One classification of what goes wrong when talking to an S3 store.

Every path to the store (boto3 in `source.py` and `cleanup.py`, the lean `http.client` requests of
`lean.py` and the transfer workers) meets the same answers: an HTTP status with an S3 error code
and message, no answer at all, a TLS failure, no credentials. `classify_answer` is the one rule
that turns an answer into an `ErrorKind`, and `classify` applies it to a botocore exception.
What a kind means to the user is `Source.error` (one message per kind, naming the endpoint);
what it means to a run (retry, wait for the link, stop, record per object) is the caller's.
"""

from __future__ import annotations

import re
import ssl
from dataclasses import dataclass
from enum import StrEnum


class ErrorKind(StrEnum):
    """What went wrong, as the engine and the messages need to tell it apart."""

    UNREACHABLE = "unreachable"  # no answer: refused, reset, timed out (link down?)
    TLS = "tls"  # certificate not trusted, or no TLS on that port: waiting will not fix it
    NO_CREDENTIALS = "no-credentials"  # nothing to sign requests with
    CREDENTIALS = "credentials"  # the store refused the credentials: stop the run
    DENIED = "denied"  # 403 on this bucket or object
    CHANGED = "changed"  # 412: no longer the ETag that was inventoried
    GONE = "gone"  # 404: deleted since listed (code NoSuchBucket: no such bucket)
    ARCHIVED = "archived"  # in an archive storage class: needs a restore first
    SSE_C = "sse-c"  # encrypted with a customer-provided key the store wants with each GET
    TRANSIENT = "transient"  # 5xx, throttling, a cut or unreadable answer: retry
    PERMANENT = "permanent"  # any other answer
    # Raised by the transfer workers themselves, never by an answer of the store:
    CORRUPT = "corrupt"  # the bytes did not verify: retry
    CUT = "cut"  # the body stopped early
    DISK = "disk"  # the destination is full or not writable: stop the run
    CANCELLED = "cancelled"  # the run is stopping


CREDENTIAL_CODES = frozenset({
    "InvalidAccessKeyId", "SignatureDoesNotMatch", "ExpiredToken", "InvalidToken",
    "TokenRefreshRequired", "AuthorizationHeaderMalformed", "ExpiredTokenException",
    "RequestTimeTooSkewed"})
TRANSIENT_CODES = frozenset({
    "SlowDown", "InternalError", "ServiceUnavailable", "RequestTimeout", "Throttling",
    "ThrottlingException", "RequestLimitExceeded", "BadDigest", "OperationAborted",
    "IncompleteBody"})
# A GET of an SSE-C object without its key: AWS answers 400 InvalidRequest "The object was stored
# using a form of Server Side Encryption...", SeaweedFS 400 InvalidArgument "Requests specifying
# Server Side Encryption with Customer provided keys must provide the customer key."
_SSE_C = re.compile(r"Server[ -]Side Encryption", re.IGNORECASE)


def classify_answer(status: int | None, code: str | None, message: str = "") -> ErrorKind:
    """The kind of an S3 error answer: its HTTP status, its `<Code>` (None or the status as text
    when the answer had no body) and its `<Message>`."""
    code = code or ""
    if status == 412 or code == "PreconditionFailed":
        return ErrorKind.CHANGED
    if status == 404 or code in ("NoSuchKey", "NotFound", "NoSuchBucket"):
        return ErrorKind.GONE
    if code == "InvalidObjectState":
        return ErrorKind.ARCHIVED
    if status == 400 and _SSE_C.search(message):
        return ErrorKind.SSE_C
    if code in CREDENTIAL_CODES or (status in (400, 401) and "token" in code.lower()):
        return ErrorKind.CREDENTIALS
    if (status or 0) >= 500 or code in TRANSIENT_CODES or status == 429:
        return ErrorKind.TRANSIENT
    if status == 403:
        return ErrorKind.DENIED
    return ErrorKind.PERMANENT


@dataclass(frozen=True)
class Failure:
    """A classified failure: its kind, what the transport said, and the answer if there was one."""

    kind: ErrorKind
    detail: str
    status: int | None = None
    code: str | None = None


def classify(exc: BaseException, what: str) -> Failure | None:
    """A botocore exception (from a call about `what`) classified; None for anything else."""
    from botocore.exceptions import (
        ClientError,
        HTTPClientError,
        NoCredentialsError,
        PartialCredentialsError,
        SSLError,
    )
    from botocore.exceptions import ConnectionError as BotoConnectionError

    if isinstance(exc, SSLError):  # before ConnectionError, its base: waiting will not fix it
        return Failure(ErrorKind.TLS, tls_detail(exc))
    if isinstance(exc, (NoCredentialsError, PartialCredentialsError)):
        return Failure(ErrorKind.NO_CREDENTIALS, str(exc))
    # Refused, reset, closed or timed out: the endpoint is not answering.
    if isinstance(exc, (BotoConnectionError, HTTPClientError)):
        return Failure(ErrorKind.UNREACHABLE, str(exc))
    if isinstance(exc, ClientError):
        err = exc.response.get("Error", {})
        code = str(err.get("Code", ""))
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        message = err.get("Message", exc)
        return Failure(classify_answer(status, code, str(message)),
                       f"{what}: {code or status}: {message}", status, code)
    return None


def tls_detail(exc: BaseException) -> str:
    """The useful part of a TLS failure: the ssl error that botocore wraps (in urllib3's)."""
    from cloudexit.s3.client import tls_failure

    seen: set[int] = set()
    cause: BaseException | None = exc
    while cause is not None and id(cause) not in seen:
        seen.add(id(cause))
        if isinstance(cause, ssl.SSLError):
            return tls_failure(cause)
        cause = cause.__cause__ or cause.__context__
    return "TLS failed"
