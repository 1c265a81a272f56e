"""A fault-injecting HTTP proxy between boto3 and a real S3 server, for tests.

The proxy forwards path-style S3 requests byte for byte to an upstream server (SeaweedFS on
loopback in the tests) and, when told to, injects the faults that a real server will not produce
on demand: throttling and 5xx answers, connections dropped before or during a response, truncated
bodies, flipped bits, outages and slow answers. It also emulates the archive-tier (GLACIER)
behaviour of AWS S3 that SeaweedFS lacks. This lets tests exercise retries, corruption detection,
outages and restores through the real boto3 stack, without mocking it.

    with FaultProxy(s3.endpoint_url) as proxy:
        proxy.status(503, times=2, method="GET")
        proxy.client().get_object(Bucket=bucket, Key="a")   # botocore retries, then succeeds
        assert proxy.count("GET", key="a") == 3

Requests are forwarded with their original Host header, so the client's SigV4 signature (made
for the proxy's host:port) still verifies upstream. Bodies are streamed in chunks both ways.

With `tls=` (a server SSLContext) it is a TLS front: clients speak HTTPS to it, it speaks HTTP
upstream, as a load balancer in front of MinIO would.

Limits: path-style addressing only; at most one fault per request (the first
matching rule); down() accepts and then resets connections (botocore: ConnectionClosedError)
rather than refusing the port or black-holing packets; the archive emulation keeps its restore
state in the proxy, accepts RestoreObject for a missing key (SeaweedFS cannot tell us) and does
not cover CopyObject, ListObjectVersions or GetObjectAttributes.
"""

from __future__ import annotations

import email.utils
import http.client
import random
import re
import socket
import socketserver
import ssl
import struct
import threading
import time
import uuid
from contextlib import contextmanager
from dataclasses import dataclass
from http import HTTPStatus
from typing import Any, Iterator
from urllib.parse import unquote, unquote_plus, urlsplit
from xml.sax.saxutils import escape, unescape

import pytest

CHUNK = 256 * 1024
# Headers that describe one hop, not the message; the proxy sets its own.
_HOP_BY_HOP = {"connection", "keep-alive", "proxy-connection", "transfer-encoding", "te",
               "trailer", "upgrade"}
_MESSAGES = {
    "SlowDown": "Please reduce your request rate.",
    "InternalError": "We encountered an internal error. Please try again.",
    "ServiceUnavailable": "Service is unable to handle request.",
    "AccessDenied": "Access Denied",
    "NoSuchKey": "The specified key does not exist.",
    "InvalidObjectState": "The operation is not valid for the object's storage class",
    "RestoreAlreadyInProgress": "Object restore is already in progress",
}
_DEFAULT_CODES = {500: "InternalError", 503: "SlowDown", 403: "AccessDenied", 404: "NoSuchKey",
                  400: "BadRequest", 409: "Conflict"}


class _Reset(Exception):
    """Abort the client connection with a TCP reset (RST)."""


class _Close(Exception):
    """Close the client connection gracefully (FIN), e.g. after a truncated body."""


@dataclass(frozen=True)
class Request:
    """What the proxy understood of one path-style S3 request."""

    method: str
    bucket: str  # "" for service-level requests (ListBuckets)
    key: str  # "" for bucket-level requests (ListObjectsV2, CreateBucket...)
    query: str  # the raw query string, e.g. "list-type=2&prefix=a"

    @classmethod
    def parse(cls, method: str, target: str) -> "Request":
        parts = urlsplit(target)
        bucket, _, key = parts.path.lstrip("/").partition("/")
        return cls(method.upper(), unquote(bucket), unquote(key), parts.query)

    @property
    def subresources(self) -> set[str]:
        return {item.partition("=")[0] for item in self.query.split("&") if item}


@dataclass
class Seen:
    """One request as the proxy saw it, for assertions."""

    method: str
    bucket: str
    key: str
    query: str
    status: int | None = None  # None if the connection was dropped before an answer
    bytes_sent: int = 0  # response body bytes written to the client
    fault: str | None = None  # the kind of rule applied, if any


@dataclass
class Rule:
    """One programmed fault. Returned by the fault methods; `fired` counts its uses."""

    kind: str  # status | drop | truncate | flip | shorten | delay
    method: str | None = None
    key: re.Pattern[str] | None = None
    query: re.Pattern[str] | None = None
    times: int | None = None
    probability: float | None = None
    code: int = 0
    s3_code: str = ""
    message: str = ""
    seconds: float = 0.0
    after_bytes: int | None = None  # drop: reset after this many body bytes
    forward: bool = False  # drop: let the request reach the server first
    at: int = 0  # truncate: body bytes sent; flip: byte offset
    fired: int = 0

    @property
    def expired(self) -> bool:
        return self.times is not None and self.fired >= self.times

    def matches(self, request: Request) -> bool:
        return ((self.method is None or self.method == request.method)
                and (self.key is None or self.key.search(request.key) is not None)
                and (self.query is None or self.query.search(request.query) is not None))


@dataclass
class _Archive:
    key: re.Pattern[str]
    bucket: str | None
    storage_class: str
    restore_delay: float


@dataclass
class _Restore:
    ready_at: float  # wall-clock time the restore completes
    days: int
    tier: str = ""  # the Tier the RestoreRequest asked for ("" when it named none)


class FaultProxy:
    """A threaded HTTP proxy in front of `upstream` that injects programmable faults.

    Fault methods add a rule and return it; rules match on method, key regex and query regex,
    fire `times` times (forever if None) and, with `probability`, only that often (seeded RNG).
    Key regexes are searched in the URL-decoded object key ("" for bucket-level requests such
    as listings), query regexes in the raw query string (e.g. "partNumber=" for UploadPart).
    For each request the first matching live rule applies, so at most one fault per request.
    Everything is thread-safe and may be changed while requests are in flight.
    """

    def __init__(self, upstream: str, *, seed: int = 0, timeout: float = 60.0,
                 tls: ssl.SSLContext | None = None) -> None:
        parts = urlsplit(upstream)
        if parts.scheme != "http" or not parts.hostname:
            raise ValueError(f"upstream must be http://host:port, not {upstream!r}")
        self.upstream_host = parts.hostname
        self.upstream_port = parts.port or 80
        self.timeout = timeout
        self.tls = tls  # a server context: clients speak HTTPS to the proxy (a TLS front)
        self.handshake_failures = 0
        self._lock = threading.Lock()
        self._rng = random.Random(seed)
        self._rules: list[Rule] = []
        self._archives: list[_Archive] = []
        self._restores: dict[tuple[str, str], _Restore] = {}
        self._down = False
        self._pace: float | None = None  # bytes per second per response body (None: as fast as it goes)
        self._seen: list[Seen] = []
        self._bytes_sent = 0
        self._bytes_received = 0
        self._resets = 0
        self._accepted = 0
        self._connections: set[socket.socket] = set()
        self._pacer: _TokenBucket | None = None
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    # -- lifecycle -------------------------------------------------------------------------

    @property
    def port(self) -> int:
        if self._server is None:
            raise RuntimeError("the proxy is not started")
        return self._server.server_address[1]

    @property
    def endpoint_url(self) -> str:
        return f"{'https' if self.tls else 'http'}://127.0.0.1:{self.port}"

    def start(self) -> "FaultProxy":
        self._refused_port = 0
        self.accept()
        return self

    def stop(self) -> None:
        if self._server is None:
            return
        self._server.shutdown()
        self._server.server_close()
        self.reset_connections()  # wakes handler threads blocked on idle keep-alive connections
        if self._thread:
            self._thread.join(5)
        self._server = None

    def __enter__(self) -> "FaultProxy":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- clients -----------------------------------------------------------------------------

    def client(self, **config: Any) -> Any:
        """A boto3 S3 client that talks to the upstream test server through this proxy.

        `config` goes to botocore's Config, e.g.
        retries={"mode": "standard", "total_max_attempts": 3}.
        """
        import boto3
        from botocore.config import Config

        from cloudexit.testing.s3server import ACCESS_KEY, REGION, SECRET_KEY

        config.setdefault("s3", {"addressing_style": "path"})
        return boto3.client("s3", endpoint_url=self.endpoint_url, region_name=REGION,
                            aws_access_key_id=ACCESS_KEY, aws_secret_access_key=SECRET_KEY,
                            config=Config(**config))

    def env(self) -> dict[str, str]:
        """Environment variables that point boto3 (and subprocesses) at this proxy."""
        from cloudexit.testing.s3server import ACCESS_KEY, REGION, SECRET_KEY

        return {"AWS_ACCESS_KEY_ID": ACCESS_KEY, "AWS_SECRET_ACCESS_KEY": SECRET_KEY,
                "AWS_DEFAULT_REGION": REGION, "AWS_REGION": REGION,
                "AWS_ENDPOINT_URL": self.endpoint_url}

    # -- faults ------------------------------------------------------------------------------

    def _add(self, rule: Rule, key: str | None, query: str | None) -> Rule:
        rule.key = re.compile(key) if key is not None else None
        rule.query = re.compile(query) if query is not None else None
        rule.method = rule.method.upper() if rule.method else None
        with self._lock:
            self._rules.append(rule)
        return rule

    def status(self, code: int = 503, s3_code: str | None = None, *, message: str | None = None,
               method: str | None = None, key: str | None = None, query: str | None = None,
               times: int | None = None, probability: float | None = None) -> Rule:
        """Answer an S3 XML error (503 SlowDown, 500 InternalError...) instead of forwarding."""
        s3_code = s3_code or _DEFAULT_CODES.get(code, HTTPStatus(code).phrase.replace(" ", ""))
        rule = Rule("status", method, code=code, s3_code=s3_code, times=times,
                    message=message or _MESSAGES.get(s3_code, HTTPStatus(code).phrase),
                    probability=probability)
        return self._add(rule, key, query)

    def drop(self, *, after_bytes: int | None = None, forward: bool = False,
             method: str | None = None, key: str | None = None, query: str | None = None,
             times: int | None = None, probability: float | None = None) -> Rule:
        """Reset the connection: before any answer, or after `after_bytes` response body bytes.

        Without `after_bytes` the request is not forwarded unless `forward=True` (then the
        server executes it and only the answer is lost, as when a link dies at the worst time).
        A body shorter than `after_bytes` is sent whole.
        """
        rule = Rule("drop", method, after_bytes=after_bytes,
                    forward=forward or after_bytes is not None, times=times,
                    probability=probability)
        return self._add(rule, key, query)

    def truncate(self, at: int = 0, *, method: str | None = "GET", key: str | None = None,
                 query: str | None = None, times: int | None = None,
                 probability: float | None = None) -> Rule:
        """Send the real headers (full Content-Length), then only `at` body bytes, then close.

        A body no longer than `at` is sent whole.
        """
        rule = Rule("truncate", method, at=at, times=times, probability=probability)
        return self._add(rule, key, query)

    def flip(self, offset: int = 0, *, method: str | None = "GET", key: str | None = None,
             query: str | None = None, times: int | None = None,
             probability: float | None = None) -> Rule:
        """Flip the lowest bit of response body byte `offset`; status and headers unchanged.

        No-op (but still counted as fired) if the body is shorter than `offset` + 1.
        """
        rule = Rule("flip", method, at=offset, times=times, probability=probability)
        return self._add(rule, key, query)

    def shorten(self, by: int = 1, *, method: str | None = "GET", key: str | None = None,
                query: str | None = None, times: int | None = None,
                probability: float | None = None) -> Rule:
        """Announce a Content-Length `by` bytes short and send that many body bytes, then close:
        a middlebox that rewrote the length. The client sees a whole, well-formed answer.

        No-op (but still counted as fired) on a body without a Content-Length.
        """
        rule = Rule("shorten", method, at=by, times=times, probability=probability)
        return self._add(rule, key, query)

    def delay(self, seconds: float, *, method: str | None = None, key: str | None = None,
              query: str | None = None, times: int | None = None,
              probability: float | None = None) -> Rule:
        """Wait `seconds` before forwarding the request (a slow first byte)."""
        rule = Rule("delay", method, seconds=seconds, times=times, probability=probability)
        return self._add(rule, key, query)

    def pace(self, bytes_per_second: float | None) -> None:
        """Send every response body at most this fast (per response), in small writes, as a slow
        link would: little is ever waiting in socket buffers, so `bytes_sent` is what the client
        has read, give or take one write. None: full speed again."""
        with self._lock:
            self._pace = bytes_per_second

    def shape(self, bytes_per_s: float | None, burst: int = 64 * 1024) -> None:
        """Shape every response body, all connections together (unlike `pace`, per response), to `bytes_per_s` with a token
        bucket of `burst` bytes (a large burst: a link that is fast, then throttled). A double
        of a shaped link (`tc ... tbf`), for tests that must run without root; None: unshaped."""
        with self._lock:
            self._pacer = _TokenBucket(bytes_per_s, burst) if bytes_per_s else None

    def remove(self, rule: Rule) -> None:
        with self._lock:
            if rule in self._rules:
                self._rules.remove(rule)

    def clear(self) -> None:
        """Forget all fault and archive rules and restores, and bring the link back up."""
        with self._lock:
            self._rules.clear()
            self._archives.clear()
            self._restores.clear()
            self._down = False

    def down(self) -> None:
        """Cut the link: every connection, new or kept alive, is reset at its next request,
        and responses being streamed are reset at their next chunk."""
        with self._lock:
            self._down = True

    def up(self) -> None:
        with self._lock:
            self._down = False

    def reset_connections(self) -> None:
        """Close every client connection now (clients must connect again)."""
        with self._lock:
            connections = list(self._connections)
        for sock in connections:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def refuse(self) -> None:
        """Close the port: new connections are refused (ECONNREFUSED), open ones reset, as
        when the host or its firewall drops out. `accept()` opens the same port again."""
        assert self._server is not None, "the proxy is not started"
        self._refused_port = self.port
        self.stop()

    def accept(self) -> None:
        """Listen again on the port `refuse()` closed."""
        self._server = _Server(self, self._refused_port)
        self._thread = threading.Thread(target=self._server.serve_forever, args=(0.05,),
                                        name="faultproxy", daemon=True)
        self._thread.start()

    @property
    def is_down(self) -> bool:
        return self._down

    # -- archive-tier emulation --------------------------------------------------------------

    def archive(self, key: str, storage_class: str = "GLACIER", *, restore_delay: float = 0.0,
                bucket: str | None = None) -> None:
        """Emulate AWS S3 archive-tier behaviour for keys matching the regex `key`.

        As AWS does for GLACIER / DEEP_ARCHIVE objects: GET answers 403 InvalidObjectState until
        a RestoreObject (POST ?restore) for the key was received and `restore_delay` seconds have
        passed; HEAD, GET and ListObjects(V2) report `storage_class`; HEAD shows `x-amz-restore`
        (ongoing-request="true" while restoring, "false" plus expiry-date after). RestoreObject
        answers 202 the first time, 409 RestoreAlreadyInProgress while restoring and 200 once
        restored. The restore state lives in the proxy, not in the upstream server.
        """
        with self._lock:
            self._archives.append(_Archive(re.compile(key), bucket, storage_class, restore_delay))

    def _archived(self, bucket: str, key: str) -> _Archive | None:
        if not key:
            return None
        with self._lock:
            for arch in self._archives:
                if (arch.bucket is None or arch.bucket == bucket) and arch.key.search(key):
                    return arch
        return None

    def _restore(self, arch: _Archive, bucket: str, key: str, days: int, tier: str = "") -> int:
        """Record a RestoreObject; the AWS status code: 202 new, 409 ongoing, 200 restored."""
        now = time.time()
        with self._lock:
            state = self._restores.get((bucket, key))
            if state is None:
                self._restores[(bucket, key)] = _Restore(now + arch.restore_delay, days, tier)
                return 202
            if now < state.ready_at:
                return 409
            state.days = days  # AWS extends the expiry of a restored copy
            return 200

    def restore_tier(self, bucket: str, key: str) -> str | None:
        """The Tier the first RestoreObject of `key` asked for (None: no restore was asked)."""
        with self._lock:
            state = self._restores.get((bucket, key))
        return None if state is None else state.tier

    def restored(self, bucket: str, key: str) -> bool:
        """Whether an archived object may be read now."""
        with self._lock:
            state = self._restores.get((bucket, key))
        return state is not None and time.time() >= state.ready_at

    def _restore_header(self, bucket: str, key: str) -> str | None:
        with self._lock:
            state = self._restores.get((bucket, key))
        if state is None:
            return None
        if time.time() < state.ready_at:
            return 'ongoing-request="true"'
        # AWS rounds the expiry up to the next midnight UTC.
        expiry = state.ready_at + state.days * 86400
        expiry_date = email.utils.formatdate((int(expiry) // 86400 + 1) * 86400, usegmt=True)
        return f'ongoing-request="false", expiry-date="{expiry_date}"'

    def _rewrite_listing(self, bucket: str, body: bytes) -> bytes:
        """Set <StorageClass> of archived keys in a ListObjects(V2) answer."""
        text = body.decode("utf-8")
        url_encoded = "<EncodingType>url</EncodingType>" in text

        def fix(match: re.Match[str]) -> str:
            block = match.group(0)
            found = re.search(r"<Key>(.*?)</Key>", block, re.S)
            if not found:
                return block
            key = unescape(found.group(1), {"&quot;": '"', "&apos;": "'"})
            arch = self._archived(bucket, unquote_plus(key) if url_encoded else key)
            if arch is None:
                return block
            tag = f"<StorageClass>{escape(arch.storage_class)}</StorageClass>"
            if "<StorageClass>" in block:
                return re.sub(r"<StorageClass>.*?</StorageClass>", tag, block, flags=re.S)
            return block.replace("</Contents>", tag + "</Contents>")

        return re.sub(r"<Contents>.*?</Contents>", fix, text, flags=re.S).encode("utf-8")

    # -- counters ----------------------------------------------------------------------------

    @property
    def requests(self) -> list[Seen]:
        """Every request seen (except those refused while down), oldest first."""
        with self._lock:
            return list(self._seen)

    def count(self, method: str | None = None, key: str | None = None,
              bucket: str | None = None) -> int:
        """How many requests matched: e.g. count("GET", key="a/b") == 2."""
        with self._lock:
            return sum(1 for s in self._seen
                       if (method is None or s.method == method.upper())
                       and (key is None or s.key == key)
                       and (bucket is None or s.bucket == bucket))

    @property
    def bytes_sent(self) -> int:
        """Response body bytes written to clients."""
        return self._bytes_sent

    @property
    def bytes_received(self) -> int:
        """Request body bytes forwarded upstream."""
        return self._bytes_received

    @property
    def resets(self) -> int:
        """Client connections the proxy reset (drop rules, down())."""
        return self._resets

    @property
    def connections(self) -> int:
        """Client connections accepted (few, if keep-alive works)."""
        return self._accepted

    def reset_counters(self) -> None:
        with self._lock:
            self._seen.clear()
            self._bytes_sent = self._bytes_received = self._resets = self._accepted = 0

    # -- used by the handler -----------------------------------------------------------------

    def _record(self, request: Request) -> Seen:
        seen = Seen(request.method, request.bucket, request.key, request.query)
        with self._lock:
            self._seen.append(seen)
        return seen

    def _pick(self, request: Request) -> Rule | None:
        with self._lock:
            for rule in self._rules:
                if rule.expired or not rule.matches(request):
                    continue
                if rule.probability is not None and self._rng.random() >= rule.probability:
                    continue
                rule.fired += 1
                return rule
        return None

    def _count_bytes(self, seen: Seen | None, sent: int = 0, received: int = 0) -> None:
        with self._lock:
            if seen is not None:
                seen.bytes_sent += sent
            self._bytes_sent += sent
            self._bytes_received += received

    def _count_reset(self) -> None:
        with self._lock:
            self._resets += 1

    def _track(self, sock: socket.socket, add: bool) -> None:
        with self._lock:
            if add:
                self._accepted += 1
                self._connections.add(sock)
            else:
                self._connections.discard(sock)


class _Server(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 128

    def __init__(self, proxy: FaultProxy, port: int = 0) -> None:
        self.proxy = proxy
        super().__init__(("127.0.0.1", port), _Handler)


class _Handler(socketserver.StreamRequestHandler):
    """Serves one client connection: a keep-alive loop of parse, fault, forward, stream."""

    server: _Server

    def setup(self) -> None:
        self.proxy = self.server.proxy
        self.handshake_ok = True
        if self.proxy.tls is not None:
            try:
                self.request = self.proxy.tls.wrap_socket(self.request, server_side=True)
            except (ssl.SSLError, OSError):
                self.handshake_ok = False  # the client refused our certificate, or left
                with self.proxy._lock:
                    self.proxy.handshake_failures += 1
        super().setup()
        self.upstream: http.client.HTTPConnection | None = None
        self._continue_sent = False
        self.proxy._track(self.connection, True)

    def finish(self) -> None:
        self.proxy._track(self.connection, False)
        self._close_upstream()
        super().finish()

    def handle(self) -> None:
        if not self.handshake_ok:
            return
        try:
            while self._serve_one():
                pass
        except _Reset:
            self._reset()
        except (_Close, OSError, ValueError, http.client.HTTPException):
            pass  # the client went away, or we are closing on purpose

    def _reset(self) -> None:
        """Close with SO_LINGER 0, which sends a TCP RST: 'connection reset by peer'."""
        self.proxy._count_reset()
        try:
            self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER,
                                       struct.pack("ii", 1, 0))
        except OSError:
            pass
        # The socket only really closes once its file objects are closed too.
        for stream in (self.rfile, self.wfile):
            try:
                stream.close()
            except OSError:
                pass
        self.connection.close()

    # -- one request -------------------------------------------------------------------------

    def _serve_one(self) -> bool:
        """Handle one request; whether to keep the connection open."""
        if self.proxy.is_down:
            raise _Reset
        line = self.rfile.readline(65537)
        if not line:
            return False
        if not line.strip():
            return True  # a stray CRLF between requests is allowed
        if self.proxy.is_down:
            raise _Reset
        method, target, version = line.decode("latin-1").split()
        headers = http.client.parse_headers(self.rfile)
        request = Request.parse(method, target)
        keep = (version == "HTTP/1.1"
                and headers.get("Connection", "").lower() != "close")
        self._continue_sent = False
        seen = self.proxy._record(request)
        rule = self.proxy._pick(request)
        seen.fault = rule.kind if rule else None

        if rule and rule.kind == "delay":
            time.sleep(rule.seconds)
        if rule and rule.kind == "status":
            self._drain_body(headers)
            self._send_error(request, seen, rule.code, rule.s3_code, rule.message, keep)
            return keep
        if rule and rule.kind == "drop" and not rule.forward:
            raise _Reset

        arch = self.proxy._archived(request.bucket, request.key)
        if arch and request.method == "POST" and "restore" in request.subresources:
            return self._answer_restore(request, seen, headers, arch, keep)

        response = self._forward(method, target, headers)
        if rule and rule.kind == "drop" and rule.after_bytes is None:
            self._close_upstream()
            raise _Reset  # the server did it, the client never hears back
        if (arch and request.method == "GET" and response.status < 400
                and not self.proxy.restored(request.bucket, request.key)):
            # The object exists (else upstream said 404), but it is not readable yet.
            self._close_upstream()
            self._send_error(request, seen, 403, "InvalidObjectState",
                             _MESSAGES["InvalidObjectState"], keep,
                             extra=f"<StorageClass>{escape(arch.storage_class)}</StorageClass>")
            return keep
        return self._relay(request, seen, response, rule, arch, keep)

    def _relay(self, request: Request, seen: Seen, response: http.client.HTTPResponse,
               rule: Rule | None, arch: _Archive | None, keep: bool) -> bool:
        """Send the upstream answer to the client, applying body faults on the way."""
        headers = [(k, v) for k, v in response.getheaders() if k.lower() not in _HOP_BY_HOP]
        if arch and request.method in ("GET", "HEAD") and response.status < 300:
            headers = [(k, v) for k, v in headers
                       if k.lower() not in ("x-amz-storage-class", "x-amz-restore")]
            headers.append(("x-amz-storage-class", arch.storage_class))
            restore = self.proxy._restore_header(request.bucket, request.key)
            if restore:
                headers.append(("x-amz-restore", restore))
        bodiless = (request.method == "HEAD" or response.status in (204, 304)
                    or 100 <= response.status < 200)
        body: bytes | None = None
        if (not bodiless and request.method == "GET" and request.bucket and not request.key
                and response.status == 200 and self.proxy._archives
                and "content-encoding" not in {k.lower() for k, _ in headers}):
            # A bucket-level GET may be a listing: small, so rewrite it in memory.
            body = response.read()
            if b"<ListBucketResult" in body:
                body = self.proxy._rewrite_listing(request.bucket, body)
            headers = [(k, v) for k, v in headers if k.lower() != "content-length"]
            headers.append(("Content-Length", str(len(body))))
        if (rule and rule.kind == "shorten" and not bodiless and body is None
                and response.length is not None and not response.chunked):
            # Announce fewer bytes, send only those, and close: the rest is never read upstream.
            short = max(0, response.length - rule.at)
            headers = [(k, v) for k, v in headers if k.lower() != "content-length"]
            headers.append(("Content-Length", str(short)))
            keep = False
            rule = Rule("truncate", at=short)
        chunked = not bodiless and body is None and response.chunked
        # Without a length or chunking, the body ends when the connection closes.
        if not bodiless and body is None and not chunked and response.length is None:
            keep = False
        if chunked:
            headers.append(("Transfer-Encoding", "chunked"))
        if not keep:
            headers.append(("Connection", "close"))
        seen.status = response.status
        self._write_head(response.status, response.reason, headers)
        if bodiless:
            response.read()
        elif body is not None:
            self._stream(seen, iter([body]), rule, chunked=False)
        else:
            self._stream(seen, _chunks(response), rule, chunked)
        if not keep or response.will_close:
            self._close_upstream()
        return keep

    def _stream(self, seen: Seen, chunks: Iterator[bytes], rule: Rule | None,
                chunked: bool) -> None:
        """Copy a body to the client, with any flip / truncate / drop-after-bytes fault."""
        limit: int | None = None
        flip_at: int | None = None
        if rule and rule.kind == "truncate":
            limit = rule.at
        elif rule and rule.kind == "drop" and rule.after_bytes is not None:
            limit = rule.after_bytes
        elif rule and rule.kind == "flip":
            flip_at = rule.at
        sent = 0
        started = time.monotonic()
        # Paced or shaped: in 16 KiB pieces, as a slow link sends packets (the first bytes of an
        # answer come soon, and what is counted as sent is what went out, give or take a piece).
        for chunk in _paced(chunks, self.proxy._pace or (self.proxy._pacer and 1.0)):
            if self.proxy._pace:
                time.sleep(max(0.0, sent / self.proxy._pace - (time.monotonic() - started)))
            if self.proxy.is_down:
                self._close_upstream()
                raise _Reset
            if flip_at is not None and sent <= flip_at < sent + len(chunk):
                flipped = bytearray(chunk)
                flipped[flip_at - sent] ^= 0x01
                chunk = bytes(flipped)
            cut = limit is not None and sent + len(chunk) >= limit
            if cut:
                chunk = chunk[:limit - sent]
            if chunk:
                pacer = self.proxy._pacer
                if pacer is not None:
                    pacer.take(len(chunk))
                self.wfile.write(b"%x\r\n%s\r\n" % (len(chunk), chunk) if chunked else chunk)
                if pacer is not None:
                    self.wfile.flush()
                sent += len(chunk)
                self.proxy._count_bytes(seen, sent=len(chunk))
            if cut:
                # The upstream body was not read to its end: that connection is unusable.
                self._close_upstream()
                raise _Close if rule and rule.kind == "truncate" else _Reset
        if chunked:
            self.wfile.write(b"0\r\n\r\n")

    # -- archive answers ---------------------------------------------------------------------

    def _answer_restore(self, request: Request, seen: Seen, headers: Any, arch: _Archive,
                        keep: bool) -> bool:
        body = b"".join(self._body_chunks(headers))
        found = re.search(rb"<Days>\s*(\d+)\s*</Days>", body)
        tier = re.search(rb"<Tier>\s*(\w+)\s*</Tier>", body)
        status = self.proxy._restore(arch, request.bucket, request.key,
                                     int(found.group(1)) if found else 1,
                                     tier.group(1).decode() if tier else "")
        if status == 409:
            self._send_error(request, seen, 409, "RestoreAlreadyInProgress",
                             _MESSAGES["RestoreAlreadyInProgress"], keep)
        else:
            seen.status = status
            self._write_head(status, HTTPStatus(status).phrase, _base_headers(0, keep))
        return keep

    # -- helpers -----------------------------------------------------------------------------

    def _send_error(self, request: Request, seen: Seen, code: int, s3_code: str, message: str,
                    keep: bool, extra: str = "") -> None:
        request_id = uuid.uuid4().hex[:16].upper()
        resource = escape("/" + "/".join(p for p in (request.bucket, request.key) if p))
        xml = (f'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>{escape(s3_code)}</Code>'
               f"<Message>{escape(message)}</Message>{extra}<Resource>{resource}</Resource>"
               f"<RequestId>{request_id}</RequestId></Error>").encode()
        body = b"" if request.method == "HEAD" else xml
        headers = _base_headers(len(body), keep, request_id)
        headers.append(("Content-Type", "application/xml"))
        seen.status = code
        self._write_head(code, HTTPStatus(code).phrase, headers)
        self.wfile.write(body)
        self.proxy._count_bytes(seen, sent=len(body))

    def _write_head(self, status: int, reason: str, headers: list[tuple[str, str]]) -> None:
        lines = [f"HTTP/1.1 {status} {reason}"] + [f"{k}: {v}" for k, v in headers]
        self.wfile.write(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1"))

    def _send_continue(self, headers: Any) -> None:
        # The client waits for this before sending a body; answer for the upstream.
        if headers.get("Expect", "").lower() == "100-continue" and not self._continue_sent:
            self._continue_sent = True
            self.wfile.write(b"HTTP/1.1 100 Continue\r\n\r\n")

    def _body_chunks(self, headers: Any) -> Iterator[bytes]:
        """The request body exactly as received (chunked framing kept), in pieces."""
        if "chunked" in headers.get("Transfer-Encoding", "").lower():
            self._send_continue(headers)
            yield from _raw_chunked(self.rfile)
            return
        length = int(headers.get("Content-Length") or 0)
        if length:
            self._send_continue(headers)
        while length > 0:
            piece = self.rfile.read(min(CHUNK, length))
            if not piece:
                raise _Close  # the client gave up mid-body
            length -= len(piece)
            yield piece

    def _drain_body(self, headers: Any) -> None:
        for _ in self._body_chunks(headers):
            pass

    def _forward(self, method: str, target: str, headers: Any) -> http.client.HTTPResponse:
        """Send the request upstream unchanged (Host included) and return its answer."""
        has_body = ("chunked" in headers.get("Transfer-Encoding", "").lower()
                    or int(headers.get("Content-Length") or 0) > 0)
        for attempt in (1, 2):
            # A body cannot be replayed, so it always gets a fresh connection.
            conn = self._upstream_connection(fresh=has_body or attempt > 1)
            try:
                conn.putrequest(method, target, skip_host=True, skip_accept_encoding=True)
                for name, value in headers.items():
                    if name.lower() != "expect":
                        conn.putheader(name, value)
                conn.endheaders()
                if has_body:
                    for piece in self._body_chunks(headers):
                        conn.send(piece)
                        self.proxy._count_bytes(None, received=len(piece))
                return conn.getresponse()
            except (OSError, http.client.HTTPException) as exc:
                self._close_upstream()
                # A kept-alive upstream connection may have timed out: retry bodiless once.
                if has_body or attempt > 1:
                    raise _Reset from exc
        raise AssertionError("unreachable")

    def _upstream_connection(self, fresh: bool) -> http.client.HTTPConnection:
        if fresh:
            self._close_upstream()
        if self.upstream is None:
            self.upstream = http.client.HTTPConnection(
                self.proxy.upstream_host, self.proxy.upstream_port, timeout=self.proxy.timeout)
        return self.upstream

    def _close_upstream(self) -> None:
        if self.upstream is not None:
            self.upstream.close()
            self.upstream = None


def _base_headers(length: int, keep: bool, request_id: str | None = None) -> list[tuple[str, str]]:
    headers = [("x-amz-request-id", request_id or uuid.uuid4().hex[:16].upper()),
               ("Date", email.utils.formatdate(usegmt=True)),
               ("Server", "faultproxy"), ("Content-Length", str(length))]
    if not keep:
        headers.append(("Connection", "close"))
    return headers


def _paced(chunks: Iterator[bytes], pace: float | None) -> Iterator[bytes]:
    """The chunks, in pieces of 16 KiB when paced."""
    for chunk in chunks:
        if not pace:
            yield chunk
            continue
        for start in range(0, len(chunk), 16384):
            yield chunk[start:start + 16384]


class _TokenBucket:
    """Bytes at `rate` per second after a first `burst`; takers that overdraw wait their turn."""

    def __init__(self, rate: float, burst: int) -> None:
        self.rate, self.burst = float(rate), float(burst)
        self.tokens, self.last = float(burst), time.monotonic()
        self.lock = threading.Lock()

    def take(self, n: int) -> None:
        with self.lock:
            clock = time.monotonic()
            self.tokens = min(self.burst, self.tokens + (clock - self.last) * self.rate) - n
            self.last = clock
            wait = -self.tokens / self.rate if self.tokens < 0 else 0.0
        if wait:
            time.sleep(wait)


def _chunks(response: http.client.HTTPResponse) -> Iterator[bytes]:
    while True:
        piece = response.read(CHUNK)
        if not piece:
            return
        yield piece


def _raw_chunked(rfile: Any) -> Iterator[bytes]:
    """A chunked (or aws-chunked inside chunked) body, framing and trailers included."""
    while True:
        line = rfile.readline(65537)
        if not line:
            raise _Close
        yield line
        size = int(line.split(b";")[0].strip() or b"0", 16)
        if size == 0:
            while True:  # trailers, up to the blank line
                trailer = rfile.readline(65537)
                if not trailer:
                    raise _Close
                yield trailer
                if not trailer.strip():
                    return
        remaining = size + 2  # the data and its CRLF
        while remaining:
            piece = rfile.read(min(CHUNK, remaining))
            if not piece:
                raise _Close
            remaining -= len(piece)
            yield piece


# -- test helpers -------------------------------------------------------------------------------

@contextmanager
def make_proxy(s3: Any, **kwargs: Any) -> Iterator[FaultProxy]:
    """A running FaultProxy in front of a SeaweedServer (anything with `.endpoint_url`)."""
    with FaultProxy(s3.endpoint_url, **kwargs) as proxy:
        yield proxy


@pytest.fixture
def fault_proxy(s3: Any) -> Iterator[FaultProxy]:
    """A fresh FaultProxy in front of the session's S3 server."""
    with make_proxy(s3) as proxy:
        yield proxy
