"""`DaskExecutor`: the engine's fetch tasks on dask.distributed workers on other machines.

The engine (the coordinator) stays the only writer of the state DB; this executor hands its
tasks to the cluster in batches (one study's objects together, large objects alone), each a dask
task that runs on an admitted worker (service.py) and returns its results. Admission: every
worker must read back a token the coordinator wrote under DEST (the same archive at the same
path), be able to write there and have S3 credentials; workers that join later are checked the
same way before they get work. A worker lost mid-batch: dask runs the batch again on another
worker; a batch that can run nowhere comes back as `WorkerLost` and the engine queues its
objects again. The scheduler restarting: dask's client cancels every batch in flight (the
engine queues their objects again) and this executor holds new batches back, connects again
(dask's own reconnection gives up after a few seconds) and admits the workers that come back,
for up to `grace` seconds. The bandwidth limit is shared: each admitted worker gets an equal
part, rebalanced as workers come and go. Egress: each worker's totals come back with its batches
and with its heartbeats (read every MEMBERSHIP_EVERY seconds), and what they grew by is added to
this run's meter file: a worker killed mid-object loses at most a few seconds of its count.
"""

from __future__ import annotations

import os
import queue
import secrets
import time
from dataclasses import replace
from typing import Any, Callable, Sequence

from cloudexit.cluster import service
from cloudexit.cluster.sameness import code_fingerprint
from cloudexit.cluster.address import ClusterAddress, check_credentials_mode
from cloudexit.cluster.connect import (CONNECT_TIMEOUT, TELL_TIMEOUT, ask, check_dask, open_client,
                                       present, refuse, sort_answers)
from cloudexit.core.config import MigrateConfig
from cloudexit.core.errors import StateError
from cloudexit.transfer.messages import Message, WorkerLost
from cloudexit.s3.client import Credentials, Endpoint
from cloudexit.transfer.tasks import Task

BATCH_BYTES = 256 * 2**20  # a batch of small objects holds at most this much
BATCH_OBJECTS = 64  # and at most this many: dask costs CPU per task (64 against 32: a third less of
# dask's own CPU per GB, docs/performance.md, Cluster)
LOCAL_THREADS = 4  # dask threads per LocalCluster worker: batches it works on at once
MEMBERSHIP_EVERY = 2.0  # seconds between looks at which workers are there (and their egress)
GRACE = 300.0  # seconds without the scheduler, or any admitted worker, before the run stops


class DaskExecutor:
    """`Executor` (engine/executor.py) over a dask.distributed cluster."""

    def __init__(self, address: ClusterAddress, credentials: str = "worker", min_workers: int | None = None,
                 profile: str | None = None, notice: Callable[[str], None] | None = None,
                 wait_for_workers: float = 60.0, grace: float = GRACE) -> None:
        """`credentials`: "worker" (each resolves its own) or "forward" (this machine's, only
        over tls:// or loopback). `min_workers`: workers that fail the DEST check are left out
        with a warning while at least this many pass (None: any failure stops the run).
        `profile`: the AWS profile name workers use. `notice`: where warnings and the
        dashboard link go (the CLI prints them). `grace`: seconds the run waits for a scheduler
        that stopped answering, or for a worker when none is left, before it stops."""
        check_credentials_mode(address, credentials)
        check_dask(address)  # refused before the run takes its lock or touches DEST
        self.address, self.mode, self.min_workers = address, credentials, min_workers
        self.profile = profile
        self.notice = notice or (lambda text: None)
        self.wait = wait_for_workers
        self.grace = grace
        self.token = secrets.token_hex(6)
        self.secret = secrets.token_hex(16)
        self.client: Any = None
        self.cluster: Any = None
        self.meter: Any = None
        self.admitted: dict[str, str] = {}  # address -> label
        self.refused: dict[str, str] = {}  # address -> why
        self.processes: dict[str, int] = {}  # address -> cloudexit worker processes there
        self.futures: dict[Any, tuple[list[int], frozenset[str]]] = {}  # -> task ids, where it may run
        self.held: list[list[Task]] = []  # batches waiting for the scheduler and an admitted worker
        self.lost: list[Message] = []  # WorkerLost for the engine, at the next poll
        self.egress: dict[str, tuple[int, ...]] = {}  # a worker service's nonce -> its totals seen
        self.batches = 0
        self.rate: float | None = None
        self.shares: dict[str, float | None] = {}
        self.forwarded: Credentials | None = None
        self.next_look = 0.0
        self.alone_since: float | None = None  # no admitted worker (or no scheduler) since
        self.away_since: float | None = None  # the scheduler does not answer since
        self.redialing = False  # dask's client gave up: this executor connects again itself
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
        metrics: dict[str, Any] = {}
        here = present(self.client, metrics)
        for got in metrics.values():  # egress totals the workers' heartbeats brought
            mine = (got.get(service.EGRESS_METRIC) or {}).get(self.token)
            if mine:
                self._count((mine[0], tuple(mine[1:])))
        for addr in [a for a in self.admitted if a not in here]:
            self.notice(f"dask worker {self.admitted.pop(addr)} left the run")
            self.orphans = True
        new = [a for a in here if a not in self.admitted and a not in self.refused]
        if new:
            found = ask(self.client, service.check, self.root, self.token, self.secret, self.profile,
                        self.forwarded is not None, code_fingerprint(), workers=new)
            ok, bad = sort_answers(found, new)
            refuse(bad, first, len(self.admitted) + len(ok), self.min_workers, "migration",
                   f"every worker must mount the archive at the same path ({self.root}) and have S3 "
                   "credentials", self.notice)
            self.refused.update(bad)
            if ok:
                names = ask(self.client, service.start, self.token, self.config, self.root, self.endpoint,
                            self._share(len(self.admitted) + len(ok)), self.profile, self.forwarded, workers=ok)
                for addr in ok:
                    if isinstance(names.get(addr), tuple):
                        self.admitted[addr], self.processes[addr] = names[addr]
                        if not first:
                            self.notice(f"dask worker {self.admitted[addr]} joined the run")
        self._rebalance()
        self.alone_since = None if self.admitted else (self.alone_since or time.monotonic())
        self.next_look = time.monotonic() + MEMBERSHIP_EVERY

    def _tell(self, function: Callable[..., Any], *args: Any, workers: list[str]) -> None:
        """Run `function` on `workers`, waiting at most TELL_TIMEOUT for their answer: a worker
        that hangs (stopped, cut off) must not hold the run; the membership look deals with it."""
        try:
            self.client.run(function, *args, workers=workers, on_error="ignore", callback_timeout=TELL_TIMEOUT)
        except Exception:  # noqa: BLE001 - a timeout, the scheduler gone
            pass

    def _share(self, workers: int) -> float | None:
        if self.rate is None:
            return None
        return self.rate / max(1, workers)

    def _rebalance(self) -> None:
        """Each admitted worker gets an equal part of the limit (sent only when it changes)."""
        share = self._share(len(self.admitted))
        stale = [a for a in self.admitted if self.shares.get(a, -1.0) != share]
        if stale:
            self._tell(service.set_rate, self.token, share, workers=stale)
            for a in stale:
                self.shares[a] = share

    # -- the work --------------------------------------------------------------------------------
    def submit(self, tasks: Sequence[Task]) -> None:
        if self.forwarded is not None:
            renewed = next((t.credentials for t in tasks if t.credentials != self.forwarded), None)
            if renewed is not None:  # the engine renewed them: the workers get the new ones
                self.forwarded = renewed
                self._tell(service.set_credentials, self.token, renewed, workers=list(self.admitted))
        self.held.extend(_batches([service.strip_credentials(t) for t in tasks], BATCH_OBJECTS))
        self._send()

    def _send(self) -> None:
        """Submit the batches held, once the scheduler answers and a worker is admitted."""
        if not self.admitted or self.away_since is not None:
            return
        where = frozenset(self.admitted)
        for batch in self.held:
            self.batches += 1
            # The key names the run and the batch number only: the dashboard shows it. The batch
            # goes pickled: dask's scheduler unpickles a task's arguments (64 Task objects
            # otherwise) and pickles them again for the worker; bytes it only passes on.
            future = self.client.submit(service.run_batch, self.token, service.pack(batch),
                                        key=f"cloudexit-batch-{self.token}-{self.batches}",
                                        workers=list(where), allow_other_workers=False, pure=False)
            self.futures[future] = ([t.id for t in batch], where)
            future.add_done_callback(self.done.put)  # on the client's thread: a queue put only
        self.held = []

    def poll(self, timeout: float) -> list[Message]:
        if time.monotonic() >= self.next_look:
            self._watch()
        out, self.lost = self.lost, []
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
            if counted:
                self._count(counted)
            if messages is None:  # it ran on a worker not (or no longer) admitted to this run
                out.append(WorkerLost(name, ids, "the worker has no service for this run"))
                continue
            out.extend(service.unpack(messages))
        return out

    def _count(self, counted: tuple[str, Sequence[int]]) -> None:
        """A worker service's egress totals (from a batch or a heartbeat): what they grew by
        since last seen goes to the run's meter, so nothing is counted twice."""
        nonce, totals = counted
        seen = self.egress.get(nonce, (0, 0, 0, 0))
        grew = [max(0, int(a) - b) for a, b in zip(totals, seen)]
        if any(grew):
            self.egress[nonce] = tuple(max(int(a), b) for a, b in zip(totals, seen))
            self.meter.add(*grew)

    # -- the scheduler ---------------------------------------------------------------------------
    def _watch(self) -> None:
        """Every MEMBERSHIP_EVERY seconds: is the scheduler there (connect again if dask's client
        gave up), which workers are, and what they counted."""
        self.next_look = time.monotonic() + MEMBERSHIP_EVERY
        status = getattr(self.client, "status", "running")
        try:
            if status in ("closing", "closed") and self.cluster is None:
                if not self.redialing:
                    self.redialing = True
                    self.notice(f"warning: still waiting for the dask scheduler at {self.address.url}: "
                                f"connecting again every {MEMBERSHIP_EVERY:.0f} s")
                self._redial()
                self.redialing = False
            self._look()  # raises while the scheduler does not answer
        except Exception as exc:  # noqa: BLE001 - OSError, TimeoutError, CommClosedError...: wait
            self._away(exc)
            return
        if self.away_since is not None:
            self.notice(f"warning: the dask scheduler at {self.address.url} answers again after "
                        f"{time.monotonic() - self.away_since:.0f} s; the run goes on")
            self.away_since = None
        self._send()

    def _away(self, exc: BaseException) -> None:
        """The scheduler does not answer: its workers are forgotten (they are checked again when
        they come back) and new batches are held; the run waits up to `grace` seconds."""
        clock = time.monotonic()
        if self.away_since is None:
            self.away_since = clock
            self.notice(f"warning: waiting for the dask scheduler at {self.address.url} "
                        f"({type(exc).__name__}: {str(exc)[:200]}); the run goes on when it is back, "
                        f"or stops after {self.grace:.0f} s")
        if self.admitted:
            self.admitted.clear()
            self.shares.clear()
            self.orphans = True
        self.alone_since = self.alone_since or clock
        self.next_look = clock + MEMBERSHIP_EVERY

    def _redial(self) -> None:
        """dask's client gave up reconnecting (after its timeout): a new one. Batches of the old
        one were cancelled by it (the engine queues them again); any not reported are now."""
        import distributed

        for future in list(self.futures):
            ids, where = self.futures.pop(future)
            self.lost.append(WorkerLost(",".join(sorted(where)) or "?", ids, "the dask scheduler was lost"))
        new = distributed.Client(self.address.url, timeout=CONNECT_TIMEOUT)  # raises: still away
        old, self.client = self.client, new
        try:
            old.close(timeout=1)
        except Exception:  # noqa: BLE001 - it is closed or closing already
            pass

    def set_rate(self, bytes_per_second: float | None) -> None:
        self.rate = bytes_per_second
        if self.client is not None:
            self._rebalance()

    def cancel(self) -> None:
        for batch in self.held:  # never sent: back to the engine, which queues them again
            self.lost.append(WorkerLost("-", [t.id for t in batch], "the run stops"))
        self.held = []
        if self.client is not None and self.admitted and self.away_since is None:
            self._tell(service.cancel, self.token, workers=list(self.admitted))

    def health(self) -> StateError | None:
        """The run stops when the scheduler, or every worker, has been away longer than `grace`
        (not the engine's hint for a process that died: memory and the system log)."""
        clock = time.monotonic()
        resume = f"cloudexit migrate --resume --cluster {self.address.url}"
        if self.away_since is not None and clock - self.away_since > self.grace:
            return StateError(f"the dask scheduler at {self.address.url} has not answered for {self.grace:.0f} s; "
                              f"is it running? Once it is: {resume}",
                              hint="its log says why it stopped; a longer --cluster-wait rides out a restart")
        if self.alone_since is not None and clock - self.alone_since > self.grace:
            return StateError(f"no dask worker has been available for {self.grace:.0f} s at {self.address.url}",
                              hint=f"start workers (`dask worker {self.address.url}`) on the machines that "
                                   f"mount the archive; then: {resume}")
        return None

    def workers(self) -> dict[str, str]:
        """Admitted workers: address -> name."""
        return dict(self.admitted)

    def stop(self) -> None:
        if self.stopped:
            return
        self.stopped = True
        try:
            if self.client is not None and self.admitted and self.away_since is None:
                for future in self.futures:
                    future.cancel()
                self._tell(service.end, self.token, workers=list(self.admitted))
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
