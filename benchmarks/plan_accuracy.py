"""Plan accuracy: does `cloudexit plan` predict how long a real migration takes?

    python benchmarks/plan_accuracy.py                  # 1 GB at a 20 MiB/s cap
    python benchmarks/plan_accuracy.py --rate 10M --workload ct2000

The link is shaped with migrate's own bandwidth limit: the same timetable is given to the plan
(`--schedule`) and to the migration (`--bwlimit`). Steps, on a local SeaweedFS holding ~1 GB of
synthetic CT (`synthetic.Profile.ct_bench(2000)`, reused between runs):
  1. `cloudexit inventory`
  2. `cloudexit plan --measure --schedule "00:00,RATE"` (the sample measures latency and the raw
     link; the timetable caps it), keep the `within_schedule` scenario's time range
  3. `cloudexit migrate --to DIR --bwlimit "00:00,RATE"`, timed
  4. report estimated (low / expected / high) vs actual, and whether actual is in the range and
     within 15% of expected (the target of issue 3).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import bench_server, measure, tool  # noqa: E402
from transfer import prepare  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rate", default="20M", help="cap in rclone syntax (bare M = MiB/s)")
    parser.add_argument("--workload", default="ct2000", choices=["ct2000", "big4"])
    parser.add_argument("--workdir", default="/tmp/cloudexit-bench-transfer",
                        help="keeps the S3 server's data between runs")
    parser.add_argument("--measure-bytes", default="64MB")
    parser.add_argument("--json", default=None, help="write the result here")
    args = parser.parse_args()

    work = Path(args.workdir)
    server = bench_server(work / "s3")
    scratch = Path(tempfile.mkdtemp(prefix="cloudexit-plan-accuracy-"))
    try:
        bucket = prepare(server, args.workload, print)
        env = {**__import__("os").environ, **server.env()}
        db = scratch / "state.db"
        cx = tool("cloudexit")
        inv = measure([cx, "inventory", f"s3://{bucket}", "--db", str(db), "-q"], env=env)
        print(f"inventory: {inv.wall_s:.1f} s")
        schedule = f"00:00,{args.rate}"
        out = scratch / "plan.json"
        planned = measure([cx, "plan", "--db", str(db), "--provider", "aws-s3", "--measure",
                           "--measure-bytes", args.measure_bytes, "--schedule", schedule,
                           "--json"], env=env, stdout=str(out), count_lines=False)
        if planned.returncode != 0:
            raise SystemExit(f"plan failed (exit {planned.returncode})")
        plan = json.loads(out.read_text())
        scenario = next(s for s in plan["scenarios"] if s["key"] == "within_schedule")
        estimate = scenario["time_s"]
        dest = scratch / "archive"
        run = measure([cx, "migrate", "--db", str(db), "--to", str(dest), "--bwlimit", schedule,
                       "-q"], env=env)
        if run.returncode not in (0, 3):
            raise SystemExit(f"migrate failed (exit {run.returncode})")
        actual = run.wall_s
        error = (actual - estimate["expected"]) / estimate["expected"]
        result = {
            "date": time.strftime("%Y-%m-%d"), "workload": args.workload, "rate": args.rate,
            "bytes": plan["workload"]["bytes"], "objects": plan["workload"]["objects"],
            "link": plan["link"], "estimate_s": estimate, "actual_s": actual,
            "error_vs_expected": error,
            "inside_range": estimate["low"] <= actual <= estimate["high"],
            "within_15_percent": abs(error) <= 0.15,
        }
        print(json.dumps(result, indent=2))
        if args.json:
            Path(args.json).write_text(json.dumps(result, indent=2))
    finally:
        server.stop()
        shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    main()
