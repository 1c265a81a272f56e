"""The download path of `migrate`: a lean S3 GET client and the worker processes that use it.

Why not boto3 here: on a small machine, per-request Python CPU is what limits a download of
thousands of 0.5 MB objects (botocore spends ~1.5 ms of CPU per GET before a byte moves; see
docs/performance.md). This module keeps botocore for what it is good at (credential chains,
error translation, the rare RestoreObject; see `source.py`) and does the hot path itself:

* SigV4 signing with the standard library (`hmac`, `hashlib`), the signing key cached per day;
  checked against botocore's signer in the tests, and against the real server on every request;
* `http.client` keep-alive connections, one per thread, reused for thousands of requests;
* bodies read into one reusable buffer and fed to MD5 + SHA-256 (+ provider checksums) in C
  (`cloudexit.checksums`), written with `os.write`, so the GIL is mostly released;
* worker processes (one per CPU by default), each with a few threads, fed by the engine in
  `migrate.py`, which alone writes the state DB.

Every GET carries `If-Match` with the inventoried ETag, so bytes of two versions are never
mixed, and `x-amz-checksum-mode: ENABLED` so S3 returns the object's stored checksums.
"""

from __future__ import annotations

import ctypes
import datetime as _dt
import errno
import hashlib
import hmac
import http.client
import os
import queue
import random
import re
import signal
import socket
import ssl
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable
from urllib.parse import quote, urlsplit

from cloudexit.core.checksums import (
    CheckResult,
    Expectation,
    ObjectHasher,
    expectations,
    part_bounds,
    worth_computing,
)
from cloudexit.dicom.scan import scan
from cloudexit.state.meter import Meter
from cloudexit.s3.parts import RAISE_KINDS, learn_part_sizes

EMPTY_SHA256 = hashlib.sha256(b"").hexdigest()
CREDENTIAL_CODES = {"InvalidAccessKeyId", "SignatureDoesNotMatch", "ExpiredToken", "InvalidToken",
                    "TokenRefreshRequired", "AuthorizationHeaderMalformed", "ExpiredTokenException",
                    "RequestTimeTooSkewed"}
TRANSIENT_CODES = {"SlowDown", "InternalError", "ServiceUnavailable", "RequestTimeout",
                   "Throttling", "ThrottlingException", "RequestLimitExceeded", "BadDigest",
                   "OperationAborted", "IncompleteBody"}
_CODE = re.compile(rb"<Code>([^<]+)</Code>")
_MESSAGE = re.compile(rb"<Message>([^<]*)</Message>")
# A GET of an SSE-C object without its key: AWS answers 400 InvalidRequest "The object was stored
# using a form of Server Side Encryption...", SeaweedFS 400 InvalidArgument "Requests specifying
# Server Side Encryption with Customer provided keys must provide the customer key."
_SSE_C = re.compile(rb"<Message>[^<]*Server[ -]Side Encryption", re.IGNORECASE)
HEADER_BYTES = 64 * 1024  # first bytes kept in memory for the DICOM check
# Large objects: how often the ranges' progress is fsynced and reported for resume. A kill loses
# at most this much (plus the engine's commit interval) of each object's download.
CHECKPOINT_SECONDS = 0.5
TEMP_PREFIX = ".cloudexit-"  # temp files are hidden and never a name a layout produces


# -- errors ------------------------------------------------------------------------------------
class FetchError(Exception):
    """A failed request or transfer, classified for the engine.

    kind: unreachable (no answer: link down?), transient (5xx, throttling, a cut body: retry),
    corrupt (bytes did not verify: retry), changed (412), gone (404), archived (needs a restore),
    credentials (refused: stop the run), tls (certificate not trusted, or no TLS on that port:
    the engine waits and probes, saying why), denied (403 on this object), disk (destination
    full or not writable: stop the run), permanent (anything else, recorded per object).
    """

    def __init__(self, kind: str, detail: str, status: int | None = None, code: str | None = None,
                 restart: bool = False) -> None:
        super().__init__(detail)
        self.kind, self.detail, self.status, self.code = kind, detail, status, code
        self.restart = restart  # a resumed temp file did not verify: start over from byte 0


DISK_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EIO}


def disk_error(exc: OSError, what: str) -> FetchError:
    # strerror: ours say more where we raise them (a folder that resolves outside the archive)
    return FetchError("disk", f"{what}: {exc.strerror or os.strerror(exc.errno or 0)} "
                      f"({errno.errorcode.get(exc.errno or 0, '?')})",
                      code=errno.errorcode.get(exc.errno or 0))


# -- where the bucket is -------------------------------------------------------------------------
@dataclass(frozen=True)
class Endpoint:
    """How to address objects of one bucket (picklable: handed to the worker processes)."""

    scheme: str
    host: str  # host[:port] as sent in the Host header
    port: int
    bucket: str
    region: str
    path_style: bool
    verify: bool | str = True  # TLS verification: True, False, or a CA bundle path
    proxy: str | None = None  # http://host:port from HTTPS_PROXY / HTTP_PROXY
    connect_timeout: float = 10.0
    read_timeout: float = 60.0
    rcvbuf: int = 0  # SO_RCVBUF when a bandwidth limit is set (keeps the kernel from bursting)

    @classmethod
    def from_url(cls, endpoint_url: str, bucket: str, region: str, path_style: bool,
                 **kwargs: Any) -> "Endpoint":
        parts = urlsplit(endpoint_url)
        scheme = parts.scheme or "https"
        port = parts.port or (443 if scheme == "https" else 80)
        host = parts.hostname or ""
        if not path_style:
            host = f"{bucket}.{host}"
        netloc = host if parts.port is None else f"{host}:{parts.port}"
        return cls(scheme, netloc, port, bucket, region, path_style, **kwargs)

    @property
    def hostname(self) -> str:
        """`host` without its port (IPv6 literals, with several colons, kept whole)."""
        return self.host.rsplit(":", 1)[0] if self.host.count(":") == 1 else self.host

    def path(self, key: str) -> str:
        """The canonical (and request) path of `key`: S3 encodes once, keeps '/'."""
        encoded = quote(key, safe="/~")
        if self.path_style:
            return f"/{quote(self.bucket, safe='')}/{encoded}"
        return f"/{encoded}"

    def bucket_path(self) -> str:
        return f"/{quote(self.bucket, safe='')}/" if self.path_style else "/"


@dataclass(frozen=True)
class Credentials:
    access_key: str
    secret_key: str = field(repr=False)
    token: str | None = field(default=None, repr=False)


# -- SigV4 -----------------------------------------------------------------------------------------
class Signer:
    """AWS Signature Version 4 for S3 requests without a body (GET, HEAD)."""

    def __init__(self, credentials: Credentials, region: str, service: str = "s3") -> None:
        self.credentials = credentials
        self.region = region
        self.service = service
        self._keys: dict[str, bytes] = {}

    def _key(self, day: str) -> bytes:
        key = self._keys.get(day)
        if key is None:
            key = ("AWS4" + self.credentials.secret_key).encode()
            for part in (day, self.region, self.service, "aws4_request"):
                key = hmac.new(key, part.encode(), hashlib.sha256).digest()
            self._keys = {day: key}
        return key

    def sign(self, method: str, host: str, path: str, query: dict[str, str] | None = None,
             headers: dict[str, str] | None = None, when: _dt.datetime | None = None) -> dict[str, str]:
        """Headers (lower-case names) to send, Authorization included."""
        when = when or _dt.datetime.now(_dt.timezone.utc)
        amz_date = when.strftime("%Y%m%dT%H%M%SZ")
        day = amz_date[:8]
        signed = {"host": host, "x-amz-content-sha256": EMPTY_SHA256, "x-amz-date": amz_date}
        if self.credentials.token:
            signed["x-amz-security-token"] = self.credentials.token
        for name, value in (headers or {}).items():
            signed[name.lower()] = str(value)
        names = sorted(signed)
        canonical_query = "&".join(
            f"{quote(k, safe='-_.~')}={quote(v, safe='-_.~')}" for k, v in sorted((query or {}).items()))
        canonical = "\n".join([
            method, path, canonical_query,
            "".join(f"{n}:{' '.join(signed[n].split())}\n" for n in names),
            ";".join(names), EMPTY_SHA256])
        scope = f"{day}/{self.region}/{self.service}/aws4_request"
        to_sign = "\n".join(["AWS4-HMAC-SHA256", amz_date, scope,
                             hashlib.sha256(canonical.encode()).hexdigest()])
        signature = hmac.new(self._key(day), to_sign.encode(), hashlib.sha256).hexdigest()
        signed["authorization"] = (f"AWS4-HMAC-SHA256 Credential={self.credentials.access_key}/{scope}, "
                                   f"SignedHeaders={';'.join(names)}, Signature={signature}")
        return signed


# -- bandwidth ----------------------------------------------------------------------------------
class SharedRate:
    """A token bucket shared by all worker processes (shared memory + a lock).

    rate < 0: unlimited; 0: paused; > 0: bytes per second. Callers take what they read and
    sleep off any debt, so the aggregate rate holds however many streams run.
    """

    def __init__(self, ctx: Any) -> None:
        self.values = ctx.RawArray("d", 3)  # rate, tokens, last refill (monotonic)
        self.values[0] = -1.0
        self.lock = ctx.Lock()

    def set(self, rate: float | None) -> None:
        with self.lock:
            new = -1.0 if rate is None else float(rate)
            if new != self.values[0]:
                self.values[0] = new
                self.values[1] = 0.0
                self.values[2] = time.monotonic()

    @property
    def rate(self) -> float | None:
        value = self.values[0]
        return None if value < 0 else value

    def take(self, n: int, stop: Any = None) -> None:
        if self.values[0] < 0:
            return  # unlimited: no need for the cross-process lock (one aligned double, read whole)
        while True:
            with self.lock:
                rate = self.values[0]
                if rate < 0:
                    return
                now = time.monotonic()
                if rate > 0:
                    burst = max(rate * 0.2, 65536.0)
                    tokens = min(self.values[1] + (now - self.values[2]) * rate, burst) - n
                    self.values[1], self.values[2] = tokens, now
                    wait = -tokens / rate if tokens < 0 else 0.0
                    if wait <= 0:
                        return
                else:
                    self.values[2] = now
                    wait = -1.0
            if wait > 0:
                time.sleep(min(wait, 5.0))
                if wait <= 5.0:
                    return
                continue  # a long debt (the rate fell): keep sleeping in steps
            if stop is not None and stop.is_set():
                return
            time.sleep(0.25)  # paused


# -- HTTP ---------------------------------------------------------------------------------------------
@dataclass
class Counters:
    get: int = 0
    head: int = 0
    list: int = 0
    bytes: int = 0  # body bytes received, retries and discarded attempts included

    def add(self, other: "Counters") -> None:
        self.get += other.get
        self.head += other.head
        self.list += other.list
        self.bytes += other.bytes


class Headers:
    """Response headers, read without the `email` parser that http.client uses (measured: 0.1-0.3
    ms less user CPU per GET, of ~0.6-0.9 ms for a 0.5 KB object). What `HTTPResponse` asks of
    its `headers`: get, get_all, items; names case-insensitive."""

    __slots__ = ("_first", "_items")

    def __init__(self, items: list[tuple[str, str]]) -> None:
        self._items = items
        self._first: dict[str, str] = {}
        for name, value in items:
            self._first.setdefault(name.lower(), value)

    def get(self, name: str, default: Any = None) -> Any:
        return self._first.get(name.lower(), default)

    def get_all(self, name: str, failobj: Any = None) -> Any:
        name = name.lower()
        found = [v for k, v in self._items if k.lower() == name]
        return found or failobj

    def items(self) -> list[tuple[str, str]]:
        return list(self._items)

    def __contains__(self, name: str) -> bool:
        return name.lower() in self._first


class Response(http.client.HTTPResponse):
    """`http.client.HTTPResponse` with a lean header parser; bodies are read as the stdlib does
    (Content-Length, chunked, keep-alive and close semantics unchanged)."""

    def begin(self) -> None:
        if self.headers is not None:
            return
        while True:
            version, status, reason = self._read_status()  # type: ignore[attr-defined]
            if status != http.client.CONTINUE:
                break
            self._read_header_lines()
        self.code = self.status = status
        self.reason = reason.strip()
        if version in ("HTTP/1.0", "HTTP/0.9"):
            self.version = 10
        elif version.startswith("HTTP/1."):
            self.version = 11
        else:
            raise http.client.UnknownProtocol(version)
        self.headers = self.msg = Headers(self._read_header_lines())  # type: ignore[assignment]
        tr_enc = self.headers.get("transfer-encoding")
        self.chunked = bool(tr_enc and tr_enc.lower() == "chunked")
        self.chunk_left = None
        self.will_close = self._check_close()  # type: ignore[attr-defined]
        self.length = None
        length = self.headers.get("content-length")
        if length and not self.chunked:
            try:
                self.length = int(length)
            except ValueError:
                self.length = None
            else:
                if self.length < 0:
                    self.length = None
        if (status in (http.client.NO_CONTENT, http.client.NOT_MODIFIED) or 100 <= status < 200
                or self._method == "HEAD"):  # type: ignore[attr-defined]
            self.length = 0
        if not self.will_close and not self.chunked and self.length is None:
            self.will_close = True

    def readinto(self, b: Any) -> int:
        """What `HTTPResponse.readinto` does, but returning what one read of the socket brought
        (`readinto1`) instead of waiting for `b` to fill: bytes are written and counted as they
        come, so on a slow link a kill loses none that were counted as received."""
        if self.fp is None or self.chunked or self._method == "HEAD":  # type: ignore[attr-defined]
            return super().readinto(b)
        if self.length is not None and len(b) > self.length:
            b = memoryview(b)[0:self.length]
        n = self.fp.readinto1(b)
        if not n and b:
            self._close_conn()  # type: ignore[attr-defined]
        elif self.length is not None:
            self.length -= n
            if not self.length:
                self._close_conn()  # type: ignore[attr-defined]
        return n

    def _read_header_lines(self) -> list[tuple[str, str]]:
        items: list[tuple[str, str]] = []
        while True:
            line = self.fp.readline(65537)
            if len(line) > 65536:
                raise http.client.LineTooLong("header line")
            if line in (b"\r\n", b"\n", b""):
                return items
            if len(items) >= 100:
                raise http.client.HTTPException("got more than 100 headers")
            text = line.decode("iso-8859-1")
            if text[:1] in (" ", "\t") and items:  # obsolete line folding, kept as the stdlib does
                name, value = items[-1]
                items[-1] = (name, value + "\r\n" + text.rstrip("\r\n"))
                continue
            name, sep, value = text.partition(":")
            if sep:
                items.append((name, value.lstrip(" \t").rstrip("\r\n")))


class S3Reader:
    """Signed GET/HEAD over keep-alive connections, one per thread."""

    def __init__(self, endpoint: Endpoint, credentials: Credentials) -> None:
        self.endpoint = endpoint
        self.signer = Signer(credentials, endpoint.region)
        self._local = threading.local()
        self._ssl: ssl.SSLContext | None = None
        self.meter: Meter | None = None  # a worker process's egress meter (meter.py)

    def set_credentials(self, credentials: Credentials) -> None:
        if credentials != self.signer.credentials:
            self.signer = Signer(credentials, self.endpoint.region)

    def ssl_context(self) -> ssl.SSLContext:
        if self._ssl is None:
            verify = self.endpoint.verify
            if verify is False:
                ctx = ssl._create_unverified_context()  # noqa: S323 - the user asked (--no-verify-ssl)
            else:
                ctx = ssl.create_default_context(cafile=verify if isinstance(verify, str) else None)
            self._ssl = ctx
        return self._ssl

    def _connection(self, fresh: bool = False) -> http.client.HTTPConnection:
        conn = getattr(self._local, "conn", None)
        if conn is not None and not fresh:
            return conn
        if conn is not None:
            conn.close()
        ep = self.endpoint
        host = ep.hostname
        if ep.proxy:
            proxy = urlsplit(ep.proxy)
            target: tuple[str, int] = (proxy.hostname or "", proxy.port or 8080)
        else:
            target = (host, ep.port)
        if ep.scheme == "https":
            conn = http.client.HTTPSConnection(*target, timeout=ep.connect_timeout, context=self.ssl_context())
            if ep.proxy:
                conn.set_tunnel(host, ep.port)
        else:
            conn = http.client.HTTPConnection(*target, timeout=ep.connect_timeout)
        conn.response_class = Response
        conn.connect()
        conn.sock.settimeout(ep.read_timeout)
        conn.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if ep.rcvbuf:
            conn.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, ep.rcvbuf)
        self._local.conn = conn
        return conn

    def _open(self, fresh: bool) -> http.client.HTTPConnection:
        """`_connection`, with TLS failures told apart from outages: waiting does not fix an
        untrusted certificate or a port that does not speak TLS."""
        try:
            return self._connection(fresh)
        except ssl.SSLError as exc:
            self.close()
            if isinstance(exc, (ssl.SSLEOFError, ssl.SSLZeroReturnError)):
                raise  # the connection was cut during the handshake: an outage, maybe
            raise FetchError("tls", tls_failure(exc, self.endpoint.hostname)) from exc

    def close(self) -> None:
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            conn.close()
            self._local.conn = None

    def request(self, method: str, key: str | None, query: dict[str, str] | None = None,
                headers: dict[str, str] | None = None, counters: Counters | None = None
                ) -> http.client.HTTPResponse:
        """Send a signed request; return the response with its body unread (status checked by
        the caller). Raises FetchError("unreachable") when no answer came."""
        ep = self.endpoint
        path = ep.path(key) if key is not None else ep.bucket_path()
        signed = self.signer.sign(method, ep.host, path, query, headers)
        target = path
        if query:
            target += "?" + "&".join(f"{quote(k, safe='-_.~')}={quote(v, safe='-_.~')}" if v else quote(k)
                                     for k, v in query.items())
        if ep.proxy and ep.scheme == "http":
            target = f"http://{ep.host}{target}"
        for attempt in (0, 1):
            reused = getattr(self._local, "conn", None) is not None
            sent = False
            try:
                conn = self._open(fresh=attempt > 0)
                conn.putrequest(method, target, skip_host=True, skip_accept_encoding=True)
                for name, value in signed.items():
                    conn.putheader(name, value)
                conn.endheaders()
                sent, asked = True, time.monotonic()
                resp = conn.getresponse()
                self._local.ttfb = time.monotonic() - asked  # link evidence: time to first byte
                self.count_request(method, key, counters)
                return resp
            except (http.client.RemoteDisconnected, BrokenPipeError, ConnectionResetError,
                    ConnectionAbortedError) as exc:
                self.close()
                if attempt == 0 and reused:
                    continue  # the server closed an idle keep-alive connection: one fresh try
                if sent:
                    self.count_request(method, key, counters)  # it may have reached the server
                raise FetchError("unreachable", f"connection lost before an answer: {_short(exc)}") from exc
            except (OSError, http.client.HTTPException) as exc:
                self.close()
                if sent:
                    self.count_request(method, key, counters)
                raise FetchError("unreachable", f"cannot reach {ep.host}: {_short(exc)}") from exc
        raise AssertionError("unreachable")

    def count_request(self, method: str, key: str | None, counters: Counters | None) -> None:
        """A request sent (a refused or failed connection is none: nothing reached the server)."""
        kind = "head" if method == "HEAD" else "list" if key is None else "get"
        if counters is not None:
            setattr(counters, kind, getattr(counters, kind) + 1)
        if self.meter is not None:
            self.meter.add(**{"list_" if kind == "list" else kind: 1})

    def received(self, n: int, counters: Counters | None) -> None:
        """`n` body bytes came off the wire (the provider bills them, kept or not)."""
        if counters is not None:
            counters.bytes += n
        if self.meter is not None:
            self.meter.add(nbytes=n)

    def fail(self, resp: http.client.HTTPResponse, what: str) -> FetchError:
        """Read an error answer and classify it (the connection stays usable)."""
        try:
            body = resp.read(65536) if resp.status != 304 else b""
        except (OSError, http.client.HTTPException):
            body = b""
            self.close()
        self.received(len(body), None)
        match = _CODE.search(body)
        code = match.group(1).decode(errors="replace") if match else str(resp.status)
        message = _MESSAGE.search(body)
        detail = f"{what}: HTTP {resp.status} {code}"
        if message and message.group(1):
            detail += f": {message.group(1).decode(errors='replace')[:200]}"
        status = resp.status
        if status == 412 or code == "PreconditionFailed":
            return FetchError("changed", f"{what}: changed at the source since inventory", status, code)
        if status == 404 or code in ("NoSuchKey", "NotFound"):
            return FetchError("gone", f"{what}: no longer at the source (deleted)", status, code)
        if code == "InvalidObjectState":
            return FetchError("archived", f"{what}: in an archive storage class, needs a restore",
                              status, code)
        if status == 400 and _SSE_C.search(body):
            return FetchError("sse-c", f"{what}: encrypted with a customer-provided key (SSE-C); "
                              "the store serves it only with that key", status, code)
        if code in CREDENTIAL_CODES or (status in (400, 401) and "token" in code.lower()):
            return FetchError("credentials", detail, status, code)
        if status >= 500 or code in TRANSIENT_CODES or status == 429:
            return FetchError("transient", detail, status, code)
        if status == 403:
            return FetchError("denied", detail, status, code)
        return FetchError("permanent", detail, status, code)

    def head(self, key: str, counters: Counters, part_number: int | None = None,
             etag: str | None = None) -> dict[str, str]:
        """HEAD (optionally of one part); lower-case headers."""
        headers = {"x-amz-checksum-mode": "ENABLED"}
        if etag:
            headers["if-match"] = f'"{etag}"'
        query = {"partNumber": str(part_number)} if part_number else None
        resp = self.request("HEAD", key, query, headers, counters)
        if resp.status not in (200, 206):
            raise self.fail(resp, f"HEAD {key!r}" + (f" part {part_number}" if part_number else ""))
        resp.read()
        return {k.lower(): v for k, v in resp.getheaders()}

    def probe(self, counters: Counters) -> bool:
        """Whether the endpoint answers at all (any HTTP answer counts)."""
        try:
            resp = self.request("GET", None, {"list-type": "2", "max-keys": "1"}, None, counters)
            resp.read()
            return True
        except FetchError:
            return False
        except (OSError, http.client.HTTPException):
            self.close()
            return False


def tls_failure(exc: ssl.SSLError, host: str | None = None) -> str:
    """What went wrong in a TLS handshake, in words (with the host when the message lacks it)."""
    of, with_ = (f" of {host}", f" with {host}") if host else ("", "")
    if isinstance(exc, ssl.SSLCertVerificationError):
        return f"the certificate{of} is not trusted ({exc.verify_message or exc.reason})"
    return f"TLS handshake{with_} failed ({exc.reason or _short(exc)})"


def _short(exc: BaseException) -> str:
    text = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
    return text[:200]


# -- tasks and results --------------------------------------------------------------------------
@dataclass
class Task:
    """One object to fetch, verify and place (built by the engine, run by a worker)."""

    id: int
    key: str
    etag: str
    size: int
    kind: str  # dicom | other | unreadable
    final: str  # absolute final path
    temp: str  # absolute temp path beside it
    quarantine: str | None  # where a DICOM file that does not match its inventory goes
    expect: dict[str, str | None]  # sop_uid, study_uid, series_uid from the inventory
    provider: dict[str, str]  # checksum headers recorded by the inventory
    credentials: Credentials
    large: bool = False
    range_size: int = 16 * 2**20
    done_ranges: dict[int, int] = field(default_factory=dict)  # range -> bytes on disk and fsynced
    part_sizes: list[int] | None = None  # of a multipart object, learned from the source (parts.py)
    fresh: bool = False  # discard any temp file (a resumed one failed verification)
    replaceable: int | None = None  # mtime_ns of this migration's own earlier file at `final`
    encoding: str | None = None  # envelope to decode after the raw checks (cloudexit.containers)
    faults: list[tuple[str, str]] = field(default_factory=list)  # link evidence: what multiget met
    member: dict[str, Any] | None = None  # zipped study: this member (transfer/zipmember.py)


@dataclass
class Result:
    id: int
    key: str
    outcome: str  # verified | quarantined | failed | cancelled
    error_kind: str | None = None
    detail: str | None = None
    error_code: str | None = None  # errno name of a disk error (ENOSPC, EROFS, EACCES...)
    path: str | None = None  # where the file landed (absolute)
    sha256: str | None = None
    md5: str | None = None
    checks: list[str] = field(default_factory=list)
    not_checked: list[str] = field(default_factory=list)
    counters: Counters = field(default_factory=Counters)
    retries: int = 0
    resumed_from: int = 0  # bytes of a temp file reused
    local: bool = False  # verified from a file already at its final path: no GET
    replaced: bool = False  # a different file at the final path was replaced
    etag: str | None = None
    changed_to: dict[str, Any] | None = None  # 412: the object's new ETag/size (from HEAD)
    restart: bool = False
    elapsed: float = 0.0
    folder: str | None = None  # the file's folder still to fsync (worker side only)
    mtime_ns: int | None = None  # of the file as placed (verify compares it, with the size)
    conflict: str | None = None  # the path that held other bytes: this copy went to quarantine
    part_sizes: list[int] | None = None  # learned from the source, for the engine to record
    decoded: dict[str, Any] | None = None  # encoding, raw_sha256, raw_size, size (plain file)
    # Link evidence (cloudexit/state/linkseries.py): time to the first byte of the last answer,
    # and every error met on the way (kind, detail), those retried past included.
    ttfb: float | None = None
    faults: list[tuple[str, str]] = field(default_factory=list)


# -- the worker side ---------------------------------------------------------------------------------
class Fetcher:
    """Runs tasks in one process: download, verify, place. Thread-safe."""

    def __init__(self, endpoint: Endpoint, credentials: Credentials, rate: SharedRate | None,
                 stop: Any, root: str, attempts: int = 6, backoff_base: float = 0.5, backoff_max: float = 30.0,
                 buffer_size: int = 2**20, range_streams: int = 4, fsync: bool = True,
                 report: Callable[[tuple[Any, ...]], None] | None = None,
                 group_folder_sync: bool = False, meter: str | None = None) -> None:
        from cloudexit.stores.filesystem import Placer

        self.reader = S3Reader(endpoint, credentials)
        if meter:
            self.reader.meter = Meter(meter)
        self.rate = rate
        self.stop = stop
        self.attempts = attempts
        self.backoff_base, self.backoff_max = backoff_base, backoff_max
        self.buffer_size = buffer_size
        self.range_streams = range_streams
        self.placer = Placer(root, fsync=fsync)
        self.report = report or (lambda message: None)
        # True: `place` leaves the folder fsync to a FolderSync, which reports the result after
        # it (one fsync per folder for all the files that landed meanwhile).
        self.group_folder_sync = group_folder_sync
        self._local = threading.local()

    def _buffer(self) -> memoryview:
        buf = getattr(self._local, "buf", None)
        if buf is None:
            buf = self._local.buf = memoryview(bytearray(self.buffer_size))
        return buf

    def _sleep(self, attempt: int) -> None:
        delay = random.uniform(0, min(self.backoff_max, self.backoff_base * 2 ** attempt))
        end = time.monotonic() + delay
        while time.monotonic() < end and not self.stop.is_set():
            time.sleep(min(0.1, end - time.monotonic()) if end > time.monotonic() else 0)

    def _quick_retry(self, failures: int, result: Result) -> bool:
        """After the `failures`-th failed connection of one fetch: retry once, quickly (bytes
        already on disk are kept); after that the engine judges whether the link is down."""
        if failures < 2 and not self.stop.is_set():
            result.retries += 1
            time.sleep(random.uniform(0.05, 0.3))
            return True
        return False

    # -- one task --------------------------------------------------------------------------------
    def run(self, task: Task, prior: Counters | None = None) -> Result:
        """Fetch, verify and place one object. `prior`: what an earlier attempt at it (in
        `multiget`) cost, counted in this result."""
        started = time.monotonic()
        result = Result(task.id, task.key, "failed", etag=task.etag)
        result.faults.extend(task.faults)  # link evidence: what the multiget loop met first
        if prior is not None:
            result.counters.add(prior)
            result.retries += 1
        self.reader.set_credentials(task.credentials)
        self.reader._local.ttfb = None  # this task's own answers only
        try:
            if self.stop.is_set():
                result.outcome = "cancelled"
                return result
            self.placer.prepare(task.final)
            if task.member is None and os.path.exists(task.final) and self._verify_local(task, result):
                return result
            attempt = connection_failures = 0
            while True:
                try:
                    if task.member is not None:  # a file inside a zip (transfer/zipmember.py)
                        from cloudexit.transfer.zipmember import fetch_member

                        fetch_member(self, task, result)
                    elif task.large:
                        self._fetch_large(task, result)
                    else:
                        self._fetch(task, result)
                    return result
                except FetchError as exc:
                    if exc.kind == "cancelled":
                        result.outcome = "cancelled"
                        return result
                    if len(result.faults) < 32:  # link evidence, retried errors included
                        result.faults.append((exc.kind, exc.detail))
                    changed_to = None
                    if exc.kind == "changed":
                        changed_to = self._new_version(task, result)
                        if changed_to is not None and changed_to.get("etag") == task.etag \
                                and changed_to.get("size") == task.size:
                            # The source still has the inventoried version: the 412 or the short
                            # Content-Length came from something on the way (a proxy, a cache).
                            exc = FetchError("transient", f"{exc.detail}; but the source still has "
                                             "the inventoried ETag and size: a transport fault", exc.status,
                                             exc.code, restart=exc.restart)
                    if exc.kind in ("transient", "corrupt") and attempt + 1 < self.attempts \
                            and not self.stop.is_set():
                        if exc.restart:
                            task.fresh, task.done_ranges = True, {}
                        attempt += 1
                        result.retries += 1
                        self._sleep(attempt)
                        continue
                    if exc.kind in ("unreachable", "cut"):
                        connection_failures += 1
                        if self._quick_retry(connection_failures, result):
                            continue
                        exc.kind = "unreachable"
                    if exc.kind == "changed":
                        result.changed_to = changed_to
                    result.error_kind, result.detail, result.restart = exc.kind, exc.detail, exc.restart
                    if exc.restart:
                        self.placer.discard(task.temp)
                    return result
        except OSError as exc:
            err = disk_error(exc, f"writing {exc.filename or task.final}")
            result.error_kind, result.detail, result.error_code = err.kind, err.detail, err.code
            if exc.errno not in DISK_ERRNOS:
                result.error_kind = "permanent"
            return result
        finally:
            result.elapsed = time.monotonic() - started
            result.ttfb = None if result.local else getattr(self.reader._local, "ttfb", None)

    def _new_version(self, task: Task, result: Result) -> dict[str, Any] | None:
        try:
            head = self.reader.head(task.key, result.counters)
        except FetchError as exc:
            return {"gone": True} if exc.kind == "gone" else None
        return {"etag": head.get("etag", "").strip('"'), "size": int(head.get("content-length", 0)),
                "last_modified": head.get("last-modified")}

    def _checks(self, task: Task, headers: dict[str, str], result: Result, can_ask: bool = True
                ) -> tuple[list[Expectation], list[int] | None]:
        """The checks that apply and, for multipart objects, the part boundaries."""
        provider = dict(task.provider)
        provider.update({k: v for k, v in headers.items()
                         if k.startswith(("x-amz-checksum-", "x-oss-hash-", "x-cos-hash-", "x-obs-hash-"))})
        checks = expectations(task.etag, provider, headers.get("x-amz-server-side-encryption")
                              or ("customer" if headers.get("x-amz-server-side-encryption-customer-algorithm") else None))
        if headers.get("x-amz-server-side-encryption") in ("aws:kms", "aws:kms:dsse"):
            result.not_checked.append("md5 (SSE-KMS: the ETag is not an MD5)")
        checks, _covered = worth_computing(checks)  # a provider CRC adds nothing to a verified MD5
        if not any(c.per_part for c in checks):
            return checks, None
        parts = max(c.parts for c in checks if c.per_part)
        if task.part_sizes and len(task.part_sizes) == parts:  # learned on an earlier attempt
            return checks, part_bounds(task.size, part_sizes=task.part_sizes)
        if not can_ask:  # a response body is being read on this connection: no HEADs now
            for c in [c for c in checks if c.per_part]:
                result.not_checked.append(f"{c.name} (composite checksum without a multipart ETag)")
            return [c for c in checks if not c.per_part], None
        try:
            first = self.reader.head(task.key, result.counters, part_number=1)  # no If-Match: see parts.py
            part_size = int(first.get("content-length", 0))
            bounds = part_bounds(task.size, part_size=part_size) if part_size else None
        except FetchError as exc:
            if exc.kind in RAISE_KINDS:
                raise
            bounds = None
        if bounds is None or len(bounds) - 1 != parts:
            # Parts of unequal size: ask each part's size (one HEAD per part).
            sizes = self._learn_parts(task, result, parts)
            bounds = part_bounds(task.size, part_sizes=sizes) if sizes else None
        if bounds is None or bounds[-1] != task.size:
            for c in [c for c in checks if c.per_part]:
                result.not_checked.append(f"{c.name} (the endpoint does not tell part sizes)")
            checks = [c for c in checks if not c.per_part]
        return checks, bounds

    def _learn_parts(self, task: Task, result: Result, parts: int) -> list[int] | None:
        sizes = learn_part_sizes(self.reader, task.key, task.size, parts, result.counters)
        if sizes:
            task.part_sizes = result.part_sizes = sizes
        return sizes

    def _unequal_parts(self, task: Task, result: Result, hasher: ObjectHasher, check: CheckResult,
                       fd: int) -> ObjectHasher | None:
        """A per-part check failed with part sizes guessed from part 1 (all equal but the last):
        ask every part's size; if they differ from the guess, hash the file again with them.
        None: nothing to learn (sizes known already, or the same as guessed, or not told)."""
        per_part = [c for c in hasher.checks if c.per_part]
        failed = {name for name, _expected, _got in check.failed}
        if task.part_sizes or not any(c.name in failed for c in per_part):
            return None
        sizes = self._learn_parts(task, result, max(c.parts for c in per_part))
        if not sizes or part_bounds(task.size, part_sizes=sizes) == hasher.bounds:
            return None
        again = ObjectHasher(task.size, hasher.checks, part_bounds(task.size, part_sizes=sizes))
        self._rehash(fd, task.size, again, bytearray())
        return again

    # -- small objects: one streaming GET ---------------------------------------------------------
    def _fetch(self, task: Task, result: Result) -> None:
        counters = result.counters
        offset = 0 if task.fresh else self.placer.partial_size(task.temp, task.size)
        checks: list[Expectation] | None = None
        bounds: list[int] | None = None
        if "-" in task.etag or offset:
            # Multipart (part sizes needed before hashing) or resumed (a ranged GET carries no
            # full-object checksums): ask HEAD first, on this thread's idle connection.
            info = self.reader.head(task.key, counters, etag=task.etag)
            if int(info.get("content-length", -1)) != task.size:
                raise FetchError("changed", f"HEAD {task.key!r}: size differs from the inventory")
            checks, bounds = self._checks(task, info, result)
        headers = {"if-match": f'"{task.etag}"', "x-amz-checksum-mode": "ENABLED"}
        if offset:
            headers["range"] = f"bytes={offset}-"
        resp = self.reader.request("GET", task.key, None, headers, counters)
        if resp.status not in (200, 206):
            if resp.status == 416 and offset:
                resp.read()
                raise FetchError("transient", "resume offset refused", restart=True)
            raise self.reader.fail(resp, f"GET {task.key!r}")
        if offset and resp.status != 206:
            offset = 0  # the server ignored the Range: take the whole object
        expected_len = task.size - offset
        length = resp.getheader("content-length")
        if length is not None and int(length) != expected_len:
            resp.close()
            self.reader.close()
            raise FetchError("changed" if not offset else "transient",
                             f"GET {task.key!r}: {length} bytes announced, {expected_len} expected",
                             restart=bool(offset))
        if checks is None:
            checks, bounds = self._checks(task, {k.lower(): v for k, v in resp.getheaders()}, result,
                                          can_ask=False)
        hasher = ObjectHasher(task.size, checks, bounds)
        head = bytearray()
        fd = self.placer.open_temp(task.temp, truncate=offset == 0)
        try:
            if offset:
                result.resumed_from = offset
                self._rehash(fd, offset, hasher, head)
                os.ftruncate(fd, offset)
                os.lseek(fd, offset, os.SEEK_SET)
            self._stream(resp, fd, hasher, head, expected_len, counters, task)
            self._finish(task, result, fd, hasher, bytes(head), resumed=offset > 0)
        finally:
            os.close(fd)

    def finish_body(self, task: Task, result: Result, body: memoryview,
                    headers: dict[str, str]) -> Callable[[], None]:
        """Verify a whole object already in memory (`multiget`'s path) and write its temp file:
        the checks of `_fetch`. Returns its placement (fsync, rename; closes the file), to run
        on any thread. Raises FetchError or OSError on any problem."""
        checks, bounds = self._checks(task, headers, result, can_ask=False)
        hasher = ObjectHasher(task.size, checks, bounds)
        hasher.update(body)
        fd = self.placer.open_temp(task.temp, truncate=True)
        try:
            written = os.write(fd, body)
            while written < len(body):
                written += os.write(fd, body[written:])
            target = self._judge(task, result, hasher, bytes(body[:HEADER_BYTES]))
        except BaseException:
            os.close(fd)
            raise

        def place() -> None:
            try:
                self._place(task, result, fd, target)
            finally:
                os.close(fd)

        return place

    def _rehash(self, fd: int, upto: int, hasher: ObjectHasher, head: bytearray) -> None:
        buf = self._buffer()
        pos = 0
        while pos < upto:
            n = os.preadv(fd, [buf[:min(len(buf), upto - pos)]], pos)
            if n <= 0:
                raise FetchError("transient", "temp file shorter than recorded", restart=True)
            chunk = buf[:n]
            hasher.update(chunk)
            if len(head) < HEADER_BYTES:
                head += chunk[:HEADER_BYTES - len(head)]
            pos += n

    def _stream(self, resp: http.client.HTTPResponse, fd: int, hasher: ObjectHasher,
                head: bytearray, expected: int, counters: Counters, task: Task,
                offset: int | None = None, progress: Callable[[int], None] | None = None) -> None:
        """Body -> hasher + file (at `offset` with pwrite when given)."""
        buf = self._buffer()
        got = 0
        rate = self.rate
        try:
            while got < expected:
                if self.stop.is_set():
                    raise FetchError("cancelled", "stopped")
                n = resp.readinto(buf[:min(len(buf), expected - got)])
                if not n:
                    break
                self.reader.received(n, counters)
                chunk = buf[:n]
                if hasher is not None:
                    hasher.update(chunk)
                if len(head) < HEADER_BYTES:
                    head += chunk[:HEADER_BYTES - len(head)]
                if offset is None:
                    written = os.write(fd, chunk)
                    while written < n:
                        written += os.write(fd, chunk[written:])
                else:
                    written = os.pwrite(fd, chunk, offset + got)
                    while written < n:
                        written += os.pwrite(fd, chunk[written:], offset + got + written)
                got += n
                if progress is not None:
                    progress(got)
                if rate is not None:
                    rate.take(n, self.stop)  # after the write: a kill now leaves the bytes on disk
        except FetchError:
            self.reader.close()
            raise
        except OSError as exc:
            self.reader.close()
            if isinstance(exc, (socket.timeout, ConnectionError)) or exc.errno in (
                    errno.ECONNRESET, errno.EPIPE, errno.ETIMEDOUT, None):
                raise FetchError("cut", f"body cut after {got} of {expected} bytes: {_short(exc)}") from exc
            raise
        except http.client.HTTPException as exc:
            self.reader.close()
            raise FetchError("cut", f"body cut after {got} of {expected} bytes: {_short(exc)}") from exc
        if got < expected:
            self.reader.close()
            raise FetchError("cut", f"body cut after {got} of {expected} bytes")
        if not resp.isclosed():
            # Content-Length met: http.client marks the response done; drain defensively.
            resp.read()

    def _finish(self, task: Task, result: Result, fd: int, hasher: ObjectHasher, head: bytes,
                resumed: bool) -> None:
        """Verify everything, then fsync and rename into place."""
        self._place(task, result, fd, self._judge(task, result, hasher, head, fd))

    def _judge(self, task: Task, result: Result, hasher: ObjectHasher, head: bytes,
               fd: int | None = None) -> str:
        """Verify the bytes (FetchError "corrupt" if they are not the object's) and the DICOM
        header; return where the file goes: its final path, or quarantine. `fd`: the temp file,
        to hash again if the object's parts turn out to be of unequal sizes."""
        check = hasher.verify()
        if not check.ok and fd is not None:
            again = self._unequal_parts(task, result, hasher, check, fd)
            if again is not None:
                hasher, check = again, again.verify()
        if not check.ok:
            name, expected, got = check.failed[0]
            raise FetchError("corrupt", f"{name} mismatch: expected {expected}, got {got}",
                             restart=True)
        result.checks = list(check.passed)
        result.sha256 = hasher.sha256_hex()
        result.md5 = hasher.md5_hex()
        target = task.final
        if task.encoding and task.kind == "dicom":
            from cloudexit.dicom.containers import judge_decoded

            return judge_decoded(self, task, result)
        if task.kind == "dicom":
            problem = self._check_dicom(task, head, result)
            if problem:
                target = task.quarantine or self._mismatch_path(task.key)
                result.outcome, result.detail = "quarantined", problem
        elif task.kind == "unreadable":
            result.outcome = "quarantined"
        if result.outcome != "quarantined":
            result.outcome = "verified"
        return target

    def _place(self, task: Task, result: Result, fd: int, target: str) -> None:
        from cloudexit.stores.filesystem import PlacementConflict

        if target != task.final:
            self.placer.prepare(target)
        sync = not self.group_folder_sync
        try:
            result.replaced = self.placer.place(fd, task.temp, target, sync_folder=sync,
                                                sha256=result.sha256, replaceable=task.replaceable)
        except PlacementConflict as exc:
            # Another file (another migration's, or another key's on a destination that folds
            # case) holds this path: keep it, quarantine this copy beside the others.
            result.conflict, target = exc.path, self._conflict_path(exc.path, result.sha256 or "")
            self.placer.prepare(target)
            self.placer.place(fd, task.temp, target, sync_folder=sync, sha256=result.sha256)
            result.outcome = "quarantined"
        result.path = target
        result.mtime_ns = os.stat(target, follow_symlinks=False).st_mtime_ns
        if self.group_folder_sync:
            result.folder = os.path.dirname(target)

    def _conflict_path(self, taken: str, sha256: str) -> str:
        from cloudexit.stores.filesystem import ARCHIVE_CONFLICTS

        rel = os.path.relpath(taken, self.placer.base)
        stem, suffix = os.path.splitext(os.path.basename(rel))
        return os.path.join(self.placer.base, ARCHIVE_CONFLICTS, os.path.dirname(rel),
                            f"{stem}~{sha256[:16]}{suffix}")

    def _mismatch_path(self, key: str) -> str:
        from cloudexit.stores.filesystem import MISMATCH, safe_key_path

        return os.path.join(self.placer.base, MISMATCH, safe_key_path(key))

    def _check_dicom(self, task: Task, head: bytes, result: Result, path: str | None = None,
                     size: int | None = None) -> str | None:
        """None if the file is DICOM with the inventoried UIDs; else what is wrong."""
        found = scan(head, task.size if size is None else size)
        if found.need_more or not found.decided:
            from cloudexit.dicom.header import parse_file

            header = parse_file(path or task.temp)
            kind, uids = header.kind, (header.sop_uid, header.study_uid, header.series_uid)
            reason = header.reason
        else:
            kind, uids, reason = found.kind, (found.sop_uid, found.study_uid, found.series_uid), found.reason
        if kind != "dicom":
            return f"downloaded file is not usable DICOM: {reason}"
        for name, got in zip(("sop_uid", "study_uid", "series_uid"), uids):
            want = task.expect.get(name)
            if want and got != want:
                label = {"sop_uid": "SOP Instance UID", "study_uid": "Study Instance UID",
                         "series_uid": "Series Instance UID"}[name]
                return f"{label} in the file ({got}) differs from the inventory ({want})"
        result.checks.append("dicom-sop-uid")
        return None

    def _verify_local(self, task: Task, result: Result) -> bool:
        """A file already at the final path (a crash after rename, before the DB commit):
        accept it if it verifies, without fetching it again."""
        try:
            if os.path.getsize(task.final) != task.size:
                return False
            checks, bounds = self._checks(task, {}, result)
        except (OSError, FetchError):
            return False
        if not any(c.algorithm in ("md5", "sha256", "crc32", "crc32c", "crc64nvme", "crc64ecma", "sha1")
                   for c in checks):
            return False  # nothing to compare with: fetch it
        hasher = ObjectHasher(task.size, checks, bounds)
        head = bytearray()
        fd = os.open(task.final, os.O_RDONLY | os.O_NOFOLLOW)
        try:
            self._rehash(fd, task.size, hasher, head)
            if self.placer.fsync:
                os.fsync(fd)  # a kill -9 after the rename may have left it in the page cache only
            check = hasher.verify()
            if not check.ok:
                again = self._unequal_parts(task, result, hasher, check, fd)
                if again is not None:
                    hasher, check = again, again.verify()
        except FetchError:
            return False
        finally:
            os.close(fd)
        if not check.ok:
            return False
        result.checks = []
        if task.kind == "dicom" and self._check_dicom(task, bytes(head), result, path=task.final):
            return False
        check.passed.extend(result.checks)
        result.outcome = "quarantined" if task.kind == "unreadable" else "verified"
        result.checks, result.sha256, result.md5 = check.passed, hasher.sha256_hex(), hasher.md5_hex()
        result.path, result.local = task.final, True
        result.mtime_ns = os.stat(task.final, follow_symlinks=False).st_mtime_ns
        self.placer.discard(task.temp)
        if self.group_folder_sync:
            result.folder = os.path.dirname(task.final)
        else:
            self.placer.sync_folders([os.path.dirname(task.final)])
        return True

    # -- large objects: parallel ranges, hashed in order as they land ------------------------------
    def _fetch_large(self, task: Task, result: Result) -> None:
        counters = result.counters
        info = self.reader.head(task.key, counters, etag=task.etag)
        if int(info.get("content-length", -1)) != task.size:
            raise FetchError("changed", f"HEAD {task.key!r}: size differs from the inventory")
        checks, bounds = self._checks(task, info, result)
        fresh = task.fresh or not os.path.exists(task.temp)
        fd = self.placer.open_temp(task.temp, truncate=fresh, size=task.size)
        ranges = [(s, min(s + task.range_size, task.size)) for s in range(0, task.size, task.range_size)]
        done = {} if fresh else dict(task.done_ranges)
        written = [min(done.get(i, 0), r[1] - r[0]) for i, r in enumerate(ranges)]
        failure: list[FetchError] = []
        cond = threading.Condition()
        result.resumed_from = sum(written)

        def fetch_range(index: int) -> None:
            start, end = ranges[index]
            tries = cuts = 0
            while written[index] < end - start:
                if failure or self.stop.is_set():
                    return
                pos = start + written[index]
                try:
                    resp = self.reader.request("GET", task.key, None, {
                        "if-match": f'"{task.etag}"', "range": f"bytes={pos}-{end - 1}"}, counters)
                    if resp.status != 206:
                        raise self.reader.fail(resp, f"GET {task.key!r} bytes {pos}-{end - 1}")

                    def moved(n: int, base: int = written[index]) -> None:
                        with cond:
                            written[index] = base + n
                            cond.notify_all()

                    self._stream(resp, fd, None, bytearray(HEADER_BYTES), end - pos, counters, task,
                                 offset=pos, progress=moved)
                except FetchError as exc:
                    if exc.kind in ("unreachable", "cut"):
                        cuts += 1
                        if self._quick_retry(cuts, result):
                            continue
                        exc.kind = "unreachable"
                    elif exc.kind == "transient" and tries + 1 < self.attempts and not self.stop.is_set():
                        tries += 1
                        result.retries += 1
                        self._sleep(tries)
                        continue
                    with cond:
                        failure.append(exc)
                        cond.notify_all()
                    return
                except OSError as exc:
                    with cond:
                        failure.append(disk_error(exc, f"writing {task.temp}"))
                        cond.notify_all()
                    return
            try:
                os.fdatasync(fd)  # a whole range: recorded at once, not at the next checkpoint
            except OSError as exc:
                with cond:
                    failure.append(disk_error(exc, f"writing {task.temp}"))
                    cond.notify_all()
                return
            synced_to(index, end - start)

        threads: list[threading.Thread] = []
        synced = list(written)
        sync_lock = threading.Lock()

        def checkpoint() -> None:
            """How far each range got, for a resume that continues mid-range: fsync the temp
            file first, so what the engine records is on disk. One fdatasync covers every range,
            and the streams never wait for it (they only pwrite)."""
            with cond:
                now_written = list(written)
            os.fdatasync(fd)
            for i, n in enumerate(now_written):
                synced_to(i, n)

        def synced_to(index: int, n: int) -> None:
            with sync_lock:
                if n > synced[index]:
                    synced[index] = task.done_ranges[index] = n  # a retry in this process continues too
                    self.report(("range", task.id, index, n))

        pending = [i for i in range(len(ranges)) if written[i] < ranges[i][1] - ranges[i][0]]
        lock = threading.Lock()

        def stream_worker() -> None:
            while True:
                with lock:
                    if not pending or failure:
                        return
                    index = pending.pop(0)
                fetch_range(index)

        for _ in range(min(self.range_streams, len(pending))):
            t = threading.Thread(target=stream_worker, daemon=True)
            t.start()
            threads.append(t)
        # Meanwhile: hash the bytes in order as they land (read back from the page cache).
        hasher = ObjectHasher(task.size, checks, bounds)
        head = bytearray()
        buf = self._buffer()
        pos = 0
        next_checkpoint = time.monotonic() + CHECKPOINT_SECONDS
        try:
            while pos < task.size:
                if time.monotonic() >= next_checkpoint:
                    checkpoint()
                    next_checkpoint = time.monotonic() + CHECKPOINT_SECONDS
                index = pos // task.range_size
                with cond:
                    while True:
                        available = ranges[index][0] + written[index]
                        if available > pos or failure or self.stop.is_set():
                            break
                        cond.wait(0.5)
                if failure:
                    raise failure[0]
                if self.stop.is_set():
                    raise FetchError("cancelled", "stopped")
                n = os.preadv(fd, [buf[:min(len(buf), available - pos)]], pos)
                if n <= 0:
                    raise FetchError("transient", "temp file shorter than written", restart=True)
                chunk = buf[:n]
                hasher.update(chunk)
                if len(head) < HEADER_BYTES:
                    head += chunk[:HEADER_BYTES - len(head)]
                pos += n
        except FetchError as exc:
            with cond:
                failure.append(exc)
                cond.notify_all()
            for t in threads:
                t.join()
            if not exc.restart and exc.kind != "corrupt":
                try:
                    checkpoint()  # keep what arrived: the next attempt or run continues from there
                except OSError:
                    pass
            os.close(fd)
            if exc.restart or exc.kind == "corrupt":
                raise
            raise exc
        for t in threads:
            t.join()
        try:
            self._finish(task, result, fd, hasher, bytes(head), resumed=bool(done))
        finally:
            os.close(fd)


# -- worker processes -----------------------------------------------------------------------------
class FolderSync:
    """Group commit of folder fsyncs, one thread per worker process.

    A result whose file was fsynced and renamed waits here until its folder is fsynced too, and
    only then goes to the engine (which alone marks it migrated). Every folder is fsynced once
    for all the files that landed in it while the previous round of fsyncs ran: with 50-100
    instances per series folder, that is one folder fsync for many files instead of one each.
    """

    def __init__(self, placer: Any, send: Callable[[tuple[Any, ...]], None]) -> None:
        self.placer, self.send = placer, send
        self.cond = threading.Condition()
        self.waiting: list[Result] = []
        self.closed = False
        self.thread = threading.Thread(target=self._run, name="cloudexit-folder-sync", daemon=True)
        self.thread.start()

    def add(self, result: Result) -> None:
        with self.cond:
            self.waiting.append(result)
            self.cond.notify()

    def close(self) -> None:
        """Sync and send what waits, then end the thread."""
        with self.cond:
            self.closed = True
            self.cond.notify()
        self.thread.join()

    def _run(self) -> None:
        while True:
            with self.cond:
                while not self.waiting and not self.closed:
                    self.cond.wait()
                if not self.waiting:
                    return
                batch, self.waiting = self.waiting, []
            self.send(("results", commit_folders(self.placer, batch)))


def commit_folders(placer: Any, batch: list[Result]) -> list[Result]:
    """fsync the folders the files of `batch` landed in, once each; then the results may go to
    the engine. If that fails, the whole batch fails: in place, but not durable under its name."""
    try:
        placer.sync_folders(dict.fromkeys(r.folder for r in batch if r.folder))
    except OSError as exc:
        failed = disk_error(exc, "fsync of an archive folder")
        for r in batch:
            if r.folder:
                r.outcome, r.error_kind, r.detail = "failed", failed.kind, failed.detail
                r.error_code = failed.code
    for r in batch:
        r.folder = None
    return batch


def _die_with_parent() -> None:
    """Linux: get SIGKILL when the engine dies (kill -9 included), never orphaned writers."""
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def worker_main(setup: Any, inbox: Any, outbox: Any, rate: SharedRate, stop: Any, threads: int,
                options: dict[str, Any], parent: int) -> None:
    """Entry point of a worker process. It starts while the engine resolves the endpoint and
    plans the work, and gets the endpoint and credentials on `setup` (a pipe) when they are
    known. Its main thread takes the engine's task lists and runs the small, plain objects
    itself, many at once (`multiget`); `threads` download threads take everything else (large
    objects, resumes, retries, anything unusual)."""
    _die_with_parent()
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the engine handles Ctrl-C and tells us
    from cloudexit.transfer.multiget import run_worker

    while not setup.poll(0.2):
        if stop.is_set() or os.getppid() != parent:
            return  # the run failed before the work began
    try:
        endpoint, credentials = setup.recv()
    except EOFError:
        return

    fetcher = Fetcher(endpoint, credentials, rate, stop, report=outbox.put, group_folder_sync=True,
                      **options)
    folders = FolderSync(fetcher.placer, outbox.put)
    local: queue.Queue[tuple[Task, Counters | None] | None] = queue.Queue()

    def done(result: Result) -> None:
        if result.folder:
            folders.add(result)
        else:
            outbox.put(("result", result))

    def loop() -> None:
        while True:
            item = local.get()
            if item is None:
                return
            task, prior = item
            try:
                result = fetcher.run(task, prior)
            except BaseException as exc:  # noqa: BLE001 - a bug must not hang the engine
                result = Result(task.id, task.key, "failed", error_kind="permanent",
                                detail=f"internal error: {_short(exc)}")
            done(result)

    pool = [threading.Thread(target=loop, daemon=True) for _ in range(threads)]
    for t in pool:
        t.start()

    def finish() -> None:
        for _ in pool:
            local.put(None)
        for t in pool:
            t.join()
        folders.close()

    run_worker(fetcher, inbox, max(1, threads) * 2, parent, outbox.put,
               lambda task, prior: local.put((task, prior)), finish)
