"""The cluster's worker side: one migration's fetch + verify + place on one dask worker.

The coordinator (executor.py) calls these functions on the dask workers (`Client.run` for
set-up, `Client.submit` for batches). Each worker keeps one `Service` per migration run: the
local executor's worker processes on that machine (engine/local.py: the same fetch, verify and
place code), fed batch by batch. A batch returns its messages (results,
large objects' ranges) when all its objects are done; nothing here opens the state DB.

Names passed to dask (task keys, function names) carry a run token and a number, never a key,
a path or a secret: the dask dashboard shows them.
"""

from __future__ import annotations

import os
import pickle
import secrets
import shutil
import tempfile
import threading
import time
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable, Protocol, TypeVar

from cloudexit.core.config import MigrateConfig
from cloudexit.transfer.messages import Message, RangeDone, ResultGroup
from cloudexit.stores.filesystem import TEMP_PREFIX
from cloudexit.s3.client import Credentials, Endpoint
from cloudexit.transfer.tasks import Result, Task

TOKEN_PREFIX = ".cloudexit-cluster-"  # the DEST token file's name (+ run token)
EGRESS_METRIC = "cloudexit-egress"  # the dask worker's heartbeats carry each run's egress totals
IDLE_END = 120.0  # seconds: a run's service idle this long is ended when another run starts
ENDING_WAIT = 20.0  # seconds a new run waits for an abandoned one's processes (at most 5 + 2) to stop
# Stands in for the credentials in tasks sent to the cluster: each worker fills in its own.
NO_CREDENTIALS = Credentials("-", "")

_services: dict[str, Service] = {}
_lock = threading.Lock()


class Tally:
    """Egress counted by this worker's processes in their meter files (s3/meter.py), as totals
    since the service started: each batch brings them back, and so does every heartbeat of the
    dask worker (`egress`), so that a worker killed mid-object loses at most a few seconds of its
    count. The coordinator adds what the totals grew by to the run's own meter file."""

    def __init__(self) -> None:
        self.folder = tempfile.mkdtemp(prefix="cloudexit-meters-")
        self.paths: list[Path] = []

    def new_path(self) -> str:
        path = Path(self.folder) / f"{len(self.paths)}.meter"
        self.paths.append(path)
        return str(path)

    def total(self) -> tuple[int, int, int, int]:
        """Bytes, GET, HEAD and LIST requests counted here so far."""
        from cloudexit.s3.meter import read

        now = [0, 0, 0, 0]
        for path in list(self.paths):
            for i, value in enumerate(read(path) or (0, 0, 0, 0)):
                now[i] += value
        return now[0], now[1], now[2], now[3]

    def close(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)


class _Batch:
    def __init__(self, ids: set[int], given_up: Callable[[], bool] = lambda: False) -> None:
        self.left = set(ids)
        self.messages: list[Message] = []
        self.done = threading.Event()
        self.given_up = False
        self.let_go = given_up  # has the coordinator let go of it (dask released its task)?
        if not ids:
            self.done.set()


def worker_label(dask_worker: Any) -> str:
    """How a worker is named in the state DB, status and errors: its `--name` if it has one
    of words, else its address without the scheme."""
    name = str(getattr(dask_worker, "name", "") or "")
    address = str(dask_worker.address).split("://", 1)[-1]
    return name if name and not name.isdigit() and name != dask_worker.address else address


class Service:
    """One migration run's work on this worker: this machine's worker processes, as the local
    executor runs them (engine/local.py), fed batch by batch."""

    def __init__(self, token: str, name: str, config: MigrateConfig, root: str, endpoint: Endpoint,
                 rate: float | None, profile: str | None, credentials: Credentials | None) -> None:
        from cloudexit.engine.local import LocalProcessExecutor

        self.token, self.name, self.profile = token, name, profile
        self.nonce = secrets.token_hex(4)  # this service's attempts' temp names, and its egress totals
        self.forwarded = credentials
        self.leftovers = Leftovers()
        self.chain: Any = None  # botocore's credentials of this machine, resolved once
        self.stop = threading.Event()
        self.tally = Tally()
        self.batches: dict[int, _Batch] = {}
        self.temps: dict[int, str] = {}  # small objects' attempts' temp files, until their result
        self.block = threading.Lock()
        self.last_active = time.monotonic()
        self.broken: str | None = None
        self.orphaned = False  # a batch was given up: its objects go on in the processes for nobody
        self.abandoned = False
        self.ended = threading.Event()  # set once an abandoned service's processes and temps are gone
        # Own processes, not threads of the dask worker: dask's event loop and its timers then
        # take no GIL from the hashing and writing (measured: 50% more CPU per GB in-process).
        self.pool = LocalProcessExecutor()
        self.pool.start(config, root, self.tally.new_path)
        self.pool.connect(endpoint, self.credentials())
        self.pool.set_rate(rate)
        self.processes = len(self.pool.workers)
        self.router = threading.Thread(target=self._route, name=f"cloudexit-{token}", daemon=True)
        self.router.start()

    @property
    def rate(self) -> Any:
        return self.pool.rate

    def credentials(self) -> Credentials:
        """The coordinator's (forwarded), else this machine's own (instance role, profile, env),
        refreshed by botocore when temporary."""
        if self.forwarded is not None:
            return self.forwarded
        if self.chain is None:
            self.chain = credential_chain(self.profile)
        frozen = self.chain.get_frozen_credentials()  # refreshed by botocore when temporary
        return Credentials(frozen.access_key, frozen.secret_key, frozen.token)

    # -- messages from the worker processes -------------------------------------------------------
    def _route(self) -> None:
        while self.broken is None:
            for message in self.pool.poll(0.5):
                self._send(message)
            if self.pool.stopped:
                return
            problem = self.pool.health()
            if problem:
                self.broken = problem
                with self.block:
                    for batch in set(self.batches.values()):
                        batch.done.set()

    def _send(self, message: Message) -> None:
        if isinstance(message, ResultGroup):
            for r in message.results:
                self._send(r)
            return
        task_id = message.task_id if isinstance(message, RangeDone) else getattr(message, "id", None)
        with self.block:
            batch = self.batches.get(task_id) if task_id is not None else None
            if batch is None:
                return  # a batch given up (cancelled at the coordinator): nobody waits for it
            if isinstance(message, Result):
                message.worker = self.name
                batch.left.discard(message.id)
                del self.batches[message.id]
                self.temps.pop(message.id, None)
            batch.messages.append(message)
            if not batch.left:
                batch.done.set()

    # -- one batch --------------------------------------------------------------------------------
    def run(self, tasks: list[Task], given_up: Callable[[], bool] = lambda: False) -> list[Message] | None:
        """Run a batch; its messages once all its objects are done (None: this worker's
        processes failed, the batch must run elsewhere). `given_up()`: the coordinator no
        longer wants it (it was killed or cancelled the run): when every batch here is given
        up, the service stops (what is in flight ends as cancelled)."""
        if self.broken or self.abandoned:
            return None
        credentials = self.credentials()
        batch = _Batch({t.id for t in tasks}, given_up)
        with self.block:
            for t in tasks:
                self.batches[t.id] = batch
        for task in tasks:
            task.credentials = credentials
            own_temp(task, f"{self.nonce}{task.id}", self.leftovers)
            if not task.large:  # a large object's ranges are kept for the resume to take over
                with self.block:
                    self.temps[task.id] = task.temp
        self.pool.submit(tasks)
        while not batch.done.wait(1.0):
            if self.abandoned:  # another batch found the run given up: this one ends with it
                return None
            if batch.given_up or given_up():
                self._give_up(batch)
                self._abandon_if_orphaned()
                return []
        self.last_active = time.monotonic()
        self._abandon_if_orphaned()
        return None if self.broken and batch.left else batch.messages

    def _give_up(self, batch: _Batch) -> None:
        with self.block:
            batch.given_up = self.orphaned = True
            for task_id in batch.left:
                self.batches.pop(task_id, None)

    def settle(self) -> None:
        """Look now, not at each batch's next look (once a second), whether the coordinator let
        go of the batches here; if it let go of all of them, the service ends."""
        with self.block:
            live = set(self.batches.values())
        for batch in live:
            if not batch.given_up and batch.let_go():
                self._give_up(batch)
        self._abandon_if_orphaned()

    def _abandon_if_orphaned(self) -> None:
        """Once a batch was given up (the coordinator died, or let go of this worker's work)
        and no batch it still waits for is left here, the service ends. Checked both when a
        batch is given up and when one finishes: another batch may finish between its
        coordinator's death and its own next look (once a second), and the processes would
        then go on with the given-up objects, their temp files and all, for nobody."""
        with self.block:
            if not self.orphaned or self.abandoned or any(not b.given_up for b in self.batches.values()):
                return
            self.abandoned = True
        threading.Thread(target=self.abandon, name=f"cloudexit-{self.token}-end", daemon=True).start()

    def busy(self) -> bool:
        return bool(self.batches)

    def counted(self) -> tuple[str, tuple[int, int, int, int]]:
        """This service's egress totals, under its nonce (a worker restarted is a new service)."""
        return self.nonce, self.tally.total()

    def cancel(self) -> None:
        self.stop.set()
        self.pool.cancel()

    def abandon(self) -> None:
        """The coordinator that ran this service is gone: stop its processes, then remove the
        temp files of its unfinished small objects (a large object's, with the ranges its
        coordinator recorded, is left for the resume to take over). It stays listed until then:
        a run that starts on this worker waits for it (`start`), so that the dead run's processes
        never write beside the new run's, and the new run's listing of a folder (Leftovers, once
        per folder) never misses a temp file they wrote late."""
        try:
            self.cancel()
            self.end()
            with self.block:
                temps, self.temps = list(self.temps.values()), {}
            for path in temps:
                try:
                    os.unlink(path)
                except OSError:  # finished, or taken over by a newer attempt (renamed): not ours now
                    pass
        finally:
            with _lock:
                if _services.get(self.token) is self:
                    del _services[self.token]
            self.ended.set()

    def end(self) -> None:
        self.pool.stop()
        self.router.join(timeout=5)
        self.tally.close()


def credential_chain(profile: str | None) -> Any:
    """This machine's credentials as boto3 finds them (instance role, profile, env)."""
    import botocore.session  # type: ignore[import-untyped]

    from cloudexit.core.errors import CredentialsError

    found = botocore.session.Session(profile=profile).get_credentials()
    if found is None:
        raise CredentialsError("no S3 credentials on this worker",
                               hint="give the worker an instance role, a profile or AWS_* variables, "
                                    "or use --cluster-credentials forward over tls://")
    return found


class Leftovers:
    """Temp files of earlier attempts, by folder: each folder listed once per service (a
    listing per object would cost a series folder's size for each of its objects)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.folders: dict[str, set[str]] = {}

    def of(self, base: str) -> list[str]:
        """Paths of earlier attempts' temp files of the object whose temp names start `base`."""
        folder, stem = os.path.split(base)
        with self.lock:
            names = self.folders.get(folder)
            if names is None:
                if len(self.folders) > 50_000:
                    self.folders.clear()
                try:
                    names = {e.name for e in os.scandir(folder)
                             if e.name.startswith(TEMP_PREFIX) and e.name.endswith(".part")}
                except OSError:
                    names = set()
                self.folders[folder] = names
            mine = [n for n in names if n.startswith(stem + ".")]
            names.difference_update(mine)
        return [os.path.join(folder, n) for n in mine]


def own_temp(task: Task, attempt: str, leftovers: Leftovers) -> None:
    """Give `task` a temp name of its own attempt, so that two attempts at one object (a worker
    cut off but still writing, a coordinator killed while its batches ran) never write one file.
    The newest leftover of earlier attempts is taken over (a resume), the others removed."""
    base = task.temp.removesuffix(".part")
    mine = f"{base}.{attempt}.part"
    found: list[tuple[float, str]] = []
    for path in [task.temp, *leftovers.of(base)]:
        try:
            found.append((os.stat(path, follow_symlinks=False).st_mtime, path))
        except OSError:
            pass
    found.sort(reverse=True)
    if found and not task.fresh:
        try:
            os.rename(found.pop(0)[1], mine)
        except OSError:
            pass
    for _mtime, path in found:
        try:
            os.unlink(path)
        except OSError:
            pass
    task.temp = mine


# -- what the coordinator calls on the workers ------------------------------------------------------
def check(root: str, token: str, secret: str, profile: str | None, forwarded: bool, code: str,
          dask_worker: Any = None) -> dict[str, str | None]:
    """Can this worker take work: it runs the coordinator's cloudexit (`code`: sameness.py),
    reads the coordinator's token under DEST (the same archive, mounted at the same path), can
    write there, and has S3 credentials."""
    import multiprocessing

    from cloudexit.cluster.sameness import other_code

    name = worker_label(dask_worker) if dask_worker is not None else "?"
    problem = other_code(code)
    if problem is not None:
        return {"worker": name, "problem": problem}
    if multiprocessing.current_process().daemon:
        return {"worker": name, "problem": "it runs as a daemonic process (under dask's nanny), which cannot "
                "start cloudexit's worker processes: start it with DASK_DISTRIBUTED__WORKER__DAEMON=False "
                "in its environment, or with --no-nanny"}
    path = os.path.join(root, TOKEN_PREFIX + token)
    try:
        with open(path, encoding="ascii") as f:
            got = f.read()
        if got != secret:
            problem = f"{path} holds another token: this worker's {root} is another folder"
    except FileNotFoundError:
        problem = f"{path} is not there: this worker does not see the same archive at {root}"
    except OSError as exc:
        problem = f"cannot read {path}: {exc.strerror or exc}"
    if problem is None:
        probe = os.path.join(root, f"{TOKEN_PREFIX}{token}-{secrets.token_hex(4)}.probe")
        try:
            fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            os.close(fd)
            os.unlink(probe)
        except OSError as exc:
            problem = f"cannot write in {root}: {exc.strerror or exc}"
    if problem is None and not forwarded:
        try:
            credential_chain(profile)
        except Exception as exc:  # noqa: BLE001 - botocore's config errors, CredentialsError
            problem = f"no S3 credentials on this worker ({exc})"
    return {"worker": name, "problem": problem}


def start(token: str, config: MigrateConfig, root: str, endpoint: Endpoint, rate: float | None,
          profile: str | None, credentials: Credentials | None, dask_worker: Any = None) -> tuple[str, int]:
    """This run's service on this worker (idempotent): (its name, its worker processes). Ends
    services of other runs left idle (a coordinator killed, or gone without a word), and first
    waits for those whose coordinator let go of their batches to stop (a resume right after a
    kill: the dead run's processes would otherwise go on writing for a few seconds)."""
    with _lock:
        others = list(_services.values())
    for other in others:
        other.settle()
    for other in others:
        if other.abandoned:
            other.ended.wait(ENDING_WAIT)
    with _lock:
        end_idle(_services, token)
        if token in _services and _services[token].abandoned:
            del _services[token]  # let go of by its coordinator (a scheduler restart): a new one
        if token not in _services:
            name = worker_label(dask_worker) if dask_worker is not None else "?"
            _services[token] = Service(token, name, config, root, endpoint, rate,
                                       profile, credentials)
        if dask_worker is not None:  # called at each heartbeat, on the worker's event loop
            dask_worker.metrics[EGRESS_METRIC] = egress
        return _services[token].name, _services[token].processes


class _Run(Protocol):
    last_active: float

    def busy(self) -> bool: ...

    def end(self) -> None: ...


R = TypeVar("R", bound=_Run)


def end_idle(runs: dict[str, R], token: str) -> None:
    """End, and forget, the `runs` (a worker's services, or header readers, by run token) other
    than `token`'s that are busy with nothing and have been idle IDLE_END seconds: their
    coordinator was killed, or went without a word. The caller holds the lock of `runs`."""
    clock = time.monotonic()
    for other, run in list(runs.items()):
        if other != token and not run.busy() and clock - run.last_active > IDLE_END:
            run.end()
            del runs[other]


def run_batch(token: str, tasks: bytes) -> tuple[str, bytes | None, Any]:
    """One batch (`pack`ed tasks): (worker name, its messages `pack`ed, the service's egress
    totals (`Service.counted`)). Messages None: this worker has no service for the run, or its
    processes failed (never raised: dask would log the arguments, keys and all)."""
    service = _services.get(token)
    if service is None:
        return "?", None, None
    messages = service.run(unpack(tasks), _given_up_check())
    return service.name, None if messages is None else pack(messages), service.counted()


def egress(dask_worker: Any = None) -> dict[str, list[Any]]:
    """Each run's egress totals on this worker, by run token: [service nonce, bytes, GET, HEAD,
    LIST] (a custom metric of the dask worker: its heartbeat takes it to the scheduler, where the
    coordinator reads it with the workers' list every few seconds)."""
    return {token: [s.nonce, *s.tally.total()] for token, s in list(_services.items())}


def pack(items: list[Any]) -> bytes:
    """Tasks or messages as one pickle: dask's scheduler passes bytes on as they are, where a
    list of objects it would unpickle and pickle again (measured: docs/performance.md, cluster)."""
    return pickle.dumps(items, protocol=pickle.HIGHEST_PROTOCOL)


def unpack(data: bytes) -> list[Any]:
    return pickle.loads(data)  # from the coordinator or a worker of this run, trusted as dask trusts its own


def _given_up_check() -> Callable[[], bool]:
    """Whether the dask task running this batch was released by its client (the coordinator
    was killed, or cancelled it): the worker marks such a task cancelled."""
    try:
        from distributed import get_worker

        worker = get_worker()
        key = worker.get_current_task()
    except Exception:  # noqa: BLE001 - not in a dask task (tests), or another dask
        return lambda: False

    def given_up() -> bool:
        task = worker.state.tasks.get(key)
        return task is None or task.state in ("cancelled", "released", "forgotten")

    return given_up


def set_rate(token: str, rate: float | None) -> None:
    service = _services.get(token)
    if service is not None:
        service.pool.set_rate(rate)


def set_credentials(token: str, credentials: Credentials) -> None:
    service = _services.get(token)
    if service is not None:
        service.forwarded = credentials


def cancel(token: str) -> None:
    service = _services.get(token)
    if service is not None:
        service.cancel()


def end(token: str) -> None:
    with _lock:
        service = _services.pop(token, None)
    if service is not None:
        service.end()


def strip_credentials(task: Task) -> Task:
    """A copy of `task` without the coordinator's credentials (the worker fills in its own)."""
    return replace(task, credentials=NO_CREDENTIALS)
