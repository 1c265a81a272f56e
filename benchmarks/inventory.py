"""Inventory benchmark: `cloudexit inventory` against the listing tools, on the same bucket.

    python benchmarks/inventory.py --keys 50000 --layout uid --repeat 3
    python benchmarks/inventory.py --keys 50000 --keys 500000 --layout uid --repeat 1 \\
        --workdir /tmp/cxbench/s3 --out benchmarks/results/inventory-uid-500k.json

Starts SeaweedFS (`cloudexit.s3server.SeaweedServer`), fills one bucket per (layout, key count)
with tiny valid DICOM objects (see common.py; `--workdir` keeps the buckets for the next run),
then runs, alternating, with the order rotated every repeat:

  cloudexit-list     `cloudexit inventory --key-pattern '{study}/{series}/{sop}.dcm'` (uid layout):
                     UIDs from the keys, so it measures listing + the state DB (plus the 20
                     header reads that check the pattern on a sample)
  cloudexit-headers  `cloudexit inventory` in plain mode: a ranged GET and a header parse per
                     object, so it runs on a smaller bucket of --header-keys keys (same layout),
                     with s5cmd beside it for the ratio. For the flat (Orthanc `uuid.dcm`)
                     layout it is the only mode cloudexit has (the keys hold no UIDs), so the
                     flat main bucket has no cloudexit row
  s5cmd              `s5cmd ls 's3://BUCKET/*'`
  s5cmd-cp           `s5cmd cp 's3://BUCKET/*' DIR/` on the header-read buckets only: one GET per
                     object, the anchor of cloudexit-headers (ratios in the last two columns)
  rclone             `rclone lsf -R --files-only bench:BUCKET` (directory walk, 8 checkers)
  rclone-fast-list   the same with `--fast-list` (one recursive listing)
  aws                `aws s3 ls --recursive s3://BUCKET/`

Each run starts from nothing (cloudexit: a new state DB). Reported per tool: median and best
wall, keys/s (keys / median wall), median CPU (user+sys), the server's CPU and the rest of the
machine's CPU meanwhile, peak RSS (GNU time), and the ratios of wall and CPU to s5cmd's on the
same bucket. Every run is checked: the listing tools must print one line per key, cloudexit must
record every key; a cloudexit run that exits 0 but misses keys is reported as INCOMPLETE. Each
cloudexit run records the fingerprint of the inventory modules it ran (`code_version`).

    --pin               the S3 server on core 1, every tool on core 0 (taskset): CPU figures
                        without the server's CPU taken from the client
    --startup N         start-up of inventory and migrate on a one-object bucket, N times:
                        wall, CPU, and launch to the first request / object GET (a relay)
    --compare-tree DIR  another checkout (`git worktree add /tmp/base main`), alternating with
                        this one: before/after in one run. With --startup, inventory and migrate
                        from it too; and cloudexit-list from it (`cloudexit-list-base`)
    --header-layout L   layouts of the header-read buckets (flat: Orthanc-style uuid keys)
    --keys 0            no listing bucket (header reads and start-up only)
    --py-spy            also profile one cloudexit run per bucket (py-spy --gil; top frames)
    --report FILE...    print the tables of saved results again (merged)
    --populate-only     fill the buckets and stop (500k keys: ~20 min on a busy 2-core machine)
"""

from __future__ import annotations

import argparse
import collections
import datetime as dt
import json
import os
import re
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (KEY_PATTERN, LAYOUTS, REPO, FirstRequest, Measurement, bench_server,
                    ensure_bucket, measure, tool, versions)

TOOLS = ("cloudexit-list", "cloudexit-headers", "s5cmd", "s5cmd-cp", "rclone", "rclone-fast-list",
         "aws", "cloudexit-list-base")
LABELS = {
    "cloudexit-list": "cloudexit inventory --key-pattern (listing)",
    "cloudexit-headers": "cloudexit inventory (reads every header)",
    "s5cmd": "s5cmd ls",
    "s5cmd-cp": "s5cmd cp (GETs every object)",
    "rclone": "rclone lsf -R",
    "rclone-fast-list": "rclone lsf -R --fast-list",
    "aws": "aws s3 ls --recursive",
    "cloudexit-list-base": "cloudexit inventory --key-pattern (listing), --compare-tree code",
}


def label(name: str) -> str:
    """A tool's label; `cloudexit-headers-wN` is cloudexit-headers with `--workers N`."""
    if name.startswith("cloudexit-headers-w"):
        return f"{LABELS['cloudexit-headers']} --workers {name.rsplit('-w', 1)[1]}"
    return LABELS[name]


class Target:
    """One bucket and everything needed to run the tools against it."""

    def __init__(self, server: Any, bucket: str, keys: int, layout: str, scratch: Path,
                 cloudexit_args: list[str], client: list[str] | None = None,
                 base_tree: Path | None = None) -> None:
        self.server, self.bucket, self.keys, self.layout = server, bucket, keys, layout
        self.scratch = scratch
        self.client = client or []  # e.g. `taskset -c 0` (--pin)
        self.cloudexit_args = cloudexit_args
        self.base_tree = base_tree  # --compare-tree: the checkout `cloudexit-list-base` runs
        self.env = {**os.environ, **server.env()}
        self.env.pop("AWS_PROFILE", None)
        self.env.update({
            "RCLONE_CONFIG_BENCH_TYPE": "s3",
            "RCLONE_CONFIG_BENCH_PROVIDER": "Other",
            "RCLONE_CONFIG_BENCH_ENDPOINT": server.endpoint_url,
            "RCLONE_CONFIG_BENCH_ACCESS_KEY_ID": server.env()["AWS_ACCESS_KEY_ID"],
            "RCLONE_CONFIG_BENCH_SECRET_ACCESS_KEY": server.env()["AWS_SECRET_ACCESS_KEY"],
            "RCLONE_CONFIG_BENCH_REGION": server.env()["AWS_REGION"],
        })

    def command(self, name: str, db: Path) -> list[str]:
        url = self.server.endpoint_url
        if name.startswith("cloudexit"):
            cmd = [tool("cloudexit"), "inventory", f"s3://{self.bucket}", "--endpoint-url", url,
                   "--db", str(db), "--json", *self.cloudexit_args]
            if name in ("cloudexit-list", "cloudexit-list-base"):
                cmd += ["--key-pattern", KEY_PATTERN[self.layout]]
            if name.startswith("cloudexit-headers-w"):
                cmd += ["--workers", name.rsplit("-w", 1)[1]]
            return cmd
        if name == "s5cmd":
            return [tool("s5cmd"), "--endpoint-url", url, "ls", f"s3://{self.bucket}/*"]
        if name == "s5cmd-cp":
            return [tool("s5cmd"), "--endpoint-url", url, "cp", f"s3://{self.bucket}/*",
                    str(db.parent / "copy") + "/"]
        if name == "rclone":
            return [tool("rclone"), "lsf", "-R", "--files-only", f"bench:{self.bucket}"]
        if name == "rclone-fast-list":
            return [tool("rclone"), "lsf", "-R", "--files-only", "--fast-list", f"bench:{self.bucket}"]
        if name == "aws":
            return [tool("aws"), "s3", "ls", "--recursive", f"s3://{self.bucket}/", "--endpoint-url", url]
        raise ValueError(name)

    def run(self, name: str) -> dict[str, Any]:
        work = Path(tempfile.mkdtemp(prefix=f"{name}-", dir=self.scratch))
        db, out = work / "state.db", work / "stdout"
        try:
            # The tree's code, not the venv's installed copy, and a record of it: the package
            # may be edited between runs.
            tree = self.base_tree if name == "cloudexit-list-base" else REPO
            assert tree is not None, "cloudexit-list-base needs --compare-tree"
            code = code_version(tree)
            env = {**self.env, "PYTHONPATH": str(tree)} if name.startswith("cloudexit") else self.env
            load = os.getloadavg()[0]
            busy0 = _busy()
            m = measure(self.client + self.command(name, db), env=env, stdout=str(out),
                        server_pid=self.server.proc.pid, count_lines=not name.startswith("cloudexit"),
                        tree_sample_s=0.25)
            busy = _busy() - busy0
            row: dict[str, Any] = {"tool": name, "bucket": self.bucket, "keys": self.keys,
                                   "layout": self.layout, "code": code if name.startswith("cloudexit") else None,
                                   **m.as_dict(), "loadavg_1m": load,
                                   "other_cpu_s": max(0.0, busy - m.cpu_s - m.server_cpu_s)}
            row["ok"], row["check"] = self._check(name, m, out)
            return row
        finally:
            shutil.rmtree(work, ignore_errors=True)

    def _check(self, name: str, m: Measurement, out: Path) -> tuple[bool, str]:
        if m.returncode != 0:
            return False, f"exit code {m.returncode}"
        if name == "s5cmd-cp":
            copied = sum(1 for p in (out.parent / "copy").rglob("*") if p.is_file())
            return copied == self.keys, f"{copied} files for {self.keys} keys"
        if not name.startswith("cloudexit"):
            ok = m.stdout_lines == self.keys
            return ok, f"{m.stdout_lines} lines for {self.keys} keys"
        try:
            result = json.loads(out.read_text())
        except ValueError as exc:
            return False, f"no JSON on stdout: {exc}"
        inv = result["inventory"]
        ok = (inv["objects"] == self.keys and inv["dicom_objects"] == self.keys
              and inv["pending"] == 0 and result["round"]["new"] == self.keys)
        return ok, (f"objects={inv['objects']} dicom={inv['dicom_objects']} pending={inv['pending']} "
                    f"new={result['round']['new']} list_requests={inv['inventory']['list_requests']} "
                    f"get_requests={inv['inventory']['get_requests']}")


INVENTORY_SOURCES = ("inventory.py", "s3/lean.py", "s3/listing.py", "s3/headers.py", "s3/source.py",
                     "state/db.py", "dicom/header.py", "dicom/scan.py", "core/paths.py",
                     "core/config.py", "transfer/worker.py", "cli/__init__.py", "state/listed.py")


def code_version(root: Path = REPO) -> str:
    """`HEAD` plus a hash of the modules `cloudexit inventory` runs, as they are on disk now
    (`+dirty` when they differ from HEAD): the package is edited while benchmarks run, so every
    run records which code it measured."""
    import hashlib
    import subprocess

    paths = [root / "cloudexit" / name for name in INVENTORY_SOURCES]

    def git(*args: str) -> str:
        out = subprocess.run(["git", *args], cwd=root, capture_output=True, text=True)
        return out.stdout.strip()

    head = git("rev-parse", "--short", "HEAD") or "?"
    digest = hashlib.sha1()
    for path in paths:
        digest.update(str(path.relative_to(root)).encode() + b"\0"
                      + (path.read_bytes() if path.exists() else b""))
    dirty = "+dirty" if git("status", "--porcelain", "--", *map(str, paths)) else ""
    return f"{head}{dirty}:{digest.hexdigest()[:8]}"


def _busy() -> float:
    t = psutil.cpu_times()
    return t.user + t.nice + t.system + getattr(t, "irq", 0) + getattr(t, "softirq", 0)


def summarize(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    groups: dict[tuple, list[dict[str, Any]]] = collections.OrderedDict()
    for r in runs:
        groups.setdefault((r["layout"], r["keys"], r["bucket"], r["tool"]), []).append(r)
    rows = []
    for (layout, keys, bucket, name), rs in groups.items():
        code = ", ".join(sorted({r["code"] for r in rs if r.get("code")})) or None
        # Runs that exited 0 but failed the completeness check still have honest timings:
        # they are reported, flagged `complete: False`, with what they did record.
        good = [r for r in rs if r["ok"]] or [r for r in rs if r["returncode"] == 0]
        if not good:
            rows.append({"layout": layout, "keys": keys, "bucket": bucket, "tool": name,
                         "code": code, "label": label(name), "runs": len(rs), "ok_runs": 0,
                         "complete": False,
                         "check": rs[-1]["check"]})
            continue
        wall = statistics.median(r["wall_s"] for r in good)
        rows.append({
            "layout": layout, "keys": keys, "bucket": bucket, "tool": name, "code": code,
            "label": label(name), "runs": len(rs), "ok_runs": sum(1 for r in rs if r["ok"]),
            "complete": all(r["ok"] for r in good), "check": good[-1]["check"],
            "median_wall_s": wall, "min_wall_s": min(r["wall_s"] for r in good),
            "max_wall_s": max(r["wall_s"] for r in good),
            "keys_per_s": keys / wall,
            "median_cpu_s": statistics.median(r["cpu_s"] for r in good),
            "median_server_cpu_s": statistics.median(r["server_cpu_s"] for r in good),
            "peak_rss_mb": max(r["peak_rss_mb"] for r in good),
            "peak_tree_rss_mb": max(r["peak_tree_rss_mb"] for r in good),
            "median_other_cpu_s": statistics.median(r["other_cpu_s"] for r in good),
        })
    for row in rows:
        ref = next((r for r in rows if r["bucket"] == row["bucket"] and r["tool"] == "s5cmd"
                    and r.get("median_wall_s")), None)
        if ref and row.get("median_wall_s"):
            row["wall_vs_s5cmd"] = row["median_wall_s"] / ref["median_wall_s"]
            row["cpu_vs_s5cmd"] = row["median_cpu_s"] / ref["median_cpu_s"]
        cp = next((r for r in rows if r["bucket"] == row["bucket"] and r["tool"] == "s5cmd-cp"
                   and r.get("median_wall_s")), None)
        if cp and row.get("median_wall_s"):  # header reads: both make one GET per object
            row["wall_vs_s5cmd_cp"] = row["median_wall_s"] / cp["median_wall_s"]
            row["cpu_vs_s5cmd_cp"] = row["median_cpu_s"] / cp["median_cpu_s"]
    return rows


def markdown(rows: list[dict[str, Any]]) -> str:
    head = ("| layout | keys | tool | runs | median wall (s) | best wall (s) | keys/s (median) | "
            "CPU user+sys (s) | server CPU (s) | others' CPU (s) | peak RSS (MB) | "
            "wall vs s5cmd | CPU vs s5cmd | wall vs s5cmd cp | CPU vs s5cmd cp |\n"
            "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    lines = [head]
    for r in rows:
        label = r["label"] + (f" [code {r['code']}]" if r.get("code") else "")
        if not r.get("complete", True):
            label += f" **INCOMPLETE** ({r['check']})"
        if not r.get("median_wall_s"):
            lines.append(f"| {r['layout']} | {r['keys']:,} | {label} | 0/{r['runs']} | "
                         "failed | | | | | | | | | | |")
            continue
        ratio = f"{r['wall_vs_s5cmd']:.2f}x" if "wall_vs_s5cmd" in r else ""
        cpu_ratio = f"{r['cpu_vs_s5cmd']:.2f}x" if "cpu_vs_s5cmd" in r else ""
        cp_ratio = (f"{r['wall_vs_s5cmd_cp']:.2f}x | {r['cpu_vs_s5cmd_cp']:.2f}x"
                    if "wall_vs_s5cmd_cp" in r else " | ")
        runs = f"{r['ok_runs']}" if r.get("complete", True) else f"0/{r['runs']}"
        lines.append(
            f"| {r['layout']} | {r['keys']:,} | {label} | {runs} | "
            f"{r['median_wall_s']:.2f} | {r['min_wall_s']:.2f} | {r['keys_per_s']:,.0f} | "
            f"{r['median_cpu_s']:.2f} | {r['median_server_cpu_s']:.2f} | "
            f"{r['median_other_cpu_s']:.1f} | {r['peak_rss_mb']:.0f} | {ratio} | {cpu_ratio} | "
            f"{cp_ratio} |")
    return "\n".join(lines)


def memory_check(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Peak RSS of each tool by key count (same layout), and its growth from the smallest count."""
    out = []
    for (layout, name), rs in _by(rows, lambda r: (r["layout"], r["tool"])).items():
        rs = sorted((r for r in rs if r.get("peak_rss_mb")), key=lambda r: r["keys"])
        if len({r["keys"] for r in rs}) < 2:
            continue
        for r in rs:
            out.append({"layout": layout, "tool": name, "keys": r["keys"],
                        "peak_rss_mb": r["peak_rss_mb"],
                        "growth_vs_smallest": r["peak_rss_mb"] / rs[0]["peak_rss_mb"]})
    return out


def _by(rows: list[dict[str, Any]], key: Callable[[dict[str, Any]], Any]) -> dict[Any, list]:
    groups: dict[Any, list] = collections.OrderedDict()
    for r in rows:
        groups.setdefault(key(r), []).append(r)
    return groups


def profile(target: Target, name: str, rate: int = 50, top: int = 25) -> dict[str, Any]:
    """Run `name` once under py-spy and rank frames by self and inclusive samples.

    `--gil` keeps only the samples of the thread holding the GIL: that is where the Python
    process spends its CPU (waiting on sockets and SQLite I/O is left out). `--nonblocking` so
    sampling does not stop the process 50 times a second.
    """
    spy = tool("py-spy")
    work = Path(tempfile.mkdtemp(prefix="pyspy-", dir=target.scratch))
    raw = work / "profile.txt"
    cmd = [spy, "record", "--format", "raw", "--rate", str(rate), "--nonblocking", "--gil", "--output", str(raw),
           "--", *target.command(name, work / "state.db")]
    m = measure(cmd, env=target.env, stdout=str(work / "stdout"), count_lines=False)
    self_t: collections.Counter[str] = collections.Counter()
    incl: collections.Counter[str] = collections.Counter()
    threads: collections.Counter[str] = collections.Counter()
    total = 0
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack:
            continue
        n = int(count)
        total += n
        frames = [_frame(f) for f in stack.split(";")]
        frames = [f for f in frames if f]
        if not frames:
            continue
        threads[frames[0]] += n
        self_t[frames[-1]] += n
        for f in set(frames[1:]):
            incl[f] += n
    keep = REPO / "benchmarks" / "results" / f"pyspy-{target.bucket}-{name}.txt"
    keep.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy(raw, keep)
    shutil.rmtree(work, ignore_errors=True)
    return {
        "tool": name, "bucket": target.bucket, "wall_s": m.wall_s, "samples": total,
        "raw": str(keep.relative_to(REPO)),
        "by_thread": [(k, v / total) for k, v in threads.most_common(10)],
        "self": [(k, v / total) for k, v in self_t.most_common(top)],
        "inclusive": [(k, v / total) for k, v in incl.most_common(top)],
    }


_FRAME = re.compile(r"^(?P<func>.*?) \((?P<file>[^()]*?)(?::\d+)?\)$")


def _frame(text: str) -> str:
    """`func (path/to/file.py:123)` -> `func (file.py)`; thread frames kept as they are."""
    match = _FRAME.match(text.strip())
    if not match:
        return text.strip()
    path = match["file"]
    short = "/".join(path.split("/")[-2:]) if "cloudexit/" in path else path.split("/")[-1]
    return f"{match['func']} ({short})"


def startup(server: Any, client: list[str], scratch: Path, repeat: int,
            compare_tree: Path | None = None) -> list[dict[str, Any]]:
    """The fixed start-up of `cloudexit inventory` and `cloudexit migrate` on a one-object
    bucket: wall time, and the time from launch to the first request and the first object GET
    reaching the store (through `FirstRequest`), next to `python -c pass` and `s5cmd cp`.
    `compare_tree`: the same two commands also from that checkout ("before"), the two trees
    taking turns to go first. An untimed round first writes the modules' bytecode, as `pip
    install` does (run from a tree without `__pycache__` under PYTHONDONTWRITEBYTECODE=1, every
    cloudexit module was compiled at every start: ~0.05-0.1 s of CPU no installed copy spends)."""
    bucket = "inv-flat-1"
    ensure_bucket(server, bucket, 1, "flat", log=_log)
    relay = FirstRequest(int(server.endpoint_url.rsplit(":", 1)[1]), bucket)
    url = f"http://127.0.0.1:{relay.port}"
    env = {**os.environ, **server.env(), "AWS_ENDPOINT_URL": url}
    env.pop("AWS_PROFILE", None)
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    trees = {"": REPO} | ({" before": compare_tree} if compare_tree else {})
    codes = {tag: code_version(tree) for tag, tree in trees.items()}
    rows = []
    try:
        for rep in range(-1, repeat):  # -1: writes the bytecode, not counted
            work = Path(tempfile.mkdtemp(prefix="startup-", dir=scratch))
            cli = [tool("cloudexit")]
            commands: dict[str, tuple[list[str], dict[str, str], str | None]] = {
                "python -c pass": ([sys.executable, "-c", "pass"], env, None),
                "s5cmd cp (1 object)": ([tool("s5cmd"), "--endpoint-url", url, "cp",
                                         f"s3://{bucket}/*", str(work / "s5") + "/"], env, None),
                "cloudexit --version": ([*cli, "--version"], {**env, "PYTHONPATH": str(REPO)}, codes[""]),
            }
            tags = list(trees)
            for tag in tags[rep % len(tags):] + tags[:rep % len(tags)]:
                db, tree_env = work / f"state{tag.strip()}.db", {**env, "PYTHONPATH": str(trees[tag])}
                commands[f"cloudexit inventory (1 object){tag}"] = (
                    [*cli, "inventory", f"s3://{bucket}", "--endpoint-url", url, "--db", str(db), "-q"],
                    tree_env, codes[tag])
                commands[f"cloudexit migrate (1 object){tag}"] = (
                    [*cli, "migrate", "--to", str(work / f"dest{tag.strip()}"), "--db", str(db), "-q"],
                    tree_env, codes[tag])
            for name, (cmd, cmd_env, code) in commands.items():
                relay.reset()
                launched = time.perf_counter()
                m = measure(client + cmd, env=cmd_env, stdout=str(work / "stdout"), count_lines=False,
                            on_start=lambda proc: setattr(relay, "watch", proc))
                row = {"repeat": rep, "what": name, "wall_s": m.wall_s, "cpu_s": m.cpu_s,
                       "peak_rss_mb": m.peak_rss_mb, "returncode": m.returncode,
                       "first_request_s": relay.first - launched if relay.first else None,
                       "first_get_s": relay.first_get - launched if relay.first_get else None,
                       "cpu_to_first_get_s": relay.cpu_at_get, "code": code}
                if rep < 0:
                    continue
                rows.append(row)
                _log(f"  startup [{rep + 1}/{repeat}] {name:<32} {m.wall_s:6.3f} s wall "
                     f"{m.cpu_s:6.3f} s CPU  first request "
                     f"{_secs(row['first_request_s'])}  first GET {_secs(row['first_get_s'])} "
                     f"(CPU by then {_secs(row['cpu_to_first_get_s'])})"
                     f"{'' if m.returncode == 0 else f'  EXIT {m.returncode}'}")
            shutil.rmtree(work, ignore_errors=True)
    finally:
        relay.close()
    return rows


def _secs(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f} s"


def startup_table(rows: list[dict[str, Any]]) -> str:
    lines = ["| command | runs | median wall | median CPU | first request | first object GET | "
             "CPU by the first GET |", "|---|---:|---:|---:|---:|---:|---:|"]
    for what, rs in _by(rows, lambda r: r["what"]).items():
        def med(field: str, rs: list[dict[str, Any]] = rs) -> str:
            values = [r[field] for r in rs if r.get(field) is not None]
            return _secs(statistics.median(values)) if values else "-"
        lines.append(f"| {what} | {len(rs)} | {med('wall_s')} | {med('cpu_s')} | "
                     f"{med('first_request_s')} | {med('first_get_s')} | {med('cpu_to_first_get_s')} |")
    return "\n".join(lines)


def pin_server(server: Any) -> None:
    """Every thread of the S3 server on core 1 (the tools run on core 0: `--pin`)."""
    import subprocess

    subprocess.run(["taskset", "-a", "-p", "-c", "1", str(server.proc.pid)], check=True,
                   capture_output=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--keys", type=int, action="append",
                    help="keys in the bucket (repeatable; 0: no listing bucket)")
    ap.add_argument("--layout", choices=LAYOUTS, action="append", help="key layout (repeatable)")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--tools", default=",".join(t for t in TOOLS if t != "cloudexit-list-base"),
                    help=f"comma-separated subset of {','.join(TOOLS)} (the last: with --compare-tree, "
                         "which adds it to cloudexit-list)")
    ap.add_argument("--header-keys", type=int, default=10_000,
                    help="bucket size for cloudexit-headers, per layout (0: skip)")
    ap.add_argument("--header-workers", type=int, action="append", default=[],
                    help="also run cloudexit-headers with --workers N, alternating (repeatable)")
    ap.add_argument("--header-layout", choices=LAYOUTS, action="append",
                    help="layouts of the header-read buckets (default: every --layout)")
    ap.add_argument("--workdir", default=None,
                    help="keep SeaweedFS data (and filled buckets) here for the next run")
    ap.add_argument("--populate", choices=("filer", "s5cmd", "boto3"), default="filer")
    ap.add_argument("--populate-only", action="store_true", help="fill the buckets and stop")
    ap.add_argument("--cloudexit-args", default="", help="extra arguments for cloudexit inventory")
    ap.add_argument("--py-spy", action="store_true",
                    help="also profile one cloudexit run per bucket with py-spy")
    ap.add_argument("--pin", action="store_true",
                    help="the S3 server on core 1, every tool on core 0 (taskset)")
    ap.add_argument("--startup", type=int, default=0, metavar="N",
                    help="also measure the start-up of inventory and migrate, N times")
    ap.add_argument("--compare-tree", type=Path, default=None, metavar="DIR",
                    help="another checkout (e.g. a `git worktree` of the commit before a change): "
                         "with --startup, inventory and migrate also from it; and cloudexit-list "
                         "from it as the tool cloudexit-list-base")
    ap.add_argument("--out", default=None, help="JSON results file")
    ap.add_argument("--report", nargs="+", metavar="JSON",
                    help="print the tables of saved results (merged) and stop")
    args = ap.parse_args()
    if args.report:
        report(args.report)
        return
    keys_list = args.keys or [50_000]
    layouts = args.layout or ["uid"]
    wanted = [t.strip() for t in args.tools.split(",") if t.strip()]
    for t in wanted:
        if t not in TOOLS:
            ap.error(f"unknown tool {t!r}")
    base_tree = args.compare_tree.resolve() if args.compare_tree else None
    if base_tree and not (base_tree / "cloudexit" / "__init__.py").is_file():
        ap.error(f"--compare-tree {args.compare_tree}: no cloudexit checkout there")
    if "cloudexit-list-base" in wanted and not base_tree:
        ap.error("cloudexit-list-base runs the --compare-tree checkout: give --compare-tree DIR")
    started = dt.datetime.now().astimezone()
    out = Path(args.out) if args.out else (
        REPO / "benchmarks" / "results" /
        f"inventory-{'-'.join(layouts)}-{'-'.join(str(k) for k in keys_list)}-{started:%Y%m%d-%H%M}.json")
    out.parent.mkdir(parents=True, exist_ok=True)

    server = bench_server(args.workdir)
    client = ["taskset", "-c", "0"] if args.pin else []
    if args.pin:
        pin_server(server)
    scratch = Path(tempfile.mkdtemp(prefix="cloudexit-bench-runs-"))
    result: dict[str, Any] = {"started": started.isoformat(), "argv": sys.argv, "pinned": args.pin,
                              "versions": versions(), "runs": [], "populate": [], "profiles": []}
    try:
        if args.startup:
            result["startup"] = startup(server, client, scratch, args.startup, base_tree)
            _save(out, result)
            print("\n" + startup_table(result["startup"]) + "\n")
        plan: list[tuple[Target, list[str]]] = []
        for layout in layouts:
            for keys in keys_list:
                if keys == 0:  # --keys 0: only the header reads (and --startup)
                    continue
                bucket = f"inv-{layout}-{keys}"
                info = ensure_bucket(server, bucket, keys, layout, method=args.populate, log=_log)
                result["populate"].append(info)
                target = Target(server, bucket, keys, layout, scratch, args.cloudexit_args.split(),
                                client, base_tree)
                tools = [t for t in wanted if t not in ("cloudexit-headers", "s5cmd-cp")]
                if base_tree and "cloudexit-list" in tools and "cloudexit-list-base" not in tools:
                    tools.append("cloudexit-list-base")
                if layout == "flat":  # no UIDs in flat keys
                    tools = [t for t in tools if not t.startswith("cloudexit-list")]
                plan.append((target, tools))
        for layout in args.header_layout or layouts:
            if args.header_keys and ("cloudexit-headers" in wanted or args.header_workers):
                bucket = f"inv-{layout}-{args.header_keys}"
                info = ensure_bucket(server, bucket, args.header_keys, layout,
                                     method=args.populate, log=_log)
                result["populate"].append(info)
                plan.append((Target(server, bucket, args.header_keys, layout, scratch,
                                    args.cloudexit_args.split(), client),
                             [f"cloudexit-headers-w{n}" for n in args.header_workers]
                             + [t for t in ("cloudexit-headers", "s5cmd", "s5cmd-cp") if t in wanted]))
        if args.populate_only:
            return
        for target, tools in plan:
            _log(f"== {target.bucket}: {target.keys} keys, {target.layout} layout; "
                 f"tools {', '.join(tools)}; {args.repeat} repeat(s)")
            target.run("s5cmd")  # warm the server's caches; not counted
            for rep in range(args.repeat):
                order = tools[rep % len(tools):] + tools[:rep % len(tools)]
                for name in order:
                    row = target.run(name)
                    row["repeat"] = rep
                    result["runs"].append(row)
                    _log(f"  [{rep + 1}/{args.repeat}] {name:<18} {row['wall_s']:7.2f} s wall "
                         f"{row['cpu_s']:6.2f} s CPU {row['peak_rss_mb']:6.0f} MB  "
                         f"server {row['server_cpu_s']:5.2f} s  other {row['other_cpu_s']:5.2f} s  "
                         f"{'ok' if row['ok'] else 'FAILED'}: {row['check']}")
                    _save(out, result)
            if args.py_spy:
                for name in ("cloudexit-list", "cloudexit-headers"):
                    if name in tools:
                        _log(f"  profiling {name} with py-spy")
                        prof = profile(target, name)
                        result["profiles"].append(prof)
                        _print_profile(prof)
                        _save(out, result)
    finally:
        server.stop()
        shutil.rmtree(scratch, ignore_errors=True)
        if result.get("startup"):
            print("\n" + startup_table(result["startup"]))
        if result["runs"]:
            result["summary"] = summarize(result["runs"])
            result["memory"] = memory_check(result["summary"])
            result["finished"] = dt.datetime.now().astimezone().isoformat()
            _save(out, result)
            report_rows(result["summary"], result["memory"])
            print(f"\nresults: {out}")


def report(paths: list[str]) -> None:
    runs: list[dict[str, Any]] = []
    for path in paths:
        data = json.loads(Path(path).read_text())
        print(f"{path}: started {data['started']}, versions {data['versions']}")
        runs += data["runs"]
        if data.get("startup"):
            print(startup_table(data["startup"]))
    rows = summarize(runs)
    report_rows(rows, memory_check(rows))


def report_rows(rows: list[dict[str, Any]], memory: list[dict[str, Any]]) -> None:
    print()
    print(markdown(rows))
    if memory:
        print("\nPeak RSS by key count:")
        for m in memory:
            print(f"  {m['layout']} {m['tool']:<18} {m['keys']:>9,} keys  "
                  f"{m['peak_rss_mb']:7.1f} MB  ({m['growth_vs_smallest']:.2f}x)")


def _print_profile(prof: dict[str, Any]) -> None:
    print(f"  py-spy {prof['tool']} on {prof['bucket']}: {prof['samples']} samples, "
          f"{prof['wall_s']:.1f} s wall; raw stacks in {prof['raw']}")
    print("  by thread:")
    for name, share in prof["by_thread"]:
        print(f"    {share:6.1%}  {name}")
    print("  self time:")
    for name, share in prof["self"][:15]:
        print(f"    {share:6.1%}  {name}")
    print("  inclusive:")
    for name, share in prof["inclusive"][:25]:
        print(f"    {share:6.1%}  {name}")


def _save(path: Path, result: dict[str, Any]) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(result, indent=1, default=str))
    tmp.replace(path)


def _log(text: str) -> None:
    print(f"{time.strftime('%H:%M:%S')} {text}", flush=True)


if __name__ == "__main__":
    main()
