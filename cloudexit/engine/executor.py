"""Where fetch tasks run: the interface between the engine and its workers.

The engine (engine/migrate.py) plans tasks, hands them to an executor and applies the policy to
what comes back; it never sees processes, queues or machines. An executor runs fetch + verify +
place for each task somewhere that mounts the archive: `LocalProcessExecutor` (engine/local.py)
in spawned processes on this machine; a cluster executor on other machines. See
docs/architecture.md, "How to add an executor".

Rules every executor keeps:
* workers never open the state DB: what they need is in the `Task` and the frozen config;
* a task's outcome is reported once, as a `Result` (alone or in a `ResultGroup`); a task whose
  worker was lost is reported as `WorkerLost` (or, if the executor cannot tell which tasks it
  held, by `health`); nothing a worker does counts before the engine commits its result;
* temp names are unique per object version (`Task.temp`), so two attempts never mix bytes.
"""

from __future__ import annotations

from typing import Callable, Protocol, Sequence, runtime_checkable

from cloudexit.core.errors import StateError

from cloudexit.core.config import MigrateConfig
from cloudexit.transfer.messages import Message
from cloudexit.s3.client import Credentials, Endpoint
from cloudexit.transfer.tasks import Task


@runtime_checkable
class Executor(Protocol):
    """Runs fetch tasks for one migration run. Called from the engine's thread only."""

    @property
    def capacity(self) -> int:
        """Tasks it works on at once (download threads over all workers); valid after `start`.
        The engine keeps about 8 x capacity tasks submitted, and judges the link down after
        a streak of unanswered tasks that scales with it."""
        ...

    def start(self, config: MigrateConfig, root: str, new_meter: Callable[[], str]) -> None:
        """Start the workers (may return before they are ready: the engine resolves the endpoint
        meanwhile). `root`: the archive folder. `new_meter()`: a fresh path for one worker's
        egress meter file (s3/meter.py), which the engine reads at every commit."""
        ...

    def connect(self, endpoint: Endpoint, credentials: Credentials) -> None:
        """Where and as whom to GET; before the first `submit`. Raises StateError if the workers
        cannot take it (they ended)."""
        ...

    def submit(self, tasks: Sequence[Task]) -> None:
        """Hand over a batch of tasks (large objects and small ones mixed); never blocks long."""
        ...

    def poll(self, timeout: float) -> list[Message]:
        """What came back since the last call: waits up to `timeout` for the first message,
        then takes what else is there without waiting. [] if nothing came."""
        ...

    def set_rate(self, bytes_per_second: float | None) -> None:
        """The bandwidth limit in force, for all workers together (None: unlimited, 0: paused)."""
        ...

    def cancel(self) -> None:
        """Stop the work in flight soon (Ctrl-C, a stop): tasks end as `cancelled` results, or
        partial ranges (`RangeDone`) and no result; nothing unverified reaches a final path."""
        ...

    def health(self) -> str | StateError | None:
        """None, or why the executor cannot go on: the engine stops the run with that reason;
        --resume queues the tasks in flight again. A text: a worker process ended unexpectedly
        (the engine's hint: memory, the system log); a StateError: another cause, with its own hint."""
        ...

    def stop(self) -> None:
        """End the workers and free what the executor holds. Idempotent; also called when the
        run failed before `connect`."""
        ...
