"""The executor interface (engine/executor.py): the engine talks only to it.

The local process pool never reports `WorkerLost` (it cannot tell which tasks a dead process
held; it reports by `health`, see test_migrate_faults.py). A cluster executor does, so the
engine's side of it is tested here with a test double: `LosingExecutor`, the real local pool
that pretends the worker holding one task was lost (it never hands that task to a worker).
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any, Sequence

from dbutil import rows

from cloudexit.core.config import MigrateConfig, SourceConfig
from cloudexit.engine.executor import Executor
from cloudexit.engine.local import LocalProcessExecutor
from cloudexit.transfer.messages import Message, WorkerLost
from cloudexit.engine.migrate import Migration
from cloudexit.s3.source import Source
from cloudexit.state.db import State
from cloudexit.stores.filesystem import FilesystemStore
from cloudexit.testing import synthetic
from cloudexit.transfer.tasks import Task


class LosingExecutor(LocalProcessExecutor):
    """Test double: the first task submitted is "lost with its worker" instead of run."""

    def __init__(self) -> None:
        super().__init__(processes=1)
        self.lost: Task | None = None
        self.reported = False

    def submit(self, tasks: Sequence[Task]) -> None:
        if self.lost is None and tasks:
            self.lost, tasks = tasks[0], tasks[1:]
        super().submit(tasks)

    def poll(self, timeout: float) -> list[Message]:
        out = super().poll(timeout)
        if self.lost is not None and not self.reported:
            self.reported = True
            out.append(WorkerLost("double-0", [self.lost.id], "test double: worker lost"))
        return out


def test_the_local_pool_is_an_executor() -> None:
    assert isinstance(LocalProcessExecutor(), Executor)


def test_tasks_of_a_lost_worker_run_again(s3_env, bucket: str, db: Path, tmp_path: Path, cli) -> None:
    profile = synthetic.Profile(patients=1, studies_per_patient=1, ct_slices_per_series=6, cr_per_study=0,
                                multiframe_objects=0, awkward=False, seed=5)
    objects = synthetic.upload(s3_env.client(), bucket, synthetic.generate(profile))
    assert cli("inventory", f"s3://{bucket}", "--db", str(db), "-q").exit_code == 0
    executor = LosingExecutor()
    outcome: dict[str, Any] = {}
    with State(db) as state:
        source = Source(f"s3://{bucket}", SourceConfig(endpoint_url=s3_env.endpoint_url))
        migration = Migration(state, source, FilesystemStore(tmp_path / "archive"),
                              MigrateConfig(processes=1, threads=2), executor=executor)

        def run() -> None:
            try:
                outcome["summary"] = migration.run()
            except BaseException as exc:  # noqa: BLE001 - asserted below
                outcome["error"] = exc

        thread = threading.Thread(target=run)
        thread.start()
        thread.join(60)
        if thread.is_alive():  # an engine that forgets the lost task waits for it for ever
            migration.request_stop("the test gave up waiting")
            thread.join(30)
    assert "error" not in outcome and "summary" in outcome, outcome
    assert executor.lost is not None
    summary = outcome["summary"]
    assert summary.verified == len(objects) and summary.exit_code == 0
    lost = rows(db, "SELECT state FROM transfers WHERE key = ?", (executor.lost.key,))
    assert lost[0]["state"] == "verified"
