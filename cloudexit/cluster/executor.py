"""`DaskExecutor`: the engine's fetch tasks on dask.distributed workers on other machines.

The engine (the coordinator) stays the only writer of the state DB; this executor hands its
tasks to the cluster in batches (one study's objects together, large objects alone), each a dask
task that runs on an admitted worker (service.py) and returns its results. Admission: every
worker must read back a token the coordinator wrote under DEST (the same archive at the same
path), be able to write there and have S3 credentials; workers that join later are checked the
same way before they get work. A worker lost mid-batch: dask runs the batch again on another
worker; a batch that can run nowhere comes back as `WorkerLost` and the engine queues its
objects again. The bandwidth limit is shared: each admitted worker gets an equal part,
rebalanced as workers come and go. Egress: each batch brings back what its worker counted, added
to this run's meter file (bytes a killed worker received since its last batch are not counted).
"""

from __future__ import annotations

import os
import queue
import secrets
import time
from dataclasses import replace
from typing import Any, Callable, Sequence

from cloudexit.cluster import service
from cloudexit.cluster.address import ClusterAddress, check_credentials_mode
from cloudexit.cluster.connect import check_dask, open_client, present, refuse, sort_answers
from cloudexit.core.config import MigrateConfig
from cloudexit.core.errors import StateError
from cloudexit.transfer.messages import Message, WorkerLost
from cloudexit.s3.client import Credentials, Endpoint
from cloudexit.transfer.tasks import Task

BATCH_BYTES = 256 * 2**20  # a batch of small objects holds at most this much
BATCH_OBJECTS = 64  # and at most this many: dask costs CPU per task (64 against 32: a third less of
# dask's own CPU per GB, docs/performance.md, Cluster)
LOCAL_THREADS = 4  # dask threads per LocalCluster worker: batches it works on at once
MEMBERSHIP_EVERY = 2.0  # seconds between looks at which workers are there
NO_WORKER_GRACE = 300.0  # seconds without any admitted worker before the run stops


class DaskExecutor:
    """`Executor` (engine/executor.py) over a dask.distributed cluster."""

    def __init__(self, address: ClusterAddress, credentials: str = "worker", min_workers: int | None = None,
                 profile: str | None = None, notice: Callable[[str], None] | None = None,
                 wait_for_workers: float = 60.0) -> None:
        """`credentials`: "worker" (each resolves its own) or "forward" (this machine's, only
        over tls:// or loopback). `min_workers`: workers that fail the DEST check are left out
        with a warning while at least this many pass (None: any failure stops the run).
        `profile`: the AWS profile name workers use. `notice`: where warnings and the
        dashboard link go (the CLI prints them)."""
        check_credentials_mode(address, credentials)
        check_dask(address)  # refused before the run takes its lock or touches DEST
        self.address, self.mode, self.min_workers = address, credentials, min_workers
        self.profile = profile
        self.notice = notice or (lambda text: None)
        self.wait = wait_for_workers
        self.token = secrets.token_hex(6)
        self.secret = secrets.token_hex(16)
        self.client: Any = None
        self.cluster: Any = None
        self.meter: Any = None
        self.admitted: dict[str, str] = {}  # address -> label
        self.refused: dict[str, str] = {}  # address -> why
        self.processes: dict[str, int] = {}  # address -> cloudexit worker processes there
        self.futures: dict[Any, tuple[list[int], frozenset[str]]] = {}  # -> task ids, where it may run
        self.batches = 0
        self.rate: float | None = None
        self.shares: dict[str, float | None] = {}
        self.forwarded: Credentials | None = None
        self.next_look = 0.0
        self.alone_since: float | None = None
        self.orphans = False  # a worker left: look for batches that can run nowhere
        self.stopped = False
        self.dashboard: str | None = None

    # -- set-up ------------------------------------------------------------------------------------
    @property
    def capacity(self) -> int:
        # As the local executor's requests in flight for small objects: 2 x threads a process
        # (multiget), so the engine keeps several batches going per process.
        processes = sum(self.processes.get(a, 1) for a in self.admitted) or 1
        return processes * self.config.threads * 2

    def start(self, config: MigrateConfig, root: str, new_meter: Callable[[], str]) -> None:
        from cloudexit.s3.meter import Meter

        # local:N: N dask workers of one cloudexit worker process each (N processes in all).
        self.config = replace(config, processes=1) if self.address.scheme == "local" else config
        self.root = root
        self.meter = Meter(new_meter())
        try:
            self.cluster, self.client = open_client(self.address, LOCAL_THREADS)
        except StateError:
            self.stop()
            raise
        self.done: queue.Queue[Any] = queue.Queue()  # futures as they finish (a callback puts them)
        self.dashboard = self.client.dashboard_link
        if self.dashboard:
            self.notice(f"dask dashboard: {self.dashboard}")
        self.token_path = os.path.join(root, service.TOKEN_PREFIX + self.token)
        fd = os.open(self.token_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
        with os.fdopen(fd, "w", encoding="ascii") as f:
            f.write(self.secret)
            f.flush()
            os.fsync(f.fileno())

    def connect(self, endpoint: Endpoint, credentials: Credentials) -> None:
        self.endpoint = endpoint
        self.forwarded = credentials if self.mode == "forward" else None
        need = max(1, self.min_workers or 1)
        try:
            self.client.wait_for_workers(need, timeout=self.wait)
        except (TimeoutError, OSError):
            raise StateError(f"fewer than {need} dask workers joined {self.address.url} within "
                             f"{self.wait:.0f} s", hint="start workers with `dask worker "
                             f"{self.address.url}` on the machines that mount the archive") from None
        self._look(first=True)

    # -- membership ----------------------------------------------------------------------------------
    def _look(self, first: bool = False) -> None:
        """Admit new workers (after the DEST check), forget lost ones, rebalance the rate."""
        here = present(self.client)
        for addr in [a for a in self.admitted if a not in here]:
            self.notice(f"dask worker {self.admitted.pop(addr)} left the run")
            self.orphans = True
        new = [a for a in here if a not in self.admitted and a not in self.refused]
        if new:
            found = self.client.run(service.check, self.root, self.token, self.secret, self.profile,
                                    self.forwarded is not None, workers=new, on_error="return")
            ok, bad = sort_answers(found, new)
            refuse(bad, first, len(self.admitted) + len(ok), self.min_workers, "migration",
                   f"every worker must mount the archive at the same path ({self.root}) and have S3 "
                   "credentials", self.notice)
            self.refused.update(bad)
            if ok:
                names = self.client.run(service.start, self.token, self.config, self.root, self.endpoint,
                                        self._share(len(self.admitted) + len(ok)), self.profile,
                                        self.forwarded, workers=ok, on_error="return")
                for addr in ok:
                    if isinstance(names.get(addr), tuple):
                        self.admitted[addr], self.processes[addr] = names[addr]
                        if not first:
                            self.notice(f"dask worker {self.admitted[addr]} joined the run")
        self._rebalance()
        self.alone_since = None if self.admitted else (self.alone_since or time.monotonic())
        self.next_look = time.monotonic() + MEMBERSHIP_EVERY

    def _share(self, workers: int) -> float | None:
        if self.rate is None:
            return None
        return self.rate / max(1, workers)

    def _rebalance(self) -> None:
        """Each admitted worker gets an equal part of the limit (sent only when it changes)."""
        share = self._share(len(self.admitted))
        stale = [a for a in self.admitted if self.shares.get(a, -1.0) != share]
        if stale:
            self.client.run(service.set_rate, self.token, share, workers=stale, on_error="ignore")
            for a in stale:
                self.shares[a] = share

    # -- the work --------------------------------------------------------------------------------
    def submit(self, tasks: Sequence[Task]) -> None:
        if self.forwarded is not None:
            renewed = next((t.credentials for t in tasks if t.credentials != self.forwarded), None)
            if renewed is not None:  # the engine renewed them: the workers get the new ones
                self.forwarded = renewed
                self.client.run(service.set_credentials, self.token, renewed,
                                workers=list(self.admitted), on_error="ignore")
        for batch in _batches([service.strip_credentials(t) for t in tasks], BATCH_OBJECTS):
            self.batches += 1
            where = frozenset(self.admitted)
            # The key names the run and the batch number only: the dashboard shows it. The batch
            # goes pickled: dask's scheduler unpickles a task's arguments (64 Task objects
            # otherwise) and pickles them again for the worker; bytes it only passes on.
            future = self.client.submit(service.run_batch, self.token, service.pack(batch),
                                        key=f"cloudexit-batch-{self.token}-{self.batches}",
                                        workers=list(where), allow_other_workers=False, pure=False)
            self.futures[future] = ([t.id for t in batch], where)
            future.add_done_callback(self.done.put)  # on the client's thread: a queue put only

    def poll(self, timeout: float) -> list[Message]:
        if time.monotonic() >= self.next_look:
            try:
                self._look()
            except Exception as exc:  # noqa: BLE001 - the scheduler restarting: wait, say so once
                if self.alone_since is None:
                    self.notice(f"warning: the dask scheduler does not answer ({type(exc).__name__}); waiting")
                self.admitted.clear()
                self.orphans = True
                self.alone_since = self.alone_since or time.monotonic()
                self.next_look = time.monotonic() + MEMBERSHIP_EVERY
        out: list[Message] = []
        if self.orphans:  # batches every worker they could run on left: the engine requeues them
            self.orphans = False
            live = set(self.admitted)
            for future in [f for f, (_ids, where) in self.futures.items() if not where & live and not f.done()]:
                ids, where = self.futures.pop(future)
                future.cancel()
                out.append(WorkerLost(",".join(sorted(where)), ids, "no admitted worker left for it"))
        finished = []
        try:  # block on the queue as the local executor does: no polling loop
            finished.append(self.done.get(timeout=timeout) if timeout > 0 else self.done.get_nowait())
            while True:
                finished.append(self.done.get_nowait())
        except queue.Empty:
            pass
        for future in finished:
            if future not in self.futures:
                continue  # reported lost already
            ids, where = self.futures.pop(future)
            try:
                name, messages, counted = future.result()
            except Exception as exc:  # noqa: BLE001 - KilledWorker, CancelledError, a worker error
                out.append(WorkerLost(str(getattr(exc, "last_worker", "") or "?"), ids,
                                      f"{type(exc).__name__}: {exc}"[:300]))
                continue
            if messages is None:  # it ran on a worker not (or no longer) admitted to this run
                out.append(WorkerLost(name, ids, "the worker has no service for this run"))
                continue
            if any(counted):
                self.meter.add(*counted)
            out.extend(service.unpack(messages))
        return out

    def set_rate(self, bytes_per_second: float | None) -> None:
        self.rate = bytes_per_second
        if self.client is not None:
            self._rebalance()

    def cancel(self) -> None:
        if self.client is not None and self.admitted:
            self.client.run(service.cancel, self.token, workers=list(self.admitted), on_error="ignore")

    def health(self) -> str | None:
        if self.alone_since is not None and time.monotonic() - self.alone_since > NO_WORKER_GRACE:
            return (f"no dask worker has been available for {NO_WORKER_GRACE:.0f} s at "
                    f"{self.address.url}")
        return None

    def workers(self) -> dict[str, str]:
        """Admitted workers: address -> name."""
        return dict(self.admitted)

    def stop(self) -> None:
        if self.stopped:
            return
        self.stopped = True
        try:
            if self.client is not None and self.admitted:
                for future in self.futures:
                    future.cancel()
                self.client.run(service.end, self.token, workers=list(self.admitted), on_error="ignore")
        except Exception:  # noqa: BLE001 - the scheduler may be gone; the workers end theirs when idle
            pass
        finally:
            path = getattr(self, "token_path", None)
            if path:
                try:
                    os.unlink(path)
                except OSError:
                    pass
            if self.client is not None:
                self.client.close(timeout=10)
            if self.cluster is not None:
                self.cluster.close(timeout=10)
            if self.meter is not None:
                self.meter.close()


def _batches(tasks: Sequence[Task], most: int) -> list[list[Task]]:
    """Small objects of one study together, at most `most` objects or BATCH_BYTES a batch;
    each large object alone (it would hold back the results of the small ones)."""
    out: list[list[Task]] = []
    current: list[Task] = []
    size = 0
    study: str | None = None
    for task in tasks:
        if task.large:
            out.append([task])
            continue
        this = task.expect.get("study_uid")
        if current and (len(current) >= most or size + task.size > BATCH_BYTES or this != study):
            out.append(current)
            current, size = [], 0
        current.append(task)
        size += task.size
        study = this
    if current:
        out.append(current)
    return out
