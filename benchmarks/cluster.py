"""Cluster benchmark: `migrate` with the local executor beside `--cluster local:1`, `local:2` and
2 dask CLI workers, on one local SeaweedFS (loopback); CPU per GB and per object side by side.

    python benchmarks/cluster.py                       # ct2000 and small20k, 1 round
    python benchmarks/cluster.py --workloads ct2000 --rounds 3
    python benchmarks/cluster.py --quick               # 200 CT slices, 2,000 tiny objects
    python benchmarks/cluster.py --workloads ct2000 --trees before=/tmp/base,after=.   # two code trees, alternating
    python benchmarks/cluster.py --idle 20 --workloads none   # the dask daemons' CPU per second, idle

Workloads (as benchmarks/transfer.py): ct2000, 2,000 synthetic CT slices of ~0.5 MB
(`synthetic.Profile.ct_bench(2000)`); small20k, 20,000 tiny DICOM objects (`common.populate`).
Each run migrates a fresh copy of one finished inventory DB into a fresh folder, all checks on.
CPU: user+sys of the command and its children (wait4: the LocalCluster's processes included),
plus, for the CLI workers (not children of the command), the CPU their processes used meanwhile
(psutil), plus the dask scheduler's. The S3 server's CPU is reported apart.

Each run's steady CPU is broken down by process role (roles.py: coordinator, dask scheduler,
dask worker, cloudexit's worker processes), so the cluster path's overhead is located, not
guessed; "worker side" sums what runs on a worker machine. `--trees` runs each mode once per code
tree (PYTHONPATH), alternating, so a change is measured before and after in one run; the CLI
daemons get the dask settings the tree's code recommends (`cluster.connect.DASK_SETTINGS`).
`--idle S` measures what the dask daemons cost per second with no work. `--spy DIR` records the
coordinator and the dask workers with py-spy (costs CPU: not for figures).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import bench_server, ensure_bucket, measure, tool
from roles import ROLES, RoleClock, per_gb

from cloudexit.testing import synthetic
from cloudexit.testing.s3server import free_port

MODES = ("local", "local:1", "local:2", "cli:2")


def prepare(server, workload: str, quick: bool, log) -> str:
    bucket = f"cluster-{workload}{'-quick' if quick else ''}"
    marker = server.workdir / f"populated-{bucket}.json"
    if workload == "ct2000":
        if not marker.exists():
            objects = synthetic.upload(server.client(max_pool_connections=16), bucket,
                                       synthetic.generate(synthetic.Profile.ct_bench(200 if quick else 2000)))
            marker.write_text(json.dumps({"objects": len(objects)}))
    elif workload == "small20k":
        ensure_bucket(server, bucket, 2_000 if quick else 20_000, "uid", log=log)
    else:
        raise SystemExit(f"unknown workload {workload}")
    return bucket


HERE = str(Path(__file__).resolve().parent.parent)
NEUTRAL = "/"  # the current folder of the commands run: their code comes from PYTHONPATH only


def _env(server, tree: str) -> dict[str, str]:
    env = {**os.environ, **server.env(), "PYTHONPATH": tree}
    env.pop("AWS_PROFILE", None)
    env["DASK_DISTRIBUTED__WORKER__PROFILE__ENABLED"] = "False"  # as docs/scale-out.md advises
    return env


def daemon_env(env: dict[str, str]) -> dict[str, str]:
    """`env` plus the dask settings the tree's code recommends for `dask scheduler` and `dask
    worker` (docs/scale-out.md), as DASK_* variables. (Every Python started here runs in
    NEUTRAL: `-m` and `-c` put the current folder first on sys.path, ahead of PYTHONPATH.)"""
    code = ("import json\ntry:\n    from cloudexit.cluster.connect import dask_environment\n"
            "except ImportError:  # the code before it\n    dask_environment = dict\n"
            "print(json.dumps(dask_environment()))")
    found = subprocess.run([sys.executable, "-c", code], env=env, check=True, capture_output=True, text=True,
                           cwd=NEUTRAL)
    return {**env, **json.loads(found.stdout)}


class CliWorkers:
    """A `dask scheduler` and N `dask worker` processes (no nanny) on loopback."""

    def __init__(self, n: int, env: dict[str, str], log_dir: Path) -> None:
        port = free_port()
        self.address = f"tcp://127.0.0.1:{port}"
        dask = tool("dask")
        out = open(log_dir / "dask.log", "ab")  # noqa: SIM115 - the log stays open while the scheduler runs
        self.procs = [subprocess.Popen([dask, "scheduler", "--host", "127.0.0.1", "--port", str(port),
                                        "--dashboard-address", f"127.0.0.1:{free_port()}", "--no-show"],
                                       stdout=out, stderr=out, env=env, start_new_session=True, cwd=NEUTRAL)]
        time.sleep(1)
        self.procs += [subprocess.Popen([dask, "worker", self.address, "--name", f"bench{i}", "--nthreads", "2",
                                         "--no-nanny", "--no-dashboard", "--host", "127.0.0.1"],
                                        stdout=out, stderr=out, env=env, start_new_session=True, cwd=NEUTRAL)
                       for i in range(n)]
        from distributed import Client

        with Client(self.address, timeout=60) as client:
            client.wait_for_workers(n, timeout=60)

    @property
    def pids(self) -> tuple[list[int], list[int]]:
        """(scheduler, workers)."""
        return [self.procs[0].pid], [p.pid for p in self.procs[1:]]

    def roots(self) -> list[psutil.Process]:
        out = []
        for p in self.procs:
            try:
                out.append(psutil.Process(p.pid))
            except psutil.Error:
                pass
        return out

    def cpu(self, scheduler: bool = True) -> float:
        # With their children: each dask worker runs cloudexit's worker processes.
        return sum(_tree_cpu(psutil.Process(p.pid)) for p in (self.procs if scheduler else self.procs[1:])
                   if p.poll() is None)

    def close(self) -> None:
        for p in self.procs:
            p.send_signal(signal.SIGTERM)
        for p in self.procs:
            try:
                p.wait(timeout=15)
            except subprocess.TimeoutExpired:
                p.kill()


def _tree_cpu(root: psutil.Process) -> float:
    """CPU (user+sys) of `root` and its descendants so far, reaped ones included (each counted
    in its parent's children_* times)."""
    total = 0.0
    try:
        procs = [root, *root.children(recursive=True)]
    except psutil.Error:
        return 0.0
    for p in procs:
        try:
            t = p.cpu_times()
            total += t.user + t.system + t.children_user + t.children_system
        except psutil.Error:
            pass
    return total


def _verified(db: Path) -> tuple[int, int]:
    import sqlite3

    try:
        conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5)
        try:
            row = conn.execute("SELECT coalesce(sum(size), 0), count(*) FROM transfers WHERE state = 'verified'"
                               ).fetchone()
            return int(row[0]), int(row[1])
        finally:
            conn.close()
    except sqlite3.Error:
        return 0, 0


class Steady:
    """CPU per GB in the steady state: from 10% to 90% of the bytes verified, so the start-up
    (process starts, imports, dask's scheduler and workers joining) and the tail are left out.
    Samples the command's process tree, the CLI workers and the scheduler every 0.5 s, by role."""

    def __init__(self, db: Path, total: int, extra: Any, cluster: bool, spy: tuple[str, Path, str] | None) -> None:
        self.db, self.total, self.extra, self.spy = db, total, extra, spy
        schedulers, workers = extra.pids if extra else ([], [])
        self.clock = RoleClock(cluster, schedulers, workers)
        self.samples: list[tuple[int, int, dict[str, float]]] = []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        root = None
        while not self.stop.wait(0.5):
            if root is None:
                root = next((p for p in psutil.Process().children() if "migrate" in " ".join(p.cmdline())), None)
                continue
            roles = self.clock.sample([root, *(self.extra.roots() if self.extra else [])])
            self.samples.append((*_verified(self.db), roles))
            if self.spy:
                self.clock.spy(*self.spy)

    def _inside(self) -> list[tuple[int, int, dict[str, float]]]:
        inside = [s for s in self.samples if 0.1 * self.total <= s[0] <= 0.9 * self.total]
        return inside if len(inside) >= 2 and inside[-1][0] > inside[0][0] else []

    def per_gb(self) -> float | None:
        inside = self._inside()
        return (sum(inside[-1][2].values()) - sum(inside[0][2].values())) / ((inside[-1][0] - inside[0][0]) / 1e9) \
            if inside else None

    def ms_per_object(self) -> float | None:
        inside = self._inside()
        return 1000 * (sum(inside[-1][2].values()) - sum(inside[0][2].values())) / (inside[-1][1] - inside[0][1]) \
            if inside else None

    def roles_per_gb(self) -> dict[str, float] | None:
        inside = self._inside()
        return per_gb(inside[0][2], inside[-1][2], (inside[-1][0] - inside[0][0]) / 1e9) if inside else None

    def seconds(self) -> float | None:
        """How long the steady window lasted (samples are 0.5 s apart)."""
        inside = self._inside()
        return 0.5 * (len(inside) - 1) if inside else None


def run(server, bucket: str, mode: str, work: Path, env: dict[str, str], log,
        spy: Path | None = None, label: str = "") -> dict:
    db = work / f"{bucket}.db"
    if not db.exists():
        subprocess.run([sys.executable, "-m", "cloudexit.cli", "inventory", f"s3://{bucket}", "--db", str(db),
                        "-q"], env=env, check=True, cwd=NEUTRAL)
    copy = work / "run.db"
    for suffix in ("", "-wal", "-shm", ".key"):
        Path(str(copy) + suffix).unlink(missing_ok=True)
    shutil.copy(db, copy)
    if Path(str(db) + ".key").exists():
        shutil.copy(str(db) + ".key", str(copy) + ".key")
    shutil.rmtree(Path(str(copy) + "-egress"), ignore_errors=True)
    dest = work / "archive"
    shutil.rmtree(dest, ignore_errors=True)
    cmd = [sys.executable, "-m", "cloudexit.cli", "migrate", "--to", str(dest), "--db", str(copy), "--json", "--yes"]
    workers = None
    if mode.startswith("local:"):
        cmd += ["--cluster", mode]
    elif mode.startswith("cli:"):
        workers = CliWorkers(int(mode.split(":")[1]), daemon_env(env), work)
        cmd += ["--cluster", workers.address]
    steady = Steady(copy, _total_bytes(copy), workers, mode != "local",
                    (tool("py-spy"), spy, f"{label}-{mode}") if spy else None)
    try:
        before = (workers.cpu(), workers.cpu(scheduler=False)) if workers else (0.0, 0.0)
        busy = _busy()
        steady.thread.start()
        m = measure(cmd, env=env, stdout=str(work / "out.json"), server_pid=server.proc.pid, count_lines=False,
                    cwd=NEUTRAL)
        steady.stop.set()
        steady.thread.join()
        busy = _busy() - busy
        extra = (workers.cpu() - before[0]) if workers else 0.0
        on_workers = (workers.cpu(scheduler=False) - before[1]) if workers else 0.0
    finally:
        if workers:
            workers.close()
        steady.clock.stop_spies()
    summary = json.loads((work / "out.json").read_text())
    gb = summary["bytes_verified"] / 1e9
    cpu = m.cpu_s + extra
    n_workers = int(mode.split(":")[1]) if ":" in mode else None
    row = {"mode": mode, "ok": m.returncode == 0, "objects": summary["verified"], "gb": gb, "wall_s": m.wall_s,
           "cpu_s": cpu, "cpu_s_per_gb": cpu / gb if gb else None,
           "cpu_ms_per_object": 1000 * cpu / max(1, summary["verified"]),
           "mb_per_s": summary["bytes_verified"] / 1e6 / m.wall_s,
           "mb_per_s_per_worker": summary["bytes_verified"] / 1e6 / m.wall_s / (n_workers or 1),
           "steady_cpu_s_per_gb": steady.per_gb(), "steady_cpu_ms_per_object": steady.ms_per_object(),
           "server_cpu_s": m.server_cpu_s,
           "coordinator_cpu_s": m.cpu_s if workers else None,  # cli:N: the command alone
           "workers_cpu_s": on_workers if workers else None,
           "steady_s": steady.seconds(), "steady_roles_cpu_s_per_gb": steady.roles_per_gb(),
           # Cores the rest of the machine kept busy meanwhile (others' tests; this script's sampling).
           "others_cores": max(0.0, busy - cpu - m.server_cpu_s) / m.wall_s, "load": os.getloadavg()[0]}
    log(f"  {mode:8} {row['wall_s']:7.1f} s  cpu {cpu:6.1f} s  {row['cpu_s_per_gb'] or 0:6.1f} s/GB  "
        f"steady {row['steady_cpu_s_per_gb'] or 0:6.1f} s/GB {row['steady_cpu_ms_per_object'] or 0:5.2f} ms/obj  "
        f"{row['cpu_ms_per_object']:6.2f} ms/obj  {row['mb_per_s']:6.1f} MB/s"
        + (f"  (coordinator {m.cpu_s:.1f} s, workers {on_workers:.1f} s)" if workers else "")
        + f"  others {row['others_cores']:.2f} cores, load {row['load']:.2f}")
    roles = row["steady_roles_cpu_s_per_gb"]
    if roles:
        log("           steady s/GB by role: " + ", ".join(f"{k} {v:.2f}" for k, v in roles.items() if v >= 0.005))
    return row


def _busy() -> float:
    """CPU seconds the whole machine has been busy (all cores)."""
    t = psutil.cpu_times()
    return sum(t) - t.idle - getattr(t, "iowait", 0.0)


IDLE_CODE = """
import sys, time
import dask, distributed
from cloudexit.cluster import executor
where, seconds = sys.argv[1], float(sys.argv[2])
if where.startswith("local:"):
    try:
        from cloudexit.cluster.address import parse
        from cloudexit.cluster.connect import open_client
        cluster, client = open_client(parse(where), executor.LOCAL_THREADS)
    except ImportError:  # the code before connect.py: as it started its LocalCluster
        with dask.config.set({"distributed.worker.profile.enabled": False, "distributed.worker.daemon": False}):
            cluster = distributed.LocalCluster(n_workers=int(where[6:]), threads_per_worker=executor.LOCAL_THREADS,
                                               processes=True, host="127.0.0.1", dashboard_address="127.0.0.1:0",
                                               silence_logs=40)
        client = distributed.Client(cluster, timeout=30)
else:
    client = distributed.Client(where, timeout=30)
client.wait_for_workers(1)
print("ready", flush=True)
time.sleep(seconds)
"""


def idle(mode: str, seconds: float, env: dict[str, str], work: Path) -> dict[str, float]:
    """CPU seconds per second by role of an idle cluster of `mode` (local:N or cli:N) with a
    client connected, as a run's coordinator is: the fixed cost of the dask daemons."""
    workers = CliWorkers(int(mode.split(":")[1]), daemon_env(env), work) if mode.startswith("cli:") else None
    client = subprocess.Popen([sys.executable, "-c", IDLE_CODE, workers.address if workers else mode,
                               str(seconds + 30)], env=env, stdout=subprocess.PIPE, text=True, cwd=NEUTRAL)
    try:
        assert client.stdout is not None and client.stdout.readline().strip() == "ready"
        time.sleep(3)  # joining and start-up settle
        schedulers, dask_workers = workers.pids if workers else ([], [])
        clock = RoleClock(True, schedulers, dask_workers)
        roots = [psutil.Process(client.pid), *(workers.roots() if workers else [])]
        first = clock.sample(roots)
        started = time.monotonic()
        time.sleep(seconds)
        last = clock.sample(roots)
        elapsed = time.monotonic() - started
    finally:
        client.kill()
        client.wait()
        if workers:
            workers.close()
    return {role: (last[role] - first[role]) / elapsed for role in ROLES}


def _total_bytes(db: Path) -> int:
    import sqlite3

    conn = sqlite3.connect(db)
    try:
        return int(conn.execute("SELECT coalesce(sum(size), 0) FROM objects WHERE status = 'present'").fetchone()[0])
    finally:
        conn.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workloads", default="ct2000,small20k", help="or none (with --idle)")
    parser.add_argument("--modes", default=",".join(MODES))
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--quick", action="store_true", help="200 CT slices and 2,000 tiny objects")
    parser.add_argument("--workdir", default=None, help="keep the S3 data here between runs")
    parser.add_argument("--json", dest="json_out", default=None, help="write the rows here")
    parser.add_argument("--trees", default=f"here={HERE}",
                        help="name=path,... code trees to compare, each mode run once per tree, alternating")
    parser.add_argument("--idle", type=float, default=0.0,
                        help="first measure idle local:2 and cli:2 clusters this many seconds (per tree)")
    parser.add_argument("--spy", default=None, help="record py-spy profiles into this folder (not for figures)")
    args = parser.parse_args()
    log = lambda text: print(text, file=sys.stderr, flush=True)  # noqa: E731
    trees = dict(item.split("=", 1) for item in args.trees.split(","))
    spy = Path(args.spy) if args.spy else None
    if spy:
        spy.mkdir(parents=True, exist_ok=True)
    server = bench_server(args.workdir)
    results: list[dict] = []
    idles: list[dict] = []
    workloads = [w for w in args.workloads.split(",") if w != "none"]
    try:
        work = Path(args.workdir or server.workdir) / "cluster-bench"
        work.mkdir(parents=True, exist_ok=True)
        envs = {name: _env(server, str(Path(path).resolve())) for name, path in trees.items()}
        if args.idle:
            for mode in ("local:2", "cli:2"):
                for name, env in envs.items():
                    rates = idle(mode, args.idle, env, work)
                    idles.append({"tree": name, "mode": mode, "cpu_s_per_s": rates, "load": os.getloadavg()[0]})
                    log(f"idle {mode} [{name}]: {sum(rates.values()):.3f} CPU s/s: " + ", ".join(
                        f"{k} {v:.3f}" for k, v in rates.items() if v >= 0.0005)
                        + f"  load {os.getloadavg()[0]:.2f}")
        for workload in workloads:
            bucket = prepare(server, workload, args.quick, log)
            log(f"{workload} ({bucket}):")
            (work / workload).mkdir(exist_ok=True)
            for _ in range(args.rounds):
                for mode in args.modes.split(","):
                    for name, env in envs.items():
                        log(f"  [{name}]")
                        row = run(server, bucket, mode, work / workload, env, log, spy, name)
                        results.append({"workload": workload, "tree": name, **row})
    finally:
        server.stop()
    print(_table(results, workloads, args.modes.split(","), list(trees)))
    if args.json_out:
        Path(args.json_out).write_text(json.dumps({"runs": results, "idle": idles}, indent=2))


def _table(results: list[dict], workloads: list[str], modes: list[str], trees: list[str]) -> str:
    """Medians by workload, mode and tree; then the steady CPU per GB by role."""
    table = ["| workload | tree | mode | objects | GB | wall s | CPU s | CPU s/GB | steady CPU s/GB | CPU ms/object | "
             "steady CPU ms/object | MB/s | MB/s per worker | others' cores |", "|---" * 14 + "|"]
    roles = ["| workload | tree | mode | " + " | ".join(ROLES) + " | worker side | fixed side |",
             "|---" * (len(ROLES) + 5) + "|"]
    for workload in workloads:
        for mode in modes:
            for tree in trees:
                rows = [r for r in results if r["workload"] == workload and r["mode"] == mode and r["tree"] == tree]
                if not rows:
                    continue
                med = {k: statistics.median(r[k] for r in rows) for k in
                       ("gb", "wall_s", "cpu_s", "cpu_ms_per_object", "mb_per_s", "mb_per_s_per_worker",
                        "others_cores")}
                all_per_gb = med["cpu_s"] / med["gb"] if med["gb"] else 0
                steady = [r["steady_cpu_s_per_gb"] for r in rows if r["steady_cpu_s_per_gb"]]
                steady_text = f"{statistics.median(steady):.1f}" if steady else "-"
                per_obj = [r["steady_cpu_ms_per_object"] for r in rows if r["steady_cpu_ms_per_object"]]
                per_obj_text = f"{statistics.median(per_obj):.2f}" if per_obj else "-"
                table.append(f"| {workload} | {tree} | {mode} | {rows[0]['objects']} | {med['gb']:.2f} | "
                             f"{med['wall_s']:.1f} | {med['cpu_s']:.1f} | {all_per_gb:.1f} | {steady_text} | "
                             f"{med['cpu_ms_per_object']:.2f} | {per_obj_text} | {med['mb_per_s']:.1f} | "
                             f"{med['mb_per_s_per_worker']:.1f} | {med['others_cores']:.2f} |")
                split = [r["steady_roles_cpu_s_per_gb"] for r in rows if r["steady_roles_cpu_s_per_gb"]]
                if split:
                    cells = [statistics.median(s[k] for s in split) for k in (*ROLES, "worker side", "fixed side")]
                    roles.append(f"| {workload} | {tree} | {mode} | " + " | ".join(f"{c:.2f}" for c in cells) + " |")
    return "\n".join(table) + "\n\nSteady CPU s per GB by role:\n\n" + "\n".join(roles)


if __name__ == "__main__":
    main()
