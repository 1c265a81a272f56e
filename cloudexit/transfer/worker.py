"""A worker process of the local executor (engine/local.py): its threads and its main loop.

One process per CPU by default. Its main thread takes the engine's task lists and runs the
small, plain objects itself, many at once (`multiget`); download threads take everything else
(large objects, resumes, retries); a folder-sync thread fsyncs the folders of placed files in
groups before their results go back. Workers never open the state DB: the engine alone writes it.
"""

from __future__ import annotations

import ctypes
import os
import queue
import signal
import threading
from typing import Any, Callable

from cloudexit.core.config import MigrateConfig
from cloudexit.transfer.messages import Message, ResultGroup
from cloudexit.s3.client import Counters, _short, disk_error
from cloudexit.transfer.fetch import Fetcher
from cloudexit.transfer.rate import SharedRate
from cloudexit.transfer.tasks import Result, Task

PROCESS_NAME = "cloudexit-work"  # what `ps -o comm` and `pgrep -x` show for a worker process


class FolderSync:
    """Group commit of folder fsyncs, one thread per worker process.

    A result whose file was fsynced and renamed waits here until its folder is fsynced too, and
    only then goes to the engine (which alone marks it migrated). Every folder is fsynced once
    for all the files that landed in it while the previous round of fsyncs ran: with 50-100
    instances per series folder, that is one folder fsync for many files instead of one each.
    """

    def __init__(self, placer: Any, send: Callable[[Message], None]) -> None:
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
            self.send(ResultGroup(commit_folders(self.placer, batch)))


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
    """Linux: get SIGKILL when the engine dies (kill -9 included), never orphaned writers; and
    a process name of our own, for `ps` and for tests that kill a worker."""
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
        libc.prctl(15, PROCESS_NAME.encode(), 0, 0, 0)  # PR_SET_NAME (15 bytes at most)
    except (OSError, AttributeError):
        pass


def worker_main(setup: Any, inbox: Any, outbox: Any, rate: SharedRate, stop: Any, config: MigrateConfig,
                root: str, meter: str, parent: int) -> None:
    """Entry point of a worker process. It starts while the engine resolves the endpoint and
    plans the work, and gets the endpoint and credentials on `setup` (a pipe) when they are
    known. Its main thread takes the engine's task lists and runs the small, plain objects
    itself, many at once (`multiget`); `config.threads` download threads take everything else
    (large objects, resumes, retries, anything unusual). `meter`: its egress meter file."""
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

    fetcher = Fetcher.from_config(config, endpoint, credentials, rate, stop, root, meter=meter,
                                  report=outbox.put, group_folder_sync=True)
    threads = config.threads
    folders = FolderSync(fetcher.placer, outbox.put)
    local: queue.Queue[tuple[Task, Counters | None] | None] = queue.Queue()

    def done(result: Result) -> None:
        if result.folder:
            folders.add(result)
        else:
            outbox.put(result)

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
