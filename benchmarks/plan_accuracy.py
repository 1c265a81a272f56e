"""Plan accuracy on a shaped link: does `cloudexit plan` predict how long `migrate` takes?

    sudo python benchmarks/plan_accuracy.py                       # 50, 100, 500 Mbit/s x 3 sets
    sudo python benchmarks/plan_accuracy.py --rates 100mbit --workloads ct2000 --json out.json

SeaweedFS runs in a network namespace behind a veth pair whose namespace end carries
`tc ... tbf rate RATE burst 1mb latency 50ms` (benchmarks/netlink.py; root only). The client
(this machine's side of the veth) runs, for each workload and rate:
  1. `cloudexit plan --bandwidth RATE --latency RTT` (RTT: the veth's own, measured here)
  2. `cloudexit plan --measure` (migrate's engine on a sample of the bucket, on this link)
  3. `cloudexit migrate`, timed as a whole command (start-up and tail included)
and reports, per plan, the `fastest` scenario's expected time and range against the migration:
the target is within 15% of the expected time and inside the range, for both plans.
Workloads (made once, kept in --workdir): ct2000 (2,000 CT slices, 1.05 GB), big4 (4 x 256 MB,
ranged reads) and small20k (20,000 objects of ~0.5 KB, request-bound). The inventory is made once
per workload on the unshaped link; each migration starts from a copy of that state DB.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import measure, tool
from netlink import ShapedLink, can_shape
from transfer import prepare

from cloudexit.testing.s3server import SeaweedServer

TC_TO_PLAN = {"mbit": "Mbit/s", "gbit": "Gbit/s"}


def plan_rate(tc_rate: str) -> str:
    for unit, text in TC_TO_PLAN.items():
        if tc_rate.endswith(unit):
            return tc_rate[: -len(unit)] + text
    raise SystemExit(f"rate {tc_rate!r}: write it like 100mbit or 1gbit")


def rtt_ms(host: str, port: int, n: int = 20) -> float:
    """Median TCP connect time to the server: the link's round trip as a client sees it."""
    times = []
    for _ in range(n):
        t = time.perf_counter()
        with socket.create_connection((host, port), timeout=5):
            times.append(time.perf_counter() - t)
    return sorted(times)[n // 2] * 1000


def plan_json(args: list[str], env: dict[str, str]) -> dict:
    out = subprocess.run([tool("cloudexit"), "plan", "--provider", "aws-s3", "--json", *args],
                         env=env, capture_output=True, text=True)
    if out.returncode:
        raise SystemExit(f"plan failed: {out.stderr}")
    return json.loads(out.stdout)


def fastest(plan: dict) -> dict:
    return next(s for s in plan["scenarios"] if s["key"] == "fastest")["time_s"]


def cell(estimate: dict, actual: float) -> dict:
    error = (estimate["expected"] - actual) / actual
    return {"low": estimate["low"], "expected": estimate["expected"], "high": estimate["high"],
            "error": error, "within_15": abs(error) <= 0.15,
            "in_range": estimate["low"] <= actual <= estimate["high"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rates", nargs="+", default=["50mbit", "100mbit", "500mbit"])
    parser.add_argument("--workloads", nargs="+", default=["ct2000", "big4", "small20k"])
    parser.add_argument("--workdir", default="/tmp/cloudexit-bench-link",
                        help="keeps the S3 server's data between runs")
    parser.add_argument("--measure-seconds", default="20")
    parser.add_argument("--json", default=None, help="write the results here")
    args = parser.parse_args()
    why = can_shape()
    if why:
        raise SystemExit(f"plan_accuracy.py {why}: it shapes a veth link with tc tbf")

    work = Path(args.workdir)
    (work / "s3").mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix="cloudexit-plan-accuracy-"))
    results: dict = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                     "commit": subprocess.run(["git", "rev-parse", "--short", "HEAD"],
                                              capture_output=True, text=True).stdout.strip(),
                     "cells": []}
    with ShapedLink() as link:
        server = SeaweedServer(work / "s3", ip=link.server_ip, prefix=link.prefix).start(timeout=120)
        try:
            env = {**os.environ, **server.env()}
            results["rtt_ms"] = rtt = rtt_ms(server.ip, server.port)
            print(f"link round trip {rtt:.2f} ms")
            for workload in args.workloads:
                link.shape(None)
                bucket = prepare(server, workload, print)
                base = work / f"{workload}.db"
                if not base.exists():
                    inv = measure([tool("cloudexit"), "inventory", f"s3://{bucket}", "--db", str(base),
                                   "-q"], env=env)
                    if inv.returncode not in (0, 3):
                        raise SystemExit("inventory failed")
                for rate in args.rates:
                    link.shape(rate)
                    db = scratch / f"{workload}-{rate}.db"
                    shutil.copy(base, db)
                    nominal = plan_json(["--db", str(db), "--bandwidth", plan_rate(rate),
                                         "--latency", f"{max(rtt, 0.01):.3f}ms"], env)
                    measured = plan_json(["--db", str(db), "--measure",
                                          "--measure-seconds", args.measure_seconds], env)
                    dest = scratch / "archive"
                    os.sync()
                    run = measure([tool("cloudexit"), "migrate", "--db", str(db), "--to", str(dest),
                                   "-q"], env=env)
                    shutil.rmtree(dest, ignore_errors=True)
                    if run.returncode not in (0, 3):
                        raise SystemExit(f"migrate failed (exit {run.returncode})")
                    row = {"workload": workload, "rate": rate, "actual_s": run.wall_s,
                           "cpu_s": run.cpu_s, "bytes": measured["workload"]["bytes"],
                           "objects": measured["workload"]["objects"],
                           "measured_link": measured["link"]["throughput_bytes_per_s"],
                           "bandwidth": cell(fastest(nominal), run.wall_s),
                           "measure": cell(fastest(measured), run.wall_s)}
                    results["cells"].append(row)
                    print(json.dumps(row))
        finally:
            server.stop()
            shutil.rmtree(scratch, ignore_errors=True)
    print(table(results))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


def table(results: dict) -> str:
    lines = ["| set | link | migrate | `--bandwidth` expected (range) | error | in range | "
             "`--measure` expected (range) | error | in range |", "|---|---|---|---|---|---|---|---|---|"]
    for c in results["cells"]:
        parts = [c["workload"], c["rate"], f"{c['actual_s']:.1f} s"]
        for key in ("bandwidth", "measure"):
            e = c[key]
            parts += [f"{e['expected']:.1f} s ({e['low']:.1f}-{e['high']:.1f})", f"{e['error']:+.1%}",
                      "yes" if e["in_range"] else "no"]
        lines.append("| " + " | ".join(parts) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
