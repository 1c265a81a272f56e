"""`cloudexit serve`: the live page over HTTP, read-only, from the standard library.

One `State` opened read-only (SQLite `mode=ro`: this process cannot write the DB), shared by
the request threads under a lock. Two routes: `/` (the page, `?lang=en|zh`) and `/api/live` (the
snapshot, JSON). Every request must carry the token (`Authorization: Bearer T`, or `?token=T`
on the page's address): 401 otherwise, whatever the address bound. Only GET and HEAD are
answered; nothing here writes. Works while a migration runs in another process, and without.
"""

from __future__ import annotations

import hmac
import ipaddress
import json
import os
import secrets
import socket
import threading
import time
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

from cloudexit.core.errors import UsageError
from cloudexit.report.live import page, snapshot
from cloudexit.state.db import State

# No external asset can load, and the page can only talk to this server.
CSP = ("default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; "
       "connect-src 'self'; img-src data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
# A snapshot is shared between requests for CACHE_S, or 5 x as long as it took to make (a DB of
# millions of objects takes seconds to count: several browsers must not keep SQLite busy).
CACHE_S = 1.0


def is_loopback(host: str) -> bool:
    if host in ("localhost", ""):
        return host == "localhost"
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def new_token() -> str:
    return secrets.token_urlsafe(24)


class LiveServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, state: State, host: str, port: int, token: str) -> None:
        if not token:
            raise UsageError("the live page needs a token", hint="pass --token, or leave it out to get a generated one")
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.address_family = family
        self.state, self.token = state, token
        self.lock = threading.Lock()
        self._cached: tuple[float, bytes] | None = None  # (good until, body)
        self._file = _identity(state.path)
        super().__init__((host, port), _Handler)

    def url(self, lang: str = "en") -> str:
        host, port = str(self.server_address[0]), int(self.server_address[1])
        shown = f"[{host}]" if ":" in host else host
        return f"http://{shown}:{port}/?lang={lang}&token={self.token}"

    def db_gone(self) -> bool:
        """The DB file was deleted or replaced: the open connection would go on reading the old
        file (Unix keeps it while it is open) and the page would show figures that no longer move."""
        return _identity(self.state.path) != self._file

    def snapshot_json(self) -> bytes:
        with self.lock:
            clock = time.monotonic()
            if self._cached is None or clock > self._cached[0]:
                body = json.dumps(snapshot(self.state), ensure_ascii=False).encode()
                took = time.monotonic() - clock
                self._cached = (time.monotonic() + max(CACHE_S, 5 * took), body)
            return self._cached[1]


def _identity(path: os.PathLike[str]) -> tuple[int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino


class _Handler(BaseHTTPRequestHandler):
    server: LiveServer
    server_version = "cloudexit"
    sys_version = ""

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def _authorised(self, query: dict[str, list[str]]) -> bool:
        given = self.headers.get("Authorization", "")
        token = given[7:] if given.startswith("Bearer ") else (query.get("token") or [""])[0]
        return hmac.compare_digest(token.encode(), self.server.token.encode())

    def _send(self, status: int, body: bytes, kind: str, head: bool = False) -> None:
        self.send_response(status)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.send_header("X-Content-Type-Options", "nosniff")
        self.send_header("Referrer-Policy", "no-referrer")  # the token is in the page's address
        self.send_header("Content-Security-Policy", CSP)
        self.end_headers()
        if not head:
            self.wfile.write(body)

    def do_GET(self, head: bool = False) -> None:
        parts = urlsplit(self.path)
        query = parse_qs(parts.query)
        if not self._authorised(query):
            self._send(HTTPStatus.UNAUTHORIZED, b"401: this page needs its token (the address `cloudexit serve` printed)\n",
                       "text/plain; charset=utf-8", head)
            return
        if parts.path == "/":
            lang = (query.get("lang") or ["en"])[0]
            self._send(HTTPStatus.OK, page("zh" if lang == "zh" else "en").encode(), "text/html; charset=utf-8", head)
        elif parts.path == "/api/live":
            problem: dict[str, str] | None = {"error": "gone"} if self.server.db_gone() else None
            if problem is None:
                try:
                    body = self.server.snapshot_json()
                except Exception as exc:  # noqa: BLE001 - a busy or damaged DB: say so, keep serving
                    problem = {"error": "unreadable", "detail": type(exc).__name__}
            if problem is not None:
                self._send(HTTPStatus.SERVICE_UNAVAILABLE, json.dumps(problem).encode(), "application/json", head)
                return
            self._send(HTTPStatus.OK, body, "application/json; charset=utf-8", head)
        else:
            self._send(HTTPStatus.NOT_FOUND, b"not found\n", "text/plain; charset=utf-8", head)

    def do_HEAD(self) -> None:
        self.do_GET(head=True)

    def _refuse(self) -> None:
        self._send(HTTPStatus.METHOD_NOT_ALLOWED, b"read-only\n", "text/plain; charset=utf-8")

    do_POST = do_PUT = do_DELETE = do_PATCH = _refuse
