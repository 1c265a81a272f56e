"""The link and the CPU: `cloudexit migrate` beside s5cmd and rclone where hospitals feel it.

    sudo python benchmarks/link.py                          # 500 Mbit/s and 1 Gbit/s, 3 sets
    sudo python benchmarks/link.py --pin --workloads ct2000 big4 small20k   # CPU per GB / object
    sudo python benchmarks/link.py --quick                  # CI: one tiny set, one rate, one round

SeaweedFS runs in a network namespace behind a veth pair (benchmarks/netlink.py; root only).
Shaped (default): `tc ... tbf` at each `--rates` on the namespace side; each tool downloads the
whole bucket, alternating order each round; the report gives the median wall time, the ratio to
s5cmd, and the steady-state throughput as a share of the link rate, read from the veth's own
receive counter every 0.05 s (between 10% and 90% of the bytes: start-up and tail left out),
and where the wall time beyond the steady state goes: `head` (launch to 1% of the bytes) and
`tail` (99% of the bytes to exit).
Pinned (`--pin`): no shaping; the server runs on core 1 (`taskset -c 1`) and each tool on core 0,
so the client's CPU is its own; the report gives CPU seconds per GB (and per object) beside the
MD5 + SHA-256 floor that verification costs at least, measured with hashlib in the same run,
and what fsyncing each file adds to writing it (durability, which s5cmd does not pay).
Workloads are those of benchmarks/transfer.py, plus ct8000 (8,000 CT slices, 4.2 GB, for the
steady state) and tiny (200 CT slices of 32 KB: `--quick`).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import statistics
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import measure, versions
from netlink import ShapedLink, can_shape
from transfer import _fill_synthetic, command, inventory_db, prepare

from cloudexit.testing import synthetic
from cloudexit.testing.s3server import SeaweedServer

RATE_BYTES = {"mbit": 1e6 / 8, "gbit": 1e9 / 8}


def rate_bytes(rate: str) -> float:
    for unit, factor in RATE_BYTES.items():
        if rate.endswith(unit):
            return float(rate[: -len(unit)]) * factor
    raise SystemExit(f"rate {rate!r}: write it like 500mbit or 1gbit")


def prepare_more(server: SeaweedServer, workload: str) -> str:
    if workload == "ct8000":
        bucket = "bench-ct8000"
        _fill_synthetic(server, bucket, synthetic.Profile.ct_bench(8000), print)
        return bucket
    if workload == "tiny":
        bucket = "bench-tiny200"
        _fill_synthetic(server, bucket, synthetic.Profile.ct_bench(200, matrix=128), print)
        return bucket
    return prepare(server, workload, print)


class RxMeter:
    """The host end of the veth's received bytes, sampled every 0.2 s while a tool runs."""

    def __init__(self, device: str) -> None:
        self.path = Path(f"/sys/class/net/{device}/statistics/rx_bytes")
        self.points: list[tuple[float, int]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> "RxMeter":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stop.is_set():
            self.points.append((time.perf_counter(), int(self.path.read_text())))
            self._stop.wait(0.05)

    def steady(self) -> float:
        """Bytes/s between 10% and 90% of what arrived."""
        if len(self.points) < 3:
            return 0.0
        t0, b0 = self.points[0]
        pts = [(t - t0, b - b0) for t, b in self.points]
        total = pts[-1][1]

        def when(share: float) -> float:
            return next(t for t, b in pts if b >= share * total)

        start, end = when(0.10), when(0.90)
        return 0.8 * total / (end - start) if end > start else 0.0

    def head_tail(self, launched: float, ended: float) -> tuple[float, float]:
        """Seconds from launch to 1% of the bytes, and from 99% of them to the exit."""
        if len(self.points) < 3:
            return 0.0, 0.0
        b0 = self.points[0][1]
        total = self.points[-1][1] - b0
        first = next(t for t, b in self.points if b - b0 >= 0.01 * total)
        last = next(t for t, b in self.points if b - b0 >= 0.99 * total)
        return max(0.0, first - launched), max(0.0, ended - last)


def hash_floor(size: int = 256 * 2**20) -> float:
    """CPU seconds per GB for MD5 + SHA-256 in this process (the verification floor)."""
    data = os.urandom(size)
    started = time.process_time()
    hashlib.md5(data).digest()
    hashlib.sha256(data).digest()
    return (time.process_time() - started) / (size / 1e9)


def fsync_cost(folder: Path, file_size: int = 525_000, total: int = 256 * 2**20) -> float:
    """CPU seconds per GB that fsync adds to writing files of `file_size` (the CT slices') here:
    durability, which cloudexit pays and s5cmd does not; written with and without, alternately."""
    data = os.urandom(file_size)
    count = max(1, total // file_size)
    spent = {False: 0.0, True: 0.0}
    for sync in (False, True, False, True):
        sub = folder / f"fsync-{sync}"
        shutil.rmtree(sub, ignore_errors=True)
        sub.mkdir(parents=True)
        os.sync()
        before = os.times()
        for i in range(count):
            fd = os.open(sub / f"{i}.tmp", os.O_WRONLY | os.O_CREAT, 0o600)
            os.write(fd, data)
            if sync:
                os.fsync(fd)
            os.close(fd)
            os.rename(sub / f"{i}.tmp", sub / f"{i}.dcm")
        if sync:
            dfd = os.open(sub, os.O_RDONLY)
            os.fsync(dfd)
            os.close(dfd)
        after = os.times()
        spent[sync] += (after.user - before.user) + (after.system - before.system)
        shutil.rmtree(sub, ignore_errors=True)
    return max(0.0, spent[True] - spent[False]) / 2 / (count * file_size / 1e9)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rates", nargs="+", default=["500mbit", "1gbit"])
    parser.add_argument("--workloads", nargs="+", default=["ct2000", "big4", "ct8000"])
    parser.add_argument("--tools", nargs="+", default=["s5cmd", "rclone", "cloudexit"])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--pin", action="store_true", help="unshaped, server and client on their own cores")
    parser.add_argument("--quick", action="store_true", help="tiny set, 500mbit, one round (CI)")
    parser.add_argument("--workdir", default="/tmp/cloudexit-bench-shaped")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    why = can_shape()
    if why:
        raise SystemExit(f"link.py {why}: it runs the S3 server behind a shaped veth link")
    if args.quick:
        args.workloads, args.rates, args.rounds = ["tiny"], ["500mbit"], 1
    if args.pin and (os.cpu_count() or 1) < 2:
        raise SystemExit("--pin needs two cores")
    work = Path(args.workdir)
    (work / "s3").mkdir(parents=True, exist_ok=True)
    dest_root = Path(work / "dest")
    results: dict = {"versions": versions(), "started": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                     "command": "python benchmarks/link.py " + " ".join(sys.argv[1:]), "cells": []}
    client = ["taskset", "-c", "0"] if args.pin else []
    with ShapedLink("cxlink", subnet=8) as link:
        prefix = link.prefix + (["taskset", "-c", "1"] if args.pin else [])
        server = SeaweedServer(work / "s3", ip=link.server_ip, prefix=prefix).start(timeout=120)
        try:
            env = {**os.environ, **server.env(),
                   "RCLONE_S3_ACCESS_KEY_ID": server.env()["AWS_ACCESS_KEY_ID"],
                   "RCLONE_S3_SECRET_ACCESS_KEY": server.env()["AWS_SECRET_ACCESS_KEY"]}
            if args.pin:
                results["hash_floor_cpu_s_per_gb"] = hash_floor()
                results["fsync_cpu_s_per_gb"] = fsync_cost(work)
            for workload in args.workloads:
                link.shape(None)
                bucket = prepare_more(server, workload)
                db = inventory_db(server, bucket, work, env, print)
                rates = [None] if args.pin else args.rates
                for rate in rates:
                    link.shape(rate)
                    runs: dict[str, list[dict]] = {t: [] for t in args.tools}
                    for round_ in range(args.rounds):
                        order = args.tools[round_ % len(args.tools):] + args.tools[:round_ % len(args.tools)]
                        for name in order:
                            dest = dest_root / name
                            shutil.rmtree(dest, ignore_errors=True)
                            dest.mkdir(parents=True)
                            db_copy = work / f"run-{workload}.db"
                            for suffix in ("", "-wal", "-shm", ".lock", ".key"):
                                Path(str(db_copy) + suffix).unlink(missing_ok=True)
                            shutil.copy(db, db_copy)
                            if Path(str(db) + ".key").exists():
                                shutil.copy(str(db) + ".key", str(db_copy) + ".key")
                            os.sync()
                            with RxMeter(link.host_dev) as meter:
                                launched = time.perf_counter()
                                m = measure(client + command(name, bucket, dest, server, db_copy),
                                            env=env, count_lines=False)
                                ended = time.perf_counter()
                            head, tail = meter.head_tail(launched, ended)
                            size = sum(p.stat().st_size for p in dest.rglob("*") if p.is_file())
                            files = sum(1 for p in dest.rglob("*") if p.is_file())
                            row = {"wall_s": m.wall_s, "cpu_s": m.cpu_s, "rc": m.returncode,
                                   "bytes": size, "files": files, "steady_bps": meter.steady(),
                                   "head_s": head, "tail_s": tail,
                                   "peak_rss_mb": m.peak_tree_rss_mb}
                            runs[name].append(row)
                            print(f"{workload} {rate or 'pinned'} round {round_ + 1} {name:<9} "
                                  f"wall {m.wall_s:6.2f} s cpu {m.cpu_s:6.2f} s steady "
                                  f"{row['steady_bps'] / 1e6:7.1f} MB/s head {head:5.2f} s tail {tail:5.2f} s "
                                  f"rc {m.returncode} files {files}")
                            shutil.rmtree(dest, ignore_errors=True)
                    results["cells"].append(summarise(workload, rate, runs, results))
        finally:
            server.stop()
            shutil.rmtree(dest_root, ignore_errors=True)
    print(table(results))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    bad = [c for c in results["cells"] for t in c["tools"].values() if t["rc"] not in (0, 3)]
    if bad:
        raise SystemExit("a tool failed: see above")


def summarise(workload: str, rate: str | None, runs: dict[str, list[dict]], results: dict) -> dict:
    tools = {}
    for name, rows in runs.items():
        ok = [r for r in rows if r["rc"] in (0, 3)] or rows
        gb = max(r["bytes"] for r in ok) / 1e9
        tools[name] = {
            "wall_s": statistics.median(r["wall_s"] for r in ok),
            "cpu_s": statistics.median(r["cpu_s"] for r in ok),
            "cpu_s_per_gb": statistics.median(r["cpu_s"] for r in ok) / gb if gb else None,
            "cpu_ms_per_object": statistics.median(r["cpu_s"] for r in ok) * 1000 / max(ok[0]["files"], 1),
            "steady_bps": statistics.median(r["steady_bps"] for r in ok),
            "head_s": statistics.median(r.get("head_s", 0.0) for r in ok),
            "tail_s": statistics.median(r.get("tail_s", 0.0) for r in ok),
            "peak_rss_mb": max(r.get("peak_rss_mb", 0.0) for r in ok),
            "link_share": (statistics.median(r["steady_bps"] for r in ok) / rate_bytes(rate)) if rate else None,
            "rc": max(r["rc"] for r in ok), "files": ok[0]["files"],
        }
    base = tools.get("s5cmd")
    for t in tools.values():
        t["wall_vs_s5cmd"] = t["wall_s"] / base["wall_s"] if base else None
        t["cpu_vs_s5cmd"] = t["cpu_s"] / base["cpu_s"] if base and base["cpu_s"] else None
    floor = results.get("hash_floor_cpu_s_per_gb")
    if floor and base and base["cpu_s_per_gb"] is not None:
        results.setdefault("targets", {})[workload] = {
            "s5cmd_plus_floor_cpu_s_per_gb": base["cpu_s_per_gb"] + floor,
            "cloudexit_cpu_s_per_gb": tools.get("cloudexit", {}).get("cpu_s_per_gb")}
    return {"workload": workload, "rate": rate or "pinned", "tools": tools}


def table(results: dict) -> str:
    lines = ["| set | link | tool | wall | vs s5cmd | head | tail | CPU | CPU/GB | ms CPU/object | steady | of link | peak RSS |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for c in results["cells"]:
        for name, t in c["tools"].items():
            share = f"{t['link_share']:.0%}" if t["link_share"] else "-"
            ratio = f"{t['wall_vs_s5cmd']:.2f}x" if t["wall_vs_s5cmd"] else "-"
            lines.append(f"| {c['workload']} | {c['rate']} | {name} | {t['wall_s']:.2f} s | "
                         f"{ratio} | {t['head_s']:.2f} s | {t['tail_s']:.2f} s | {t['cpu_s']:.2f} s | {t['cpu_s_per_gb'] or 0:.2f} s | "
                         f"{t['cpu_ms_per_object']:.2f} | {t['steady_bps'] / 1e6:.1f} MB/s | {share} | "
                         f"{t['peak_rss_mb']:.0f} MB |")
    if "hash_floor_cpu_s_per_gb" in results:
        lines.append(f"\nMD5 + SHA-256 floor: {results['hash_floor_cpu_s_per_gb']:.2f} CPU-s per GB; "
                     f"fsync of each 525 KB file adds {results.get('fsync_cpu_s_per_gb', 0.0):.2f} CPU-s per GB")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
