"""Transfer benchmark: `cloudexit migrate` (all verification on) beside s5cmd, rclone, aws cli.

    python benchmarks/transfer.py                      # all three workloads, 3 alternating rounds
    python benchmarks/transfer.py --workloads ct2000 --rounds 5 --write-docs

Workloads, on one local SeaweedFS (loopback), each tool downloading the whole bucket into a fresh
folder on the same disk:
  ct2000    2,000 synthetic CT slices of ~0.5 MB (1.05 GB), `synthetic.Profile.ct_bench(2000)`
  big4      4 multi-frame DICOM objects of 256 MiB, uploaded in 8 MiB parts (multipart ETags)
  small20k  20,000 tiny DICOM objects (~0.5 KB), `benchmarks.common.populate`
Tools run in alternating order each round (so drifting machine load hits all alike); the report
gives the median wall time, CPU (user+sys of the tool and its children), the peak RSS of the
process tree, the S3 server's CPU meanwhile, and the ratio of wall time to s5cmd.

cloudexit runs `migrate --to DEST` on a copy of a finished inventory DB (the inventory is not
timed: the other tools have none): every object is fetched with If-Match, its MD5/multipart ETag
checked and its SHA-256 recorded (a provider CRC is computed only when no MD5-based ETag applies),
the DICOM header is walked and its SOP Instance UID compared, each file is fsynced and renamed,
its folder fsynced (once per group of files), and each result committed after that.
s5cmd, rclone and aws cli write without fsync; rclone checks MD5 for single-part objects only.

`--tls` serves S3 over HTTPS (a throwaway CA, trusted through AWS_CA_BUNDLE, rclone's --ca-cert),
as every cloud endpoint is: the cost of TLS is then in every tool's figures.

`--compare-tree DIR` also runs `cloudexit migrate` from another checkout (tool `cloudexit-base`,
e.g. `git worktree add /tmp/base HEAD~1`), so a change is measured before/after in one run.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import REPO, bench_ca, bench_server, ensure_bucket, measure, tool, versions

from cloudexit.testing import synthetic

TOOLS = ("s5cmd", "cloudexit", "rclone", "aws")


def _fill_synthetic(server, bucket: str, profile: synthetic.Profile, log) -> None:
    marker = server.workdir / f"populated-{bucket}.json"
    if marker.exists():
        log(f"bucket {bucket}: reusing")
        return
    started = time.monotonic()
    objects = synthetic.upload(server.client(max_pool_connections=16), bucket,
                               synthetic.generate(profile), workers=8)
    marker.write_text(json.dumps({"objects": len(objects), "bytes": sum(o.size for o in objects),
                                  "seconds": time.monotonic() - started}))
    log(f"bucket {bucket}: {len(objects)} objects in {time.monotonic() - started:.0f} s")


def prepare(server, workload: str, log) -> str:
    bucket = f"bench-{workload}"
    if workload == "ct2000":
        _fill_synthetic(server, bucket, synthetic.Profile.ct_bench(2000), log)
    elif workload == "big4":
        profile = synthetic.Profile(patients=1, studies_per_patient=1, ct_slices_per_series=0,
                                    cr_per_study=0, multiframe_objects=4,
                                    multiframe_bytes=256_000_000, awkward=False, seed=3)  # 256 MB
        _fill_synthetic(server, bucket, profile, log)
    elif workload == "small20k":
        ensure_bucket(server, bucket, 20_000, "uid", log=log)
    else:
        raise SystemExit(f"unknown workload {workload}")
    return bucket


def inventory_db(server, bucket: str, work: Path, env: dict[str, str], log, base: bool = False) -> Path:
    """The finished inventory each run starts from (a copy of it). `base`: made by the
    --compare-tree checkout, whose code may refuse a DB of a newer schema."""
    db = work / (f"{bucket}-base.db" if base else f"{bucket}.db")
    if not db.exists():
        log(f"inventory of {bucket} (not timed)")
        cli = [sys.executable, "-m", "cloudexit.cli"] if base else [tool("cloudexit")]
        result = measure([*cli, "inventory", f"s3://{bucket}", "--db", str(db), "-q"],
                         env=env)
        if result.returncode not in (0, 3):
            raise SystemExit("inventory failed")
    return db


def command(name: str, bucket: str, dest: Path, server, db_copy: Path, ca: str | None = None) -> list[str]:
    ep = server.https_url if ca else server.endpoint_url
    if name == "s5cmd":
        return [tool("s5cmd"), "--endpoint-url", ep, "cp", f"s3://{bucket}/*", f"{dest}/"]
    if name == "rclone":
        return [tool("rclone"), "copy", f":s3:{bucket}", str(dest), "--transfers", "16",
                "--checkers", "16", "--s3-provider", "Other", "--s3-endpoint", ep,
                "--s3-force-path-style=true", "--s3-env-auth=false"] + (["--ca-cert", ca] if ca else [])
    if name == "aws":
        return [tool("aws"), "s3", "cp", "--recursive", "--quiet", "--endpoint-url", ep,
                f"s3://{bucket}", str(dest)]
    if name == "cloudexit":
        return [tool("cloudexit"), "migrate", "--to", str(dest), "--db", str(db_copy), "-q",
                "--endpoint-url", ep]
    if name == "cloudexit-base":  # another checkout (--compare-tree), for before/after in one run
        return [sys.executable, "-m", "cloudexit.cli", "migrate", "--to", str(dest), "--db", str(db_copy), "-q",
                "--endpoint-url", ep]
    raise ValueError(name)


def run(args: argparse.Namespace) -> dict:
    log = print
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    ca = cert = key = None
    if args.tls:
        ca, cert, key = bench_ca(work / "tls")
    server = bench_server(work / "s3", tls=(cert, key) if cert and key else None)
    results: dict = {"versions": versions(), "workloads": {}, "rounds": args.rounds, "tls": bool(ca),
                     "started": time.strftime("%Y-%m-%d %H:%M:%S"),
                     "command": "python benchmarks/transfer.py " + " ".join(sys.argv[1:])}
    trash: list[Path] = []
    try:
        env = {**os.environ, **server.env(),
               "RCLONE_S3_ACCESS_KEY_ID": server.env()["AWS_ACCESS_KEY_ID"],
               "RCLONE_S3_SECRET_ACCESS_KEY": server.env()["AWS_SECRET_ACCESS_KEY"]}
        if ca:
            env["AWS_CA_BUNDLE"] = ca
        server_pid = server.proc.pid if server.proc else None
        base_env = {**env, "PYTHONPATH": str(Path(args.compare_tree).resolve())} if args.compare_tree else env
        tools = list(args.tools) + (["cloudexit-base"] if args.compare_tree else [])
        for workload in args.workloads:
            bucket = prepare(server, workload, log)
            db = inventory_db(server, bucket, work, env, log)
            base_db = inventory_db(server, bucket, work, base_env, log, base=True) if args.compare_tree else db
            data: dict[str, list] = {t: [] for t in tools}
            for round_ in range(args.rounds):
                order = list(tools)
                order = order[round_ % len(order):] + order[:round_ % len(order)]
                for name in order:
                    dest = Path(args.dest_root) / f"{workload}-{name}"
                    shutil.rmtree(dest, ignore_errors=True)
                    dest.mkdir(parents=True)
                    db_copy = work / f"run-{workload}.db"
                    for suffix in ("", "-wal", "-shm", ".lock"):
                        Path(str(db_copy) + suffix).unlink(missing_ok=True)
                    shutil.copy(base_db if name == "cloudexit-base" else db, db_copy)
                    # The previous tool's writes reach the disk now, not during this tool's run
                    # (s5cmd, rclone and aws leave theirs in the page cache when they exit).
                    os.sync()
                    m = measure(command(name, bucket, dest, server, db_copy, ca),
                                env=base_env if name == "cloudexit-base" else env,
                                server_pid=server_pid, count_lines=False)
                    files = sum(1 for p in dest.rglob("*") if p.is_file())
                    data[name].append({**m.as_dict(), "files": files})
                    log(f"{workload} round {round_ + 1} {name:<9} wall {m.wall_s:6.2f} s  cpu {m.cpu_s:6.2f} s  "
                        f"rss {m.peak_tree_rss_mb:6.0f} MB  server cpu {m.server_cpu_s:5.2f} s  "
                        f"rc {m.returncode}  files {files}")
                    # Kept until the end: files deleted just before a run make ext4 (without a
                    # journal, as here) skip every recently freed inode when it creates new ones.
                    trash.append(dest.rename(dest.with_name(f"{dest.name}.done-{round_}")))
            summary = {}
            for name, runs in data.items():
                ok = [r for r in runs if r["returncode"] in (0, 3)] or runs
                summary[name] = {
                    "wall_s": statistics.median(r["wall_s"] for r in ok),
                    "cpu_s": statistics.median(r["cpu_s"] for r in ok),
                    "peak_rss_mb": max(r["peak_tree_rss_mb"] for r in ok),
                    "server_cpu_s": statistics.median(r["server_cpu_s"] for r in ok),
                    "runs": len(ok), "files": ok[0]["files"],
                }
            base = summary.get("s5cmd", {}).get("wall_s")
            for name in summary:
                summary[name]["ratio_to_s5cmd"] = summary[name]["wall_s"] / base if base else None
            results["workloads"][workload] = {"bucket": bucket, "summary": summary, "runs": data}
    finally:
        server.stop()
        for path in trash:
            shutil.rmtree(path, ignore_errors=True)
    return results


def table(results: dict) -> str:
    lines = []
    names = {"ct2000": "2,000 CT objects of ~0.5 MB (1.05 GB)",
             "big4": "4 multipart objects of 256 MB (1 GB)",
             "small20k": "20,000 small objects (~0.5 KB)"}
    for workload, data in results["workloads"].items():
        lines += [f"**{names.get(workload, workload)}**", "",
                  "| tool | wall (median) | ratio to s5cmd | CPU user+sys | peak RSS (tree) | S3 server CPU |",
                  "|---|---|---|---|---|---|"]
        for name, s in sorted(data["summary"].items(), key=lambda kv: kv[1]["wall_s"]):
            ratio = f"{s['ratio_to_s5cmd']:.2f}x" if s["ratio_to_s5cmd"] else "-"
            lines.append(f"| {name} | {s['wall_s']:.2f} s | {ratio} | {s['cpu_s']:.2f} s | "
                         f"{s['peak_rss_mb']:.0f} MB | {s['server_cpu_s']:.2f} s |")
        lines.append("")
    return "\n".join(lines)


def write_docs(results: dict, text: str) -> None:
    path = REPO / "docs" / "performance.md"
    doc = path.read_text() if path.exists() else "# Performance\n"
    template = TLS_SECTION if results.get("tls") else TRANSFER_SECTION
    heading = template.split("\n", 1)[0]
    start = doc.find("\n" + heading)
    if start < 0 and results.get("tls"):  # new: after the plain-HTTP section
        start = doc.find("\n## ", doc.find("\n## Transfer (") + 5)
        doc = doc[:start + 1] + heading + "\n\n" + doc[start + 1:]
    command = results.get("command", "python benchmarks/transfer.py --write-docs")
    section = template.format(date=results["started"], rounds=results["rounds"], command=command,
                                      versions=", ".join(f"{k} {v}" for k, v in results["versions"].items()),
                                      table=text)
    if start < 0:
        doc = doc.rstrip("\n") + "\n\n" + section
    else:
        end = doc.find("\n## ", start + 5)
        doc = doc[:start + 1] + section + (doc[end:] if end >= 0 else "")
    path.write_text(doc)


TRANSFER_SECTION = """## Transfer (`cloudexit migrate`)

Measured with `{command}` on {date}, {rounds} alternating
rounds per tool, median shown; {versions}. `cloudexit-base` (when shown) is the same command run
from another checkout (`--compare-tree`), the code before the change measured in the same rounds.
The S3 server (SeaweedFS) runs on the same two
cores, and other work shared the machine during the runs, so compare within a table (same
moment, alternating order), not across documents.

{table}
What each tool does per object: cloudexit GETs with If-Match, computes MD5 (or the multipart
ETag, with the part size learned by `HEAD ?partNumber=1`) and SHA-256 in one pass (the stored
`x-amz-checksum-crc32` only when no MD5-based ETag can be checked: SSE-KMS, SSE-C, unknown ETag
forms), walks the DICOM header and compares the SOP Instance UID, fsyncs the file, renames it,
fsyncs the folder (one fsync per folder for the files that landed meanwhile) and only then
commits the result. s5cmd, rclone and aws cli write without fsync; s5cmd checks nothing, rclone
compares MD5 with single-part ETags only, aws cli checks `x-amz-checksum-*` when present.

### Design choices, from profiles
* Per-request Python CPU was the first obstacle: boto3's `get_object` costs ~1.5 ms of CPU
  before a byte moves. Requests are signed by a standard-library SigV4 signer (tested against
  botocore's, and checked by the server on every request).
* Small objects (up to 1 MiB, whole, single-part, HTTP or HTTPS without a proxy, no
  `--bwlimit`) run many at once on each worker process's main thread (`cloudexit/transfer/multiget.py`):
  16 non-blocking keep-alive connections (connect and TLS handshake on the same selector), one
  selector, the request written in one `send`, the answer parsed from one buffer. With 8 download
  threads per process instead, the GIL changed hands at every system
  call: strace counted ~100 futex calls per object (now ~15) and the workers spent ~2.1 ms of
  CPU per tiny object (now ~1.2 ms). Anything unusual (a status other than 200, a short or
  dropped answer, a failed check, a disk error, a file already at its final path, a temp file to
  resume) goes to the download threads, which fetch the object again and judge it as before;
  the attempt's requests and bytes are counted in its result.
* Finished small files are fsynced and renamed by 4 placer threads per process (an fsync blocks,
  and the disk takes several at once); the folders are then fsynced once per group (5 ms or 64
  files) and only then do the results go to the engine, which alone marks objects migrated.
* Worker processes (one per CPU) start before the endpoint is resolved and the work planned;
  they get the endpoint and credentials on a pipe. The engine only plans, dispatches (8 tasks per
  download thread in flight, not counting results that wait for the next commit, 4 small tasks
  per message) and commits (batched, ~0.25 s). Counting the results that waited for a commit
  as in flight had capped tiny objects at ~215 per second.
* Planning the work queue (`_sync`) costs one index probe per path (the path and everything
  below it in one range query), and the SOP-UID conflict query runs only for UIDs that occur
  twice: 20,000 objects plan in ~1.7-2.4 s instead of ~6 s (and the workers are already up).
* pydicom's header parse (~1 ms per object) was replaced on the hot path by a `struct` walk of
  the header (~40 µs; `cloudexit/dicom/scan.py`) that falls back to pydicom for anything unusual.
* Hashing only what verification needs: on this CPU MD5 runs at ~440 MB/s (1.2 ms per 0.5 MB
  object), SHA-256 (SHA-NI) at ~1 GB/s (0.5 ms), CRC32 (zlib) at ~1.1 GB/s (0.46 ms). A verified
  MD5 ETag (or multipart ETag) already proves the bytes are those S3 stored, so the provider CRC
  of the same bytes is computed only when no MD5-based ETag applies (SSE-KMS, SSE-C, unknown
  ETag forms; `checksums.worth_computing`). SHA-256 is always computed: it is the archive's
  recorded fixity (`verify --deep`, the audit). That leaves ~1.7 ms of hashing per CT slice.
* Large objects: ranges of 16 MiB, 4 in flight per object, written with `pwrite` into one temp
  file by the download threads; a follower thread hashes the bytes in order as they land (from
  the page cache), so verification overlaps the download. A range is fdatasynced and reported
  for resume at its end.
* The benchmark itself: each run starts after `os.sync()` (so the previous tool's unwritten
  gigabyte is not flushed during the next tool's run), and the downloaded folders are deleted
  only at the end. This disk is ext4 without a journal, where a file created just after many
  were deleted makes the kernel skip every recently freed inode (`recently_deleted` and
  `find_inode_bit` were 13% of all CPU cycles in `perf` when folders were deleted between runs).

### Bandwidth limit
`--bwlimit` takes rclone's timetable syntax (`"20M"`, `"08:00,20M 18:00,off"`,
`"Mon-Fri 08:00,512k 19:00,off"`). All worker processes draw from one token bucket in shared
memory; the socket receive buffer is capped at 256 KiB when a limit is set, so the kernel cannot
run ahead of the limit by more than a few MB. Change it while the run goes on with
`cloudexit migrate --bwlimit TIMETABLE --db DB` (from any terminal): the live run reads it from
the state DB within two seconds, and `--resume` keeps it.
"""


TLS_SECTION = """## Transfer over HTTPS (`cloudexit migrate`)

Measured with `{command}` on {date}, {rounds} alternating rounds per tool, median shown;
{versions}. The same SeaweedFS and buckets as above, serving S3 over HTTPS with a certificate
from a throwaway CA that every tool trusts (`AWS_CA_BUNDLE`; rclone `--ca-cert`), as every
cloud endpoint is: the TLS handshakes and AES-GCM of every byte are in each tool's figures (and
the server's). cloudexit's small-object loop opens its connections without blocking (TCP
connect, then the TLS handshake, on the same selector) and keeps them alive.

{table}
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workloads", nargs="+", default=["ct2000", "big4", "small20k"])
    parser.add_argument("--tools", nargs="+", default=list(TOOLS))
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--workdir", default="/tmp/cloudexit-bench-transfer",
                        help="SeaweedFS data and inventory DBs, kept between invocations")
    parser.add_argument("--dest-root", default="/var/tmp/cloudexit-bench-dest",
                        help="where the tools download to (a disk, not tmpfs)")
    parser.add_argument("--compare-tree", default=None,
                        help="also run `cloudexit migrate` from this checkout (tool cloudexit-base), "
                             "e.g. a `git worktree` of the commit before a change")
    parser.add_argument("--tls", action="store_true", help="every tool over HTTPS (a throwaway CA)")
    parser.add_argument("--json", default=None, help="write all measurements here")
    parser.add_argument("--write-docs", action="store_true", help="update docs/performance.md")
    parser.add_argument("--docs-from", default=None, help="re-render the docs from a --json file")
    args = parser.parse_args()
    if args.docs_from:
        results = json.loads(Path(args.docs_from).read_text())
        write_docs(results, table(results))
        return
    results = run(args)
    text = table(results)
    print(text)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2, default=str))
    if args.write_docs:
        write_docs(results, text)


if __name__ == "__main__":
    main()
