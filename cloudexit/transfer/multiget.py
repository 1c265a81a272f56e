"""Small objects, many at once, on one thread.

A worker process spends most of its CPU on small objects (DICOM instances of a few KB to 1 MB)
in per-request overhead: http.client's request and response machinery, and the GIL changing
hands between download threads at every system call (about a hundred futex calls per object
with 8 threads). This loop keeps several keep-alive connections open without blocking, sends a
signed GET on each, and reads the answers as they come with one selector. A finished body goes
through the same checks and placement as the threaded path (`Fetcher.finish_body`).

The loop takes only the plain case: a whole, fresh, single-part object of at most
`MAX_BYTES`, over HTTP or HTTPS without a proxy, with no bandwidth limit. Connections open
without blocking too (TCP connect, then the TLS handshake, driven by the same selector), so a
slow handshake on one connection never holds up the others. A kept-alive connection the server
closed while idle is opened again and the request sent again, once. Anything else, and anything
unusual on the way (a status other than 200, a short body, a dropped connection, a certificate
that is not trusted, a failed check, a disk error), goes to the download threads, which fetch
the object again and handle the case as they always did: nothing is decided here but success.
"""

from __future__ import annotations

import collections
import errno
import os
import selectors
import socket
import ssl
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable

from cloudexit.transfer.messages import Message, ResultGroup
from cloudexit.s3.client import Counters, FetchError
from cloudexit.transfer.fetch import Fetcher
from cloudexit.transfer.tasks import Result, Task
from cloudexit.transfer.worker import commit_folders

MAX_BYTES = 1 << 20  # larger objects go to the threads (one buffer per connection)
_HEADROOM = 64 * 1024  # response headers
_COOL_OFF = 30.0  # seconds the loop stays out of the way after a failed connect
_LINGER = 0.005  # seconds finished files wait for others, so one folder fsync covers them all
_BATCH = 64  # results per message to the engine, at most
PLACERS = 4  # threads that fsync and rename finished files


class _Slot:
    """One keep-alive connection and the request on it.

    phase: "connect" (TCP connect in progress), "handshake" (TLS), "read" (request sent, answer
    coming) while it has a task; the selector watches it for `events` (0: not registered)."""

    __slots__ = ("sock", "buf", "view", "got", "head_end", "total", "task", "started", "close_after",
                 "headers", "phase", "events", "request", "reused", "address", "metered", "first")

    def __init__(self) -> None:
        self.sock: socket.socket | None = None
        self.buf = bytearray(MAX_BYTES + _HEADROOM)
        self.view = memoryview(self.buf)
        self.task: Task | None = None
        self.phase = ""
        self.events = 0
        self.request = b""
        self.reused = False  # the connection served an earlier request (the server may have closed it)
        self.first: float | None = None  # seconds from the request to its first byte
        self.address: tuple[int, Any] | None = None  # the address it connected to
        self.reset()

    def reset(self) -> None:
        self.got = 0
        self.metered = 0  # body bytes counted in the egress meter
        self.head_end = -1
        self.total = -1
        self.started = 0.0
        self.close_after = False
        self.headers: dict[str, str] = {}

    def close(self) -> None:
        if self.sock is not None:
            try:
                self.sock.close()
            except OSError:
                pass
            self.sock = None


class MultiGet:
    """Runs small-object tasks on `slots` connections; hands the rest to `fallback`."""

    def __init__(self, fetcher: Fetcher, slots: int, send: Callable[[Message], None],
                 fallback: Callable[[Task, Counters | None], None]) -> None:
        self.fetcher = fetcher
        self.endpoint = fetcher.reader.endpoint
        self.reader = fetcher.reader
        self.send, self.fallback = send, fallback
        self.landed: list[Result] = []  # placed, waiting for their folders' fsync
        self.landed_since = 0.0
        # Placing (fsync, rename) runs on a few threads: an fsync blocks, and the disk takes
        # several at once better than one after the other.
        self.placers = ThreadPoolExecutor(PLACERS, thread_name_prefix="cloudexit-place")
        self.placing = 0
        self.lock = threading.Lock()
        self.placed = threading.Event()
        self.selector = selectors.DefaultSelector()
        self.idle = [_Slot() for _ in range(slots)]
        self.busy: list[_Slot] = []
        self.waiting: collections.deque[Task] = collections.deque()
        self.cool_until = 0.0
        self.enabled = self.endpoint.scheme in ("http", "https") and not self.endpoint.proxy
        self.tls = fetcher.reader.ssl_context() if self.endpoint.scheme == "https" else None
        # (family, sockaddr) of each address of the endpoint's name, resolved at the first connect;
        # the first is the one in use. `failed`: how many in a row did not connect.
        self.addresses: list[tuple[int, Any]] = []
        self.failed = 0

    # -- what the loop takes -----------------------------------------------------------------------
    def takes(self, task: Task) -> bool:
        if not self.enabled or task.large or task.fresh or task.done_ranges or task.size > MAX_BYTES \
                or task.member is not None:  # zip members: ranged GETs (transfer/zipmember.py)
            return False
        if "-" in task.etag or time.monotonic() < self.cool_until:
            return False
        rate = self.fetcher.rate
        return rate is None or rate.rate is None

    @property
    def free(self) -> int:
        """Tasks it can take now without keeping them waiting."""
        return len(self.idle) - len(self.waiting)

    @property
    def active(self) -> bool:
        return bool(self.busy or self.waiting or self.placing)

    def add(self, task: Task) -> None:
        self.waiting.append(task)

    # -- the loop ----------------------------------------------------------------------------------
    def step(self, timeout: float) -> None:
        """Start what waits, then handle what the connections have for us (at most `timeout` s)."""
        while self.waiting and self.idle:
            self._start(self.waiting.popleft())
        if self.busy:
            for key, _events in self.selector.select(timeout):
                slot = key.data
                if slot.phase == "read":
                    self._readable(slot)
                elif slot.phase == "connect":
                    self._connected(slot)
                else:
                    self._handshake(slot)
            ep = self.endpoint
            now = time.monotonic()
            for slot in [s for s in self.busy if now - s.started > (
                    ep.read_timeout if s.phase == "read" else ep.connect_timeout)]:
                self._give_up(slot, f"no answer in time ({slot.phase})")
        elif self.placing:
            self.placed.wait(timeout)
            self.placed.clear()
        self.flush(force=not self.busy)

    def flush(self, force: bool = False) -> None:
        """Group commit: fsync the folders of what landed, then report it to the engine."""
        with self.lock:
            if not self.landed or not (force or len(self.landed) >= _BATCH
                                       or time.monotonic() - self.landed_since >= _LINGER):
                return
            batch, self.landed = self.landed, []
        self.send(ResultGroup(commit_folders(self.fetcher.placer, batch)))

    def done(self, result: Result) -> None:
        with self.lock:
            if not self.landed:
                self.landed_since = time.monotonic()
            self.landed.append(result)

    def cancel(self) -> None:
        """Stop: every task here is reported cancelled (the engine queues it again)."""
        for slot in list(self.busy):
            task = slot.task
            self._release(slot, close=True)
            if task is not None:
                self.done(Result(task.id, task.key, "cancelled", etag=task.etag))
        while self.waiting:
            task = self.waiting.popleft()
            self.done(Result(task.id, task.key, "cancelled", etag=task.etag))
        for slot in self.idle:
            slot.close()

    def close(self) -> None:
        self.placers.shutdown(wait=True)
        for slot in self.idle + self.busy:
            slot.close()
        self.selector.close()

    # -- one request -------------------------------------------------------------------------------
    def _start(self, task: Task) -> None:
        fetcher = self.fetcher
        if fetcher.stop.is_set():
            self.done(Result(task.id, task.key, "cancelled", etag=task.etag))
            return
        try:
            fetcher.placer.prepare(task.final)
            if os.path.exists(task.final) or fetcher.placer.partial_size(task.temp, task.size):
                self.fallback(task, None)  # verify in place, or resume: the threads do that
                return
        except OSError:
            self.fallback(task, None)
            return
        ep = self.endpoint
        fetcher.reader.set_credentials(task.credentials)
        path = ep.path(task.key)
        signed = fetcher.reader.signer.sign("GET", ep.host, path, None,
                                            {"if-match": f'"{task.etag}"', "x-amz-checksum-mode": "ENABLED"})
        slot = self.idle.pop()
        slot.reset()
        slot.task, slot.started = task, time.monotonic()
        slot.request = "".join([f"GET {path} HTTP/1.1\r\n", *(f"{k}: {v}\r\n" for k, v in signed.items()),
                                "\r\n"]).encode("latin-1")
        self.busy.append(slot)
        if slot.sock is None:
            self._connect(slot)
        else:
            slot.reused = True
            self._send(slot)

    # -- connections -------------------------------------------------------------------------------
    def _connect(self, slot: _Slot) -> None:
        """Start a TCP connect without waiting for it (the selector says when it is done)."""
        ep = self.endpoint
        slot.reused = False
        try:
            if not self.addresses:
                self.addresses = [(family, sockaddr) for family, _, _, _, sockaddr in
                                  socket.getaddrinfo(ep.hostname, ep.port, type=socket.SOCK_STREAM)]
            slot.address = self.addresses[0]
            family, sockaddr = slot.address
            sock = socket.socket(family, socket.SOCK_STREAM)
            sock.setblocking(False)
            err = sock.connect_ex(sockaddr)
        except OSError as exc:
            self._cool(slot)
            self._give_up(slot, f"connect: {exc}")
            return
        slot.sock = sock
        if err not in (0, errno.EINPROGRESS):
            self._cool(slot)
            self._give_up(slot, f"connect: {os.strerror(err)}")
            return
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        slot.phase = "connect"
        self._watch(slot, selectors.EVENT_WRITE)

    def _connected(self, slot: _Slot) -> None:
        sock = slot.sock
        assert sock is not None
        err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if err:
            self._cool(slot)  # the threads see the outage and report it
            self._give_up(slot, f"connect: {os.strerror(err)}")
            return
        self.failed = 0
        if self.tls is None:
            self._send(slot)
            return
        self._unwatch(slot)  # the TLS socket takes over the file descriptor
        slot.sock = self.tls.wrap_socket(sock, server_hostname=self.endpoint.hostname,
                                         do_handshake_on_connect=False)
        slot.phase = "handshake"
        self._handshake(slot)

    def _handshake(self, slot: _Slot) -> None:
        sock = slot.sock
        assert isinstance(sock, ssl.SSLSocket)
        try:
            sock.do_handshake()
        except ssl.SSLWantReadError:
            self._watch(slot, selectors.EVENT_READ)
            return
        except ssl.SSLWantWriteError:
            self._watch(slot, selectors.EVENT_WRITE)
            return
        except OSError as exc:  # ssl.SSLError too: a certificate the threads will refuse and report
            self._cool(slot)
            self._give_up(slot, f"TLS handshake: {exc}")
            return
        self._send(slot)

    def _send(self, slot: _Slot) -> None:
        try:
            sent = slot.sock.send(slot.request)  # type: ignore[union-attr]
        except OSError:  # ssl.SSLWantWriteError too: the buffer of a fresh connection never is full
            sent = -1
        if sent != len(slot.request):
            if not self._again(slot):
                self._give_up(slot, "request not sent")
            return
        slot.phase = "read"
        self._watch(slot, selectors.EVENT_READ)

    def _again(self, slot: _Slot) -> bool:
        """A kept-alive connection that the server closed while it was idle: connect again and
        send the request again, once. False if that does not apply."""
        if not slot.reused or slot.got:
            return False
        self._unwatch(slot)
        slot.close()
        self._connect(slot)
        return True

    def _cool(self, slot: _Slot) -> None:
        """A connection failed. Try the name's next address (an IPv6 address without a route is
        common), or once all have failed, stay out of the way for a while: the threads meet the
        problem and report it."""
        if self.addresses and slot.address != self.addresses[0]:
            return  # an address already left behind (connections to it were opened at once)
        self.failed += 1
        if self.failed < len(self.addresses):
            self.addresses.append(self.addresses.pop(0))
            return
        self.cool_until = time.monotonic() + _COOL_OFF
        self.addresses, self.failed = [], 0  # resolve the name again next time

    def _watch(self, slot: _Slot, events: int) -> None:
        if slot.events == 0:
            self.selector.register(slot.sock, events, slot)  # type: ignore[arg-type]
        elif slot.events != events:
            self.selector.modify(slot.sock, events, slot)  # type: ignore[arg-type]
        slot.events = events

    def _unwatch(self, slot: _Slot) -> None:
        if slot.events:
            self.selector.unregister(slot.sock)  # type: ignore[arg-type]
            slot.events = 0

    def _readable(self, slot: _Slot) -> None:
        sock = slot.sock
        assert sock is not None
        while True:
            room = len(slot.buf) - slot.got
            if room == 0:
                self._give_up(slot, "answer larger than expected")
                return
            try:
                n = sock.recv_into(slot.view[slot.got:])
            except (BlockingIOError, InterruptedError, ssl.SSLWantReadError, ssl.SSLWantWriteError):
                return
            except OSError as exc:
                if not self._again(slot):
                    self._give_up(slot, f"connection lost: {exc}")
                return
            if n == 0:
                if not self._again(slot):
                    self._give_up(slot, "connection closed before the whole answer")
                return
            if not slot.got:
                self.reader.count_request("GET", "", None)  # an answer: the request reached the server
                slot.first = time.monotonic() - slot.started  # link evidence: time to first byte
            slot.got += n
            if slot.head_end < 0 and not self._head(slot):
                return
            body = min(slot.got, slot.total) - slot.head_end
            self.reader.received(body - slot.metered, None)  # as it arrives: a kill loses none
            slot.metered = body
            if slot.total >= 0 and slot.got >= slot.total:
                self._complete(slot)
                return

    def _head(self, slot: _Slot) -> bool:
        """Parse the status line and headers once they are in. False: not yet, or gave up."""
        end = slot.buf.find(b"\r\n\r\n", 0, slot.got)
        if end < 0:
            if slot.got > _HEADROOM:
                self._give_up(slot, "response headers too long")
            return False
        lines = bytes(slot.view[:end]).decode("latin-1").split("\r\n")
        status = lines[0].split(" ", 2)
        headers: dict[str, str] = {}
        for line in lines[1:]:
            name, _, value = line.partition(":")
            name = name.strip().lower()
            headers[name] = f"{headers[name]}, {value.strip()}" if name in headers else value.strip()
        task = slot.task
        assert task is not None
        length = headers.get("content-length", "")
        if (len(status) < 2 or status[1] != "200" or not status[0].startswith("HTTP/1.")
                or "transfer-encoding" in headers or not length.isdigit() or int(length) != task.size):
            # Errors, changes and anything unusual: the threads ask again and judge.
            self._give_up(slot, f"answer {lines[0]!r}")
            return False
        slot.head_end = end + 4
        slot.total = slot.head_end + task.size
        slot.headers = headers
        slot.close_after = headers.get("connection", "").lower() == "close" or status[0] == "HTTP/1.0"
        return True

    def _complete(self, slot: _Slot) -> None:
        task = slot.task
        assert task is not None
        if slot.got != slot.total:
            self._give_up(slot, "more bytes than announced")
            return
        body = slot.view[slot.head_end:slot.total]
        result = Result(task.id, task.key, "failed", etag=task.etag, ttfb=slot.first)
        result.counters.get += 1
        result.counters.bytes += len(body)
        headers = slot.headers
        started = slot.started
        try:
            place = self.fetcher.finish_body(task, result, body, headers)
        except (FetchError, OSError):
            self._release(slot, close=slot.close_after)
            self._retry(task, result)
            return
        self._release(slot, close=slot.close_after)  # the body is read: the buffer is free again
        with self.lock:
            self.placing += 1
        self.placers.submit(self._place, task, result, place, started)

    def _place(self, task: Task, result: Result, place: Callable[[], None], started: float) -> None:
        try:
            place()
        except OSError:
            self._retry(task, result)  # the threads try again, and report a disk error as such
        else:
            result.elapsed = time.monotonic() - started
            self.done(result)
        finally:
            with self.lock:
                self.placing -= 1
            self.placed.set()

    def _retry(self, task: Task, result: Result) -> None:
        self.fetcher.placer.discard(task.temp)
        task.fresh = True
        self.fallback(task, result.counters)

    def _give_up(self, slot: _Slot, why: str) -> None:
        """Hand the task to the threads, with what this attempt cost (nothing if the request
        was not sent)."""
        task = slot.task
        if task is not None and len(task.faults) < 8:
            task.faults.append(("multiget", why))  # link evidence (state/linkseries.classify)
        spent = Counters(get=1, bytes=max(0, slot.got - max(slot.head_end, 0))) \
            if slot.phase == "read" else None
        if slot.phase == "read" and not slot.got:
            self.reader.count_request("GET", "", None)  # sent, no answer: it may have reached the server
        self._release(slot, close=True)
        if task is not None:
            self.fallback(task, spent)

    def _release(self, slot: _Slot, close: bool) -> None:
        if slot in self.busy:
            self.busy.remove(slot)
        self._unwatch(slot)
        if close:
            slot.close()
        slot.task, slot.phase = None, ""
        self.idle.append(slot)


def run_worker(fetcher: Fetcher, inbox: Any, slots: int, parent: int,
               send: Callable[[Message], None], fallback: Callable[[Task, Counters | None], None],
               finish: Callable[[], None]) -> None:
    """The worker process's main thread: take task lists from the engine, run the small ones here
    and pass the rest to the download threads; `finish` when the engine says the work is over."""
    import queue

    loop = MultiGet(fetcher, slots, send, fallback)
    ended = False
    try:
        while True:
            if fetcher.stop.is_set() and loop.active:
                loop.cancel()
            if not ended and loop.free > 0:
                if not loop.active:
                    loop.flush(force=True)  # before waiting for more work
                try:
                    tasks = inbox.get(timeout=0.0 if loop.active else 1.0)  # a list, or None: the end
                except queue.Empty:
                    tasks = []
                    if not loop.active and os.getppid() != parent:
                        os._exit(1)
                if tasks is None:
                    inbox.put(None)  # for the other worker processes
                    ended = True
                    tasks = []
                for task in tasks:
                    if loop.takes(task):
                        loop.add(task)
                    else:
                        fallback(task, None)
            if ended and not loop.active:
                return
            loop.step(0.05 if not ended else 0.2)
    finally:
        loop.flush(force=True)
        loop.close()
        finish()
