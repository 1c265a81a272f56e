"""Real `dask scheduler` and `dask worker` processes on loopback for the cluster tests."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import pytest

from cloudexit.cluster.connect import dask_environment
from cloudexit.testing.s3server import SeaweedServer, free_port

DASK = Path(sys.executable).with_name("dask")


def node_env(s3: SeaweedServer) -> dict[str, str]:
    """What a worker machine would have: our code, and S3 credentials of its own."""
    env = {**os.environ, **s3.env(), "PYTHONPATH": os.pathsep.join(sys.path)}
    env.pop("AWS_PROFILE", None)
    env.update(dask_environment())  # as docs/scale-out.md advises
    return env


class DaskNodes:
    """A scheduler on 127.0.0.1 and workers started on demand (each its own process, no nanny,
    so kill -9 of one is the loss of that worker; or, with `nanny=True`, under dask's nanny as
    docs/scale-out.md deploys them, which starts the worker again when it ends)."""

    def __init__(self, s3: SeaweedServer, log: Path) -> None:
        if not DASK.exists():
            pytest.skip("the dask CLI is not installed (pip install 'cloudexit[cluster]')")
        self.env = node_env(s3)
        self.log = log
        self.port = free_port()
        self.address = f"tcp://127.0.0.1:{self.port}"
        self.workers: dict[str, subprocess.Popen[bytes]] = {}
        self.start_scheduler()

    def _spawn(self, argv: Sequence[str], name: str, env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
        out = open(self.log / f"{name}.log", "ab")  # noqa: SIM115 - the log stays open while the process runs
        return subprocess.Popen(list(argv), stdout=out, stderr=subprocess.STDOUT, env=env or self.env,
                                start_new_session=True)

    def start_scheduler(self, **config: str) -> None:
        """A scheduler on the address (again); `config`: its dask settings, e.g. worker_ttl="5s"."""
        env = {**self.env, **{f"DASK_DISTRIBUTED__SCHEDULER__{k.upper()}": v for k, v in config.items()}}
        self.scheduler = self._spawn([str(DASK), "scheduler", "--host", "127.0.0.1", "--port", str(self.port),
                                      "--dashboard-address", f"127.0.0.1:{free_port()}", "--no-show"],
                                     "scheduler", env)

    def kill_scheduler(self) -> None:
        self.scheduler.send_signal(signal.SIGKILL)
        self.scheduler.wait(timeout=10)

    def freeze_scheduler(self) -> None:
        """Stop the scheduler (SIGSTOP): its connections stay open and nothing answers, as with
        a frozen machine (close() lets it go on before ending it)."""
        self.scheduler.send_signal(signal.SIGSTOP)

    def worker(self, name: str, wrap: Sequence[str] = (), nthreads: int = 2,
               nanny: bool = False, pythonpath: str | None = None) -> subprocess.Popen[bytes]:
        """`pythonpath`: put first on the worker's path (another cloudexit, say)."""
        env = {**self.env, "DASK_DISTRIBUTED__WORKER__DAEMON": "False"} if nanny else dict(self.env)
        if pythonpath:
            env["PYTHONPATH"] = os.pathsep.join([pythonpath, env.get("PYTHONPATH", "")])
        proc = self._spawn([*wrap, str(DASK), "worker", self.address, "--name", name, "--nthreads",
                            str(nthreads), *([] if nanny else ["--no-nanny"]), "--no-dashboard",
                            "--host", "127.0.0.1"], name, env)
        self.workers[name] = proc
        return proc

    def signal(self, name: str, sig: int) -> None:
        """Send `sig` to the dask worker process alone (not its cloudexit worker processes)."""
        self.workers[name].send_signal(sig)

    def wait_for(self, count: int, timeout: float = 60) -> None:
        from distributed import Client

        with Client(self.address, timeout=timeout) as client:
            client.wait_for_workers(count, timeout=timeout)

    def kill(self, name: str) -> None:
        proc = self.workers.pop(name)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)

    def kill_when(self, name: str, run: subprocess.Popen[str], condition: Callable[[], Any], what: str,
                  timeout: float = 90) -> str:
        """Kill -9 worker `name` once `condition()` (rows in the DB) holds while `run` goes
        on, then wait for `run` to end (killed if the test fails first); its stderr."""
        from dbutil import wait_for

        try:
            wait_for(run, condition, what, timeout)
            self.kill(name)
            return run.communicate(timeout=180)[1]
        finally:
            if run.poll() is None:
                run.kill()

    def close(self) -> None:
        for proc in [*self.workers.values(), self.scheduler]:
            if proc.poll() is None:
                proc.send_signal(signal.SIGCONT)  # a worker a test stopped
                proc.terminate()
        deadline = time.monotonic() + 10
        for proc in [*self.workers.values(), self.scheduler]:
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()


@pytest.fixture
def dask_nodes(s3: SeaweedServer, tmp_path: Path) -> Any:
    """A fresh scheduler per test (tests kill workers); start workers with `.worker(name)`."""
    log = tmp_path / "dask-logs"
    log.mkdir()
    nodes = DaskNodes(s3, log)
    try:
        yield nodes
    finally:
        nodes.close()
