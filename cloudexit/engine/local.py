"""The local executor: spawned worker processes on this machine (transfer/worker.py).

One process per CPU by default, each with `config.threads` download threads and a `multiget`
loop. Tasks go out on one shared queue (small objects a few per message, large ones alone, so
no thread holds several while others have nothing); messages come back on another. The
bandwidth limit is a token bucket in shared memory (`SharedRate`); a stop is an Event.
"""

from __future__ import annotations

import multiprocessing
import os
import queue
import sys
from contextlib import contextmanager
from typing import Any, Callable, Iterator, Sequence

from cloudexit.core.config import MigrateConfig
from cloudexit.core.errors import StateError
from cloudexit.transfer.messages import Message
from cloudexit.s3.client import Credentials, Endpoint
from cloudexit.transfer.rate import SharedRate
from cloudexit.transfer.tasks import Task

TASKS_PER_MESSAGE = 4  # small objects per message to the workers


class LocalProcessExecutor:
    """`Executor` (engine/executor.py) over spawned processes and multiprocessing queues."""

    def __init__(self, processes: int | None = None) -> None:
        """`processes`: how many workers (None: `config.worker_processes()`)."""
        self.processes = processes
        self._capacity = 0
        self.workers: list[Any] = []
        self.names: list[str] = []
        self.setup_pipes: list[Any] = []  # each worker's endpoint and credentials go there
        self.stopped = False

    @property
    def capacity(self) -> int:
        return self._capacity

    def start(self, config: MigrateConfig, root: str, new_meter: Callable[[], str]) -> None:
        from cloudexit.transfer.worker import worker_main

        ctx = multiprocessing.get_context("spawn")
        self.stop_event = ctx.Event()
        self.rate = SharedRate(ctx)
        self.inbox: Any = ctx.Queue()
        self.outbox: Any = ctx.Queue()
        processes = self.processes or config.worker_processes()
        self._capacity = processes * config.threads
        pipes = [ctx.Pipe(duplex=False) for _ in range(processes)]
        self.setup_pipes = [send for _recv, send in pipes]
        self.names = [f"cloudexit-worker-{i}" for i in range(processes)]
        self.workers = [ctx.Process(target=worker_main, name=name, daemon=True,
                                    args=(recv, self.inbox, self.outbox, self.rate, self.stop_event,
                                          config, root, new_meter(), os.getpid()))
                        for name, (recv, _send) in zip(self.names, pipes)]
        with _main_module_hidden():
            for w in self.workers:
                w.start()

    def connect(self, endpoint: Endpoint, credentials: Credentials) -> None:
        for name, conn in zip(self.names, self.setup_pipes):
            try:
                conn.send((endpoint, credentials))
            except OSError as exc:
                raise StateError(f"worker process {name} ended before it started ({exc})",
                                 hint="check memory and the system log; then run the command again") from exc

    def submit(self, tasks: Sequence[Task]) -> None:
        batch: list[Task] = []
        for task in tasks:
            if task.large:
                self.inbox.put([task])
                continue
            batch.append(task)
            if len(batch) == TASKS_PER_MESSAGE:
                self.inbox.put(batch)
                batch = []
        if batch:
            self.inbox.put(batch)

    def poll(self, timeout: float) -> list[Message]:
        out: list[Message] = []
        try:
            out.append(self.outbox.get(timeout=timeout) if timeout > 0 else self.outbox.get_nowait())
            while True:
                out.append(self.outbox.get_nowait())
        except queue.Empty:
            pass
        return out

    def set_rate(self, bytes_per_second: float | None) -> None:
        self.rate.set(bytes_per_second)

    def cancel(self) -> None:
        self.stop_event.set()

    def health(self) -> str | None:
        """A worker process that died (killed, out of memory) would leave its tasks in flight
        for ever, and which ones it held is not known here: the run stops instead."""
        for name, w in zip(self.names, self.workers):
            if w.exitcode is not None:
                return f"worker process {name} ended unexpectedly (exit code {w.exitcode})"
        return None

    def stop(self) -> None:
        if self.stopped or not self.workers:
            return
        self.stopped = True
        self.stop_event.set()
        self.inbox.put(None)
        for w in self.workers:
            w.join(timeout=5)
        for w in self.workers:
            if w.is_alive():
                w.terminate()
                w.join(timeout=2)
        self.inbox.cancel_join_thread()
        self.outbox.cancel_join_thread()


@contextmanager
def _main_module_hidden() -> Iterator[None]:
    """Start worker processes without re-running the caller's main script in them.

    The spawn start method re-imports `__main__` in each child unless it cannot find it; our
    workers' code lives in `cloudexit.transfer`, so they never need it: hiding it keeps them
    lean (no click, no pytest) and makes the library safe to call from a script without an
    `if __name__ == "__main__"` guard.
    """
    main = sys.modules.get("__main__")
    if main is None:
        yield
        return
    saved: dict[str, Any] = {name: main.__dict__[name] for name in ("__file__", "__spec__")
                             if name in main.__dict__}
    try:
        for name in saved:
            if name == "__spec__":
                main.__dict__[name] = None
            else:
                del main.__dict__[name]
        yield
    finally:
        main.__dict__.update(saved)
