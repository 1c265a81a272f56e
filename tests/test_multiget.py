"""The small-object loop (`cloudexit.multiget`) on its own, against SeaweedFS behind the fault
proxy: what it takes, what it verifies and places, and that every fault goes to the threads
with what the attempt cost."""

from __future__ import annotations

import hashlib
import threading
from pathlib import Path
from typing import Any

import pytest

from faultproxy import FaultProxy
from conftest import server_context, upload_ct

from cloudexit.testing import synthetic
from cloudexit.transfer.multiget import MAX_BYTES, MultiGet
from cloudexit.testing.s3server import SeaweedServer
from cloudexit.transfer.messages import Message, results_of
from cloudexit.s3.client import Counters, Credentials, Endpoint
from cloudexit.transfer.fetch import Fetcher
from cloudexit.transfer.rate import SharedRate
from cloudexit.transfer.tasks import Result, Task


@pytest.fixture(scope="module")
def slices(s3: SeaweedServer) -> tuple[str, list[synthetic.SyntheticObject]]:
    """12 CT slices (~0.5 MB each), uploaded once."""
    return upload_ct(s3, "multiget", patients=1, slices=12)


class Harness:
    def __init__(self, endpoint_url: str, bucket: str, s3: SeaweedServer, root: Path,
                 rate: Any = None, slots: int = 4, **endpoint: Any) -> None:
        env = s3.env()
        self.creds = Credentials(env["AWS_ACCESS_KEY_ID"], env["AWS_SECRET_ACCESS_KEY"])
        endpoint = Endpoint.from_url(endpoint_url, bucket, "us-east-1", path_style=True, **endpoint)
        self.root = root
        self.fetcher = Fetcher(endpoint, self.creds, rate, threading.Event(), root=str(root),
                               group_folder_sync=True)
        self.messages: list[Message] = []
        self.fallbacks: list[tuple[Task, Counters | None]] = []
        self.loop = MultiGet(self.fetcher, slots, self.messages.append,
                             lambda task, spent: self.fallbacks.append((task, spent)))

    def task(self, i: int, o: synthetic.SyntheticObject, etag: str | None = None) -> Task:
        final = str(self.root / o.study_uid / o.series_uid / f"{o.sop_uid}.dcm")
        body = o.body()
        return Task(i, o.key, etag or hashlib.md5(body).hexdigest(), len(body), "dicom", final,
                    final + ".part", None,
                    {"sop_uid": o.sop_uid, "study_uid": o.study_uid, "series_uid": o.series_uid}, {},
                    self.creds)

    def run(self, tasks: list[Task], close: bool = True) -> list[Result]:
        for t in tasks:
            assert self.loop.takes(t), t.key
            self.loop.add(t)
        while self.loop.active:
            self.loop.step(0.05)
        self.loop.flush(force=True)
        if close:
            self.loop.close()
        results = [r for m in self.messages for r in results_of(m)]
        self.messages.clear()
        return results


def test_plain_objects_are_verified_and_placed_by_the_loop(s3, slices, tmp_path: Path) -> None:
    bucket, objects = slices
    h = Harness(s3.endpoint_url, bucket, s3, tmp_path)
    results = h.run([h.task(i, o) for i, o in enumerate(objects)])
    assert not h.fallbacks
    assert sorted(r.key for r in results) == sorted(o.key for o in objects)
    for r in results:
        o = next(o for o in objects if o.key == r.key)
        body = o.body()
        assert r.outcome == "verified", r.detail
        assert {"size", "md5", "dicom-sop-uid"} <= set(r.checks), r.checks
        assert Path(r.path).read_bytes() == body
        assert r.sha256 == hashlib.sha256(body).hexdigest()
        assert (r.counters.get, r.counters.bytes) == (1, len(body))
        assert r.folder is None  # its folder was fsynced before the result left
        assert oct(Path(r.path).stat().st_mode & 0o777) == "0o600"
    assert not list(tmp_path.rglob(".cloudexit-*"))


def test_every_fault_goes_to_the_threads_with_its_cost(s3, slices, tmp_path: Path, fault_proxy) -> None:
    bucket, objects = slices
    keys = [o.key for o in objects]
    fault_proxy.status(503, "SlowDown", method="GET", key=keys[0], times=1)
    fault_proxy.drop(method="GET", key=keys[1], times=1)
    fault_proxy.drop(after_bytes=100_000, method="GET", key=keys[2], times=1)
    fault_proxy.truncate(at=200_000, key=keys[3], times=1)
    fault_proxy.flip(offset=300_000, key=keys[4], times=1)  # pixel data: only the MD5 notices
    fault_proxy.status(404, "NoSuchKey", method="GET", key=keys[5], times=1)
    h = Harness(fault_proxy.endpoint_url, bucket, s3, tmp_path)
    tasks = [h.task(i, o) for i, o in enumerate(objects)]
    tasks[6].etag = "0" * 32  # changed since the inventory: the server answers 412
    results = h.run(tasks)
    handed = {t.key: spent for t, spent in h.fallbacks}
    assert set(handed) == set(keys[:7])
    assert all(spent is not None and spent.get == 1 for spent in handed.values())
    assert handed[keys[4]].bytes == objects[4].size  # the whole (flipped) body was read
    flipped = next(t for t, _ in h.fallbacks if t.key == keys[4])
    assert flipped.fresh  # the threads start it over, not from the bad temp file
    assert not Path(flipped.final).exists() and not Path(flipped.temp).exists()
    assert sorted(r.key for r in results) == sorted(keys[7:])
    assert all(r.outcome == "verified" for r in results)
    for t, _ in h.fallbacks:  # and the threads finish them all
        r = h.fetcher.run(t)
        if t.key == keys[6]:
            assert r.error_kind == "changed"
        else:
            assert r.outcome == "verified", (t.key, r.detail)
            assert Path(r.path).read_bytes() == objects[keys.index(t.key)].body()


def test_what_the_loop_leaves_to_the_threads(s3, slices, tmp_path: Path) -> None:
    import multiprocessing

    bucket, objects = slices
    h = Harness(s3.endpoint_url, bucket, s3, tmp_path)
    plain = h.task(0, objects[0])
    assert h.loop.takes(plain)
    assert not h.loop.takes(h.task(1, objects[1], etag="0" * 32 + "-3"))  # multipart: needs HEADs
    big = h.task(2, objects[2])
    big.size = MAX_BYTES + 1
    assert not h.loop.takes(big)
    resumed = h.task(3, objects[3])
    resumed.fresh = True
    assert not h.loop.takes(resumed)
    rate = SharedRate(multiprocessing.get_context("spawn"))
    rate.set(1_000_000)
    limited = Harness(s3.endpoint_url, bucket, s3, tmp_path, rate=rate)
    assert not limited.loop.takes(h.task(4, objects[4]))  # --bwlimit: the threads pace themselves
    proxied = Harness(s3.endpoint_url, bucket, s3, tmp_path, proxy="http://127.0.0.1:3128")
    assert not proxied.loop.takes(h.task(5, objects[5]))  # an HTTP proxy: http.client does that
    # A file already at its final path (a crash after the rename) is verified in place by the threads.
    Path(plain.final).parent.mkdir(parents=True)
    Path(plain.final).write_bytes(objects[0].body())
    h.loop.add(plain)
    h.loop.step(0.01)
    assert [t.key for t, _ in h.fallbacks] == [plain.key]
    assert h.fallbacks[0][1] is None  # nothing was asked of the server


@pytest.fixture(params=["http", "https"])
def front(request, s3: SeaweedServer, ca) -> Any:
    """The fault proxy in front of SeaweedFS, plain or as a TLS front; and how to trust it."""
    tls = server_context(ca[0]) if request.param == "https" else None
    with FaultProxy(s3.endpoint_url, tls=tls) as proxy:
        yield proxy, ({"verify": str(ca[1])} if tls else {})


def test_connections_open_without_blocking_and_stale_ones_are_reopened(s3, slices, tmp_path: Path,
                                                                      front) -> None:
    bucket, objects = slices
    proxy, trust = front
    h = Harness(proxy.endpoint_url, bucket, s3, tmp_path, **trust)
    first = h.run([h.task(i, o) for i, o in enumerate(objects)], close=False)
    assert not h.fallbacks and len(first) == len(objects)
    assert all(r.outcome == "verified" for r in first)
    assert proxy.connections <= 4  # one per slot, kept alive
    # The server closes every idle connection; the loop opens them again and sends again.
    proxy.reset_connections()
    proxy.reset_counters()
    h.root = tmp_path / "again"
    again = h.run([h.task(i, o) for i, o in enumerate(objects)])
    assert not h.fallbacks
    assert sorted(r.key for r in again) == sorted(o.key for o in objects)
    for r in again:
        assert r.outcome == "verified" and r.counters.get == 1, (r.key, r.detail)
        assert Path(r.path).read_bytes() == objects[[o.key for o in objects].index(r.key)].body()
    assert 1 <= proxy.connections <= 4
    assert proxy.handshake_failures == 0


def test_untrusted_certificate_goes_to_the_threads_which_stop_on_it(s3, slices, tmp_path: Path,
                                                                    ca) -> None:
    bucket, objects = slices
    import trustme
    with FaultProxy(s3.endpoint_url, tls=server_context(trustme.CA())) as proxy:  # nobody trusts it
        h = Harness(proxy.endpoint_url, bucket, s3, tmp_path, verify=str(ca[1]))
        tasks = [h.task(i, o) for i, o in enumerate(objects[:4])]
        assert h.run(tasks, close=False) == []
        assert sorted(t.key for t, _ in h.fallbacks) == sorted(t.key for t in tasks)
        assert all(spent is None for _, spent in h.fallbacks)  # no request went out
        assert not h.loop.takes(h.task(9, objects[9]))  # it stays out of the way for a while
        result = h.fetcher.run(tasks[0])
        assert result.error_kind == "tls" and "not trusted" in (result.detail or "")
        assert proxy.count() == 0
        assert not list(tmp_path.rglob("*.dcm"))


def test_a_name_whose_first_address_refuses_uses_the_next(s3, slices, tmp_path: Path,
                                                          monkeypatch) -> None:
    """A name with two addresses, the first dead (as an IPv6 address without a route often is):
    the loop moves on to the next address instead of leaving everything to the threads."""
    import socket

    bucket, objects = slices
    dead = socket.socket()
    dead.bind(("127.0.0.1", 0))  # bound, not listening: connections are refused
    port = int(s3.endpoint_url.rsplit(":", 1)[1])
    real = socket.getaddrinfo

    def two_addresses(host: str, *args: Any, **kwargs: Any) -> list:
        if host == "s3.test":  # DNS: the one part faked here
            return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", ("127.0.0.1", dead.getsockname()[1])),
                    (socket.AF_INET, socket.SOCK_STREAM, 6, "", ("127.0.0.1", port))]
        return real(host, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", two_addresses)
    h = Harness(f"http://s3.test:{port}", bucket, s3, tmp_path)
    tasks = [h.task(i, o) for i, o in enumerate(objects)]
    first, rest = tasks[:4], tasks[4:]
    assert h.run(first, close=False) == []  # all four slots tried the dead address at once
    assert sorted(t.key for t, _ in h.fallbacks) == sorted(t.key for t in first)
    h.fallbacks.clear()
    results = h.run(rest)  # `run` asserts the loop still takes them: no cool-off
    assert not h.fallbacks
    assert sorted(r.key for r in results) == sorted(t.key for t in rest)
    assert all(r.outcome == "verified" for r in results)
    dead.close()
