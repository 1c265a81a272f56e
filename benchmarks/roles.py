"""CPU by process role, for benchmarks/cluster.py: which process of a `migrate` run (and of the
dask daemons beside it) used the CPU, read from /proc with psutil.

Roles: "coordinator main" (the engine's thread of the `cloudexit migrate` process), "coordinator
threads" (its other threads: dask's client event loop, and with `--cluster local:N` the
LocalCluster's scheduler and nannies, which run in that loop), "dask scheduler" (a `dask
scheduler` process), "dask worker loop" (a dask worker process's main thread: its event loop,
heartbeats, monitors) and "dask worker threads" (its other threads: the batches waiting on
cloudexit's processes, the service's router), "cloudexit-work" (cloudexit's worker processes,
named so by prctl: fetch, verify, place) and "other" (GNU time, multiprocessing's resource
tracker). The S3 server is measured apart.
"""

from __future__ import annotations

import subprocess
from collections import defaultdict
from pathlib import Path
from typing import Iterable

import psutil

ROLES = ("coordinator main", "coordinator threads", "dask scheduler", "dask worker loop",
         "dask worker threads", "cloudexit-work", "other")
WORKER_SIDE = ("dask worker loop", "dask worker threads", "cloudexit-work")  # on the worker machines
FIXED_SIDE = ("coordinator main", "coordinator threads", "dask scheduler")  # elsewhere, or per second


def _split(proc: psutil.Process, role: str) -> list[tuple[str, str, float]]:
    """(part, role, CPU) of `proc`'s main thread and of the rest (ended threads included)."""
    t = proc.cpu_times()
    total = t.user + t.system
    main = next((th.user_time + th.system_time for th in proc.threads() if th.id == proc.pid), 0.0)
    first, rest = (("coordinator main", "coordinator threads") if role == "coordinator"
                   else ("dask worker loop", "dask worker threads"))
    return [("main", first, main), ("rest", rest, max(0.0, total - main))]


class RoleClock:
    """CPU seconds so far by role, over every process seen under the given roots. A process
    that ended keeps its last reading (sampled every half second: its last moments are lost);
    a process's role is the one it had when last seen (a worker process is renamed after its
    start)."""

    def __init__(self, cluster: bool, schedulers: Iterable[int] = (), dask_workers: Iterable[int] = ()) -> None:
        self.cluster = cluster
        self.schedulers, self.dask_workers = set(schedulers), set(dask_workers)
        self.coordinator: int | None = None
        self.last: dict[tuple[int, str], tuple[str, float]] = {}
        self.spies: list[subprocess.Popen] = []
        self.spied: set[int] = set()

    def _roles(self, proc: psutil.Process) -> list[tuple[str, str, float]]:
        if proc.pid == self.coordinator:
            return _split(proc, "coordinator")
        name = proc.name()
        if name == "cloudexit-work":
            role = "cloudexit-work"
        elif proc.pid in self.schedulers:
            role = "dask scheduler"
        elif proc.pid in self.dask_workers or (
                self.cluster and proc.ppid() == self.coordinator and "resource_tracker" not in " ".join(proc.cmdline())):
            return _split(proc, "dask worker")  # a CLI dask worker, or a LocalCluster worker process
        else:
            role = "other"
        t = proc.cpu_times()
        return [("all", role, t.user + t.system)]

    def sample(self, roots: Iterable[psutil.Process]) -> dict[str, float]:
        for root in roots:
            try:
                procs = [root, *root.children(recursive=True)]
            except psutil.Error:
                continue
            if self.coordinator is None:  # the Python process under GNU time
                self.coordinator = next((p.pid for p in procs if _is_python(p)), None)
            for proc in procs:
                try:
                    for part, role, cpu in self._roles(proc):
                        self.last[(proc.pid, part)] = (role, cpu)
                except psutil.Error:
                    pass
        totals: dict[str, float] = defaultdict(float)
        for role, cpu in self.last.values():
            totals[role] += cpu
        return {role: totals.get(role, 0.0) for role in ROLES}

    def spy(self, py_spy: str, folder: Path, label: str) -> None:
        """py-spy on the coordinator and the dask workers seen so far (each once), until they end:
        folded stacks of the threads on CPU, in `folder`."""
        pids = {pid: role for (pid, _part), (role, _cpu) in self.last.items()
                if role in ("coordinator main", "dask worker loop")}
        for pid, role in pids.items():
            if pid in self.spied:
                continue
            self.spied.add(pid)
            out = folder / f"{label}-{role.split()[0]}-{pid}.txt"
            self.spies.append(subprocess.Popen(
                [py_spy, "record", "--pid", str(pid), "--rate", "50", "--format", "raw",
                 "--threads", "--nonblocking", "-o", str(out)],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))

    def stop_spies(self) -> None:
        for spy in self.spies:
            try:
                spy.wait(timeout=30)  # py-spy ends with the process it records
            except subprocess.TimeoutExpired:
                spy.terminate()


def _is_python(proc: psutil.Process) -> bool:
    try:
        return proc.name().startswith("python")
    except psutil.Error:
        return False


def per_gb(before: dict[str, float], after: dict[str, float], gb: float) -> dict[str, float]:
    """CPU s per GB by role between two samples, with the worker side and the fixed side summed."""
    out = {role: (after[role] - before[role]) / gb for role in ROLES}
    out["worker side"] = sum(out[r] for r in WORKER_SIDE)
    out["fixed side"] = sum(out[r] for r in FIXED_SIDE)
    return out
