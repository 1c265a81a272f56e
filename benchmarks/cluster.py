"""Cluster benchmark: `migrate` with the local executor beside `--cluster local:1`, `local:2` and
2 dask CLI workers, on one local SeaweedFS (loopback); CPU per GB and per object side by side.

    python benchmarks/cluster.py                       # ct2000 and small20k, 1 round
    python benchmarks/cluster.py --workloads ct2000 --rounds 3
    python benchmarks/cluster.py --quick               # 200 CT slices, 2,000 tiny objects

Workloads (as benchmarks/transfer.py): ct2000, 2,000 synthetic CT slices of ~0.5 MB
(`synthetic.Profile.ct_bench(2000)`); small20k, 20,000 tiny DICOM objects (`common.populate`).
Each run migrates a fresh copy of one finished inventory DB into a fresh folder, all checks on.
CPU: user+sys of the command and its children (wait4: the LocalCluster's processes included),
plus, for the CLI workers (not children of the command), the CPU their processes used meanwhile
(psutil), plus the dask scheduler's. The S3 server's CPU is reported apart.
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


def _env(server) -> dict[str, str]:
    env = {**os.environ, **server.env(), "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
    env.pop("AWS_PROFILE", None)
    env["DASK_DISTRIBUTED__WORKER__PROFILE__ENABLED"] = "False"  # as docs/scale-out.md advises
    return env


class CliWorkers:
    """A `dask scheduler` and N `dask worker` processes (no nanny) on loopback."""

    def __init__(self, n: int, env: dict[str, str], log_dir: Path) -> None:
        port = free_port()
        self.address = f"tcp://127.0.0.1:{port}"
        dask = tool("dask")
        out = open(log_dir / "dask.log", "ab")  # noqa: SIM115 - the log stays open while the scheduler runs
        self.procs = [subprocess.Popen([dask, "scheduler", "--host", "127.0.0.1", "--port", str(port),
                                        "--dashboard-address", f"127.0.0.1:{free_port()}", "--no-show"],
                                       stdout=out, stderr=out, env=env, start_new_session=True)]
        time.sleep(1)
        self.procs += [subprocess.Popen([dask, "worker", self.address, "--name", f"bench{i}", "--nthreads", "2",
                                         "--no-nanny", "--no-dashboard", "--host", "127.0.0.1"],
                                        stdout=out, stderr=out, env=env, start_new_session=True)
                       for i in range(n)]
        from distributed import Client

        with Client(self.address, timeout=60) as client:
            client.wait_for_workers(n, timeout=60)

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
    Samples the command's process tree, the CLI workers and the scheduler every 0.25 s."""

    def __init__(self, db: Path, total: int, extra: Any) -> None:
        self.db, self.total, self.extra = db, total, extra
        self.samples: list[tuple[int, int, float]] = []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        root = None
        while not self.stop.wait(0.25):
            if root is None:
                root = next((p for p in psutil.Process().children() if "migrate" in " ".join(p.cmdline())), None)
                continue
            cpu = _tree_cpu(root) + (self.extra.cpu() if self.extra else 0.0)
            self.samples.append((*_verified(self.db), cpu))

    def _inside(self) -> list[tuple[int, int, float]]:
        inside = [s for s in self.samples if 0.1 * self.total <= s[0] <= 0.9 * self.total]
        return inside if len(inside) >= 2 and inside[-1][0] > inside[0][0] else []

    def per_gb(self) -> float | None:
        inside = self._inside()
        return (inside[-1][2] - inside[0][2]) / ((inside[-1][0] - inside[0][0]) / 1e9) if inside else None

    def ms_per_object(self) -> float | None:
        inside = self._inside()
        return 1000 * (inside[-1][2] - inside[0][2]) / (inside[-1][1] - inside[0][1]) if inside else None


def run(server, bucket: str, mode: str, work: Path, env: dict[str, str], log) -> dict:
    db = work / f"{bucket}.db"
    if not db.exists():
        subprocess.run([sys.executable, "-m", "cloudexit.cli", "inventory", f"s3://{bucket}", "--db", str(db),
                        "-q"], env=env, check=True)
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
        workers = CliWorkers(int(mode.split(":")[1]), env, work)
        cmd += ["--cluster", workers.address]
    try:
        before = (workers.cpu(), workers.cpu(scheduler=False)) if workers else (0.0, 0.0)
        steady = Steady(copy, _total_bytes(copy), workers)
        steady.thread.start()
        m = measure(cmd, env=env, stdout=str(work / "out.json"), server_pid=server.proc.pid, count_lines=False)
        steady.stop.set()
        extra = (workers.cpu() - before[0]) if workers else 0.0
        on_workers = (workers.cpu(scheduler=False) - before[1]) if workers else 0.0
    finally:
        if workers:
            workers.close()
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
           "workers_cpu_s": on_workers if workers else None}
    log(f"  {mode:8} {row['wall_s']:7.1f} s  cpu {cpu:6.1f} s  {row['cpu_s_per_gb'] or 0:6.1f} s/GB  "
        f"steady {row['steady_cpu_s_per_gb'] or 0:6.1f} s/GB {row['steady_cpu_ms_per_object'] or 0:5.2f} ms/obj  "
        f"{row['cpu_ms_per_object']:6.2f} ms/obj  {row['mb_per_s']:6.1f} MB/s"
        + (f"  (coordinator {m.cpu_s:.1f} s, workers {on_workers:.1f} s)" if workers else ""))
    return row


def _total_bytes(db: Path) -> int:
    import sqlite3

    conn = sqlite3.connect(db)
    try:
        return int(conn.execute("SELECT coalesce(sum(size), 0) FROM objects WHERE status = 'present'").fetchone()[0])
    finally:
        conn.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workloads", default="ct2000,small20k")
    parser.add_argument("--modes", default=",".join(MODES))
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--quick", action="store_true", help="200 CT slices and 2,000 tiny objects")
    parser.add_argument("--workdir", default=None, help="keep the S3 data here between runs")
    parser.add_argument("--json", dest="json_out", default=None, help="write the rows here")
    args = parser.parse_args()
    log = lambda text: print(text, file=sys.stderr, flush=True)  # noqa: E731
    server = bench_server(args.workdir)
    results = []
    try:
        work = Path(args.workdir or server.workdir) / "cluster-bench"
        work.mkdir(parents=True, exist_ok=True)
        env = _env(server)
        for workload in args.workloads.split(","):
            bucket = prepare(server, workload, args.quick, log)
            log(f"{workload} ({bucket}):")
            (work / workload).mkdir(exist_ok=True)
            for _ in range(args.rounds):
                for mode in args.modes.split(","):
                    results.append({"workload": workload, **run(server, bucket, mode, work / workload, env, log)})
    finally:
        server.stop()
    table = ["| workload | mode | objects | GB | wall s | CPU s | CPU s/GB | steady CPU s/GB | CPU ms/object | "
             "steady CPU ms/object | MB/s | MB/s per worker |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for workload in args.workloads.split(","):
        for mode in args.modes.split(","):
            rows = [r for r in results if r["workload"] == workload and r["mode"] == mode]
            if not rows:
                continue
            med = {k: statistics.median(r[k] for r in rows) for k in
                   ("gb", "wall_s", "cpu_s", "cpu_ms_per_object", "mb_per_s", "mb_per_s_per_worker")}
            per_gb = med["cpu_s"] / med["gb"] if med["gb"] else 0
            steady = [r["steady_cpu_s_per_gb"] for r in rows if r["steady_cpu_s_per_gb"]]
            steady_text = f"{statistics.median(steady):.1f}" if steady else "-"
            per_obj = [r["steady_cpu_ms_per_object"] for r in rows if r["steady_cpu_ms_per_object"]]
            per_obj_text = f"{statistics.median(per_obj):.2f}" if per_obj else "-"
            table.append(f"| {workload} | {mode} | {rows[0]['objects']} | {med['gb']:.2f} | {med['wall_s']:.1f} | "
                         f"{med['cpu_s']:.1f} | {per_gb:.1f} | {steady_text} | {med['cpu_ms_per_object']:.2f} | {per_obj_text} | "
                         f"{med['mb_per_s']:.1f} | {med['mb_per_s_per_worker']:.1f} |")
    print("\n".join(table))
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
