"""Shared benchmark plumbing: an S3 server, fast bucket population, and a command timer.

* `bench_server(workdir)` starts the embedded SeaweedFS (`cloudexit.s3server.SeaweedServer`).
  Pass a persistent `workdir` to keep populated buckets between benchmark invocations: a
  500k-key bucket takes minutes to fill, so it is filled once and reused (see `ensure_bucket`).
* `populate(...)` fills a bucket with N tiny but valid DICOM objects (762 bytes each) in one of two
  key layouts:
    - ``uid``:  ``<StudyUID>/<SeriesUID>/<SOPUID>.dcm``, 100 instances per study (2 series x 50)
    - ``flat``: Orthanc-style ``<uuid>.dcm`` in one flat namespace
  Every object's header holds the UIDs its key names, so `cloudexit inventory --key-pattern`
  passes its header-sample check, and plain mode classifies every object as DICOM.
  Three methods: ``filer`` (the default and the fastest: HTTP PUT straight to SeaweedFS's filer,
  which is where S3 keeps a bucket's objects), ``s5cmd`` (write the files to a tmpfs directory,
  one `s5cmd cp` over S3) and ``boto3`` (a thread pool of put_object over S3). Measured rates are
  in docs/performance.md.
* `measure(cmd)` runs a command and returns wall time, user+sys CPU (wait4), peak RSS (the
  kernel high-water mark, through GNU time; and the sampled peak of the whole process tree)
  and the CPU the S3 server burnt meanwhile.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import struct
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterator, Sequence
from urllib.parse import quote

import psutil

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from cloudexit.testing.s3server import SeaweedServer  # noqa: E402

BIN = Path(sys.executable).parent
GNU_TIME = "/usr/bin/time" if os.access("/usr/bin/time", os.X_OK) else None
INSTANCES_PER_STUDY = 100
SERIES_PER_STUDY = 2
UID_ROOT = "1.2.826.0.1.3680043.8.498."  # pydicom's root, as generate_uid() uses
CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
EXPLICIT_VR_LE = "1.2.840.10008.1.2.1"
LAYOUTS = ("uid", "flat")
KEY_PATTERN = {"uid": "{study}/{series}/{sop}.dcm", "flat": None}


def tool(name: str) -> str:
    """A tool from the venv, else from PATH."""
    path = BIN / name
    if path.exists():
        return str(path)
    found = shutil.which(name)
    if not found:
        raise SystemExit(f"benchmark needs `{name}` (pip install 'cloudexit[bench]')")
    return found


# -- synthetic objects -------------------------------------------------------------------------
def _uid(*parts: object) -> str:
    """A deterministic 63-character UID (pydicom's root + digits, like generate_uid)."""
    digest = hashlib.sha1("/".join(map(str, parts)).encode()).digest()
    return UID_ROOT + str(int.from_bytes(digest[:16], "big"))[:37]


@dataclass(frozen=True)
class Instance:
    key: str
    study: str
    series: str
    sop: str
    patient_id: str
    study_date: str


def instances(n: int, layout: str, seed: str = "bench") -> Iterator[Instance]:
    """`n` instances, 100 per study, keyed in `layout`."""
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}")
    per_series = INSTANCES_PER_STUDY // SERIES_PER_STUDY
    for i in range(n):
        s, rest = divmod(i, INSTANCES_PER_STUDY)
        r, k = divmod(rest, per_series)
        study = _uid(seed, s)
        series = _uid(seed, s, r)
        sop = _uid(seed, s, r, k)
        if layout == "uid":
            key = f"{study}/{series}/{sop}.dcm"
        else:
            key = f"{uuid.uuid5(uuid.NAMESPACE_OID, f'{seed}/{sop}')}.dcm"
        date = f"{2015 + s % 11}{1 + s % 12:02d}{1 + s % 28:02d}"
        yield Instance(key, study, series, sop, f"P{s % 997:06d}", date)


def _el(group: int, elem: int, vr: str, value: bytes) -> bytes:
    """One explicit-VR little-endian element (value padded to even length)."""
    if len(value) % 2:
        value += b"\x00" if vr in ("UI", "OB") else b" "
    if vr in ("OB", "OW", "SQ", "UN", "UT", "UC", "UR"):
        return struct.pack("<HH2sHI", group, elem, vr.encode(), 0, len(value)) + value
    return struct.pack("<HH2sH", group, elem, vr.encode(), len(value)) + value


def tiny_dicom(inst: Instance) -> bytes:
    """A valid Part 10 file (explicit VR LE, 762 bytes): header plus a 4x4 8-bit image."""
    meta = (_el(0x0002, 0x0001, "OB", b"\x00\x01")
            + _el(0x0002, 0x0002, "UI", CT_IMAGE_STORAGE.encode())
            + _el(0x0002, 0x0003, "UI", inst.sop.encode())
            + _el(0x0002, 0x0010, "UI", EXPLICIT_VR_LE.encode())
            + _el(0x0002, 0x0012, "UI", (UID_ROOT + "1").encode()))
    meta = _el(0x0002, 0x0000, "UL", struct.pack("<I", len(meta))) + meta
    ds = (_el(0x0008, 0x0016, "UI", CT_IMAGE_STORAGE.encode())
          + _el(0x0008, 0x0018, "UI", inst.sop.encode())
          + _el(0x0008, 0x0020, "DA", inst.study_date.encode())
          + _el(0x0008, 0x0060, "CS", b"CT")
          + _el(0x0010, 0x0010, "PN", b"BENCH^SYNTHETIC")
          + _el(0x0010, 0x0020, "LO", inst.patient_id.encode())
          + _el(0x0020, 0x000D, "UI", inst.study.encode())
          + _el(0x0020, 0x000E, "UI", inst.series.encode())
          + _el(0x0028, 0x0002, "US", struct.pack("<H", 1))
          + _el(0x0028, 0x0004, "CS", b"MONOCHROME2")
          + _el(0x0028, 0x0010, "US", struct.pack("<H", 4))
          + _el(0x0028, 0x0011, "US", struct.pack("<H", 4))
          + _el(0x0028, 0x0100, "US", struct.pack("<H", 8))
          + _el(0x0028, 0x0101, "US", struct.pack("<H", 8))
          + _el(0x0028, 0x0102, "US", struct.pack("<H", 7))
          + _el(0x0028, 0x0103, "US", struct.pack("<H", 0))
          + _el(0x7FE0, 0x0010, "OW", bytes(range(16))))
    return b"\x00" * 128 + b"DICM" + meta + ds


# -- the server and its buckets ------------------------------------------------------------------
def bench_server(workdir: str | os.PathLike[str] | None = None,
                 tls: tuple[str, str] | None = None) -> SeaweedServer:
    """A started SeaweedFS; with `workdir`, its data survives for the next invocation; with
    `tls` (certificate, key), it serves HTTPS too (`https_url`)."""
    if workdir is not None:
        Path(workdir).mkdir(parents=True, exist_ok=True)
    return SeaweedServer(workdir, tls=tls).start(timeout=120)


def bench_ca(folder: Path) -> tuple[str, str, str]:
    """(CA bundle, certificate, key) for 127.0.0.1 from a throwaway CA (trustme), made once."""
    files = tuple(str(folder / name) for name in ("ca.pem", "cert.pem", "key.pem"))
    if not all(os.path.exists(f) for f in files):
        import trustme

        folder.mkdir(parents=True, exist_ok=True)
        ca = trustme.CA()
        cert = ca.issue_cert("127.0.0.1", "localhost")
        ca.cert_pem.write_to_path(files[0])
        cert.cert_chain_pems[0].write_to_path(files[1])
        cert.private_key_pem.write_to_path(files[2])
    return files  # type: ignore[return-value]


def populate(server: SeaweedServer, bucket: str, n: int, layout: str, method: str = "filer",
             threads: int = 32, tmp_root: str | None = None, log=print) -> float:
    """Create `bucket` and fill it with `n` tiny DICOM objects. Returns the seconds it took."""
    client = server.client()
    try:
        client.create_bucket(Bucket=bucket)
    except client.exceptions.BucketAlreadyOwnedByYou:
        pass
    started = time.monotonic()
    if method == "filer":
        _populate_filer(server, bucket, n, layout, threads)
    elif method == "boto3":
        _populate_boto3(server, bucket, n, layout, threads)
    elif method == "s5cmd":
        _populate_s5cmd(server, bucket, n, layout, tmp_root, log)
    else:
        raise ValueError(f"unknown populate method {method!r}")
    return time.monotonic() - started


def filer_port(server: SeaweedServer) -> int:
    """The filer HTTP port of a running `weed mini` (read from its command line)."""
    assert server.proc is not None
    for arg in server.proc.args:  # type: ignore[union-attr]
        if str(arg).startswith("-filer.port="):
            return int(str(arg).split("=", 1)[1])
    raise RuntimeError("weed mini was started without -filer.port")


def _populate_filer(server: SeaweedServer, bucket: str, n: int, layout: str, threads: int) -> None:
    """PUT each object straight to the filer's HTTP API under /buckets/BUCKET/KEY.

    An S3 bucket in SeaweedFS is the filer folder /buckets/BUCKET, so these objects are listed
    and read through S3 like any other (ETag = MD5 of the body, as an S3 PUT gives; checked by
    `check_objects`). It skips the S3 gateway's SigV4 check and proxying: about 3x the rate of
    `s5cmd cp` over S3 on this 2-core machine (see docs/performance.md).
    """
    import http.client

    port = filer_port(server)
    local = threading.local()

    def put(inst: Instance) -> None:
        for attempt in range(5):
            conn = getattr(local, "conn", None)
            if conn is None:
                conn = local.conn = http.client.HTTPConnection(getattr(server, "ip", "127.0.0.1"), port, timeout=60)
            try:
                conn.request("PUT", f"/buckets/{bucket}/{quote(inst.key)}", body=tiny_dicom(inst),
                             headers={"Content-Type": "application/dicom"})
                resp = conn.getresponse()
                resp.read()
                if resp.status < 300:
                    return
                error: Exception = RuntimeError(f"filer PUT {inst.key}: HTTP {resp.status}")
            except (OSError, http.client.HTTPException) as exc:
                error = exc
            conn.close()
            local.conn = None
            time.sleep(0.2 * (attempt + 1))
        raise error

    _run_bounded(put, instances(n, layout), threads)


def _run_bounded(fn, items, threads: int) -> None:
    """`fn(item)` on a thread pool with a bounded queue (Executor.map would submit every item
    up front: 500k futures)."""
    from concurrent.futures import FIRST_COMPLETED, wait

    with ThreadPoolExecutor(threads) as pool:
        pending: set = set()
        for item in items:
            if len(pending) >= threads * 4:
                done, pending = wait(pending, return_when=FIRST_COMPLETED)
                for f in done:
                    f.result()
            pending.add(pool.submit(fn, item))
        for f in pending:
            f.result()


def _populate_boto3(server: SeaweedServer, bucket: str, n: int, layout: str, threads: int) -> None:
    local = threading.local()

    def put(inst: Instance) -> None:
        client = getattr(local, "client", None)
        if client is None:
            client = local.client = server.client(max_pool_connections=threads)
        client.put_object(Bucket=bucket, Key=inst.key, Body=tiny_dicom(inst))

    _run_bounded(put, instances(n, layout), threads)


def _populate_s5cmd(server: SeaweedServer, bucket: str, n: int, layout: str,
                    tmp_root: str | None, log=print) -> None:
    # /dev/shm keeps many small files off the disk; s5cmd uploads the tree with 32 workers
    # (faster than its default 256 against one local SeaweedFS on 2 cores).
    root = tmp_root or ("/dev/shm" if os.path.isdir("/dev/shm") else None)
    tmp = Path(tempfile.mkdtemp(prefix="cloudexit-bench-", dir=root))
    try:
        made = set()
        for inst in instances(n, layout):
            path = tmp / inst.key
            if path.parent not in made:
                path.parent.mkdir(parents=True, exist_ok=True)
                made.add(path.parent)
            path.write_bytes(tiny_dicom(inst))
        log(f"  wrote {n} files under {tmp}, uploading with s5cmd")
        env = {**os.environ, **server.env()}
        subprocess.run([tool("s5cmd"), "--log", "error", "--numworkers", "32",
                        "--endpoint-url", server.endpoint_url,
                        "cp", f"{tmp}/*", f"s3://{bucket}/"],
                       env=env, check=True, stdout=subprocess.DEVNULL)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def count_keys(server: SeaweedServer, bucket: str) -> int:
    """Keys in `bucket` (a plain paginated listing).

    The client skips botocore's LastModified parsing (dateutil, ~3/4 of the CPU of a listing
    here): 500k keys count in about a minute instead of several.
    """
    import boto3
    from botocore.config import Config

    session = boto3.session.Session()
    session._session.get_component("response_parser_factory").set_parser_defaults(
        timestamp_parser=str)
    client = session.client("s3", endpoint_url=server.endpoint_url, region_name="us-east-1",
                            config=Config(s3={"addressing_style": "path"}), **server.credentials)
    paginator = client.get_paginator("list_objects_v2")
    return sum(page.get("KeyCount", 0) for page in paginator.paginate(Bucket=bucket))


def check_objects(server: SeaweedServer, bucket: str, n: int, layout: str, sample: int = 5) -> None:
    """A few objects read back through S3 match what was written (body, ETag = MD5, ranges)."""
    import random

    client = server.client()
    wanted = set(random.Random(n).sample(range(n), min(sample, n)))
    for i, inst in enumerate(instances(n, layout)):
        if i not in wanted:
            continue
        body = tiny_dicom(inst)
        head = client.head_object(Bucket=bucket, Key=inst.key)
        etag = head["ETag"].strip('"')
        if etag != hashlib.md5(body).hexdigest() or head["ContentLength"] != len(body):
            raise RuntimeError(f"{bucket}/{inst.key}: ETag {etag} / size {head['ContentLength']} "
                               f"do not match the body written")
        part = client.get_object(Bucket=bucket, Key=inst.key, Range="bytes=0-131",
                                 IfMatch=head["ETag"])["Body"].read()
        if part != body[:132]:
            raise RuntimeError(f"{bucket}/{inst.key}: ranged GET returned other bytes")


def ensure_bucket(server: SeaweedServer, bucket: str, n: int, layout: str, method: str = "filer",
                  log=print) -> dict:
    """Make sure `bucket` holds exactly the `n` keys of `layout`; fill it if not.

    A marker file in the server's workdir records a finished fill, so a persistent workdir
    reuses big buckets across invocations.
    """
    marker = server.workdir / f"populated-{bucket}.json"
    if marker.exists():
        info = json.loads(marker.read_text())
        found = count_keys(server, bucket)
        if found == n:
            log(f"bucket {bucket}: reusing {n} keys (filled earlier in {info['seconds']:.0f} s)")
            return info
        log(f"bucket {bucket}: marker says {n} keys but {found} listed; refilling")
    log(f"bucket {bucket}: filling with {n} keys ({layout} layout, {method})")
    seconds = populate(server, bucket, n, layout, method=method, log=log)
    found = count_keys(server, bucket)
    if found != n:
        raise RuntimeError(f"bucket {bucket}: expected {n} keys after filling, listed {found}")
    check_objects(server, bucket, n, layout)
    info = {"bucket": bucket, "keys": n, "layout": layout, "method": method, "seconds": seconds,
            "keys_per_s": n / seconds}
    marker.write_text(json.dumps(info))
    log(f"bucket {bucket}: {n} keys in {seconds:.1f} s ({n / seconds:.0f} keys/s)")
    return info


# -- measuring a command ---------------------------------------------------------------------------
@dataclass
class Measurement:
    cmd: list[str]
    returncode: int
    wall_s: float
    user_s: float
    sys_s: float
    cpu_s: float  # user + sys of the command and every descendant it waited for
    peak_rss_mb: float  # kernel high-water mark of the command's process (GNU time %M)
    peak_tree_rss_mb: float  # sampled (every tree_sample_s) peak of the summed RSS of its process tree
    server_cpu_s: float  # CPU the S3 server used while the command ran
    stdout_lines: int | None = None

    def as_dict(self) -> dict:
        return asdict(self)


def _tree_rss(proc: psutil.Process) -> int:
    total = 0
    try:
        procs = [proc, *proc.children(recursive=True)]
    except psutil.Error:
        return 0
    for p in procs:
        try:
            total += p.memory_info().rss
        except psutil.Error:
            pass
    return total


def _cpu(proc: psutil.Process | None) -> float:
    if proc is None:
        return 0.0
    total = 0.0
    try:
        procs = [proc, *proc.children(recursive=True)]
    except psutil.Error:
        return 0.0
    for p in procs:
        try:
            t = p.cpu_times()
            total += t.user + t.system
        except psutil.Error:
            pass
    return total


def measure(cmd: Sequence[str], env: dict[str, str] | None = None, stdout: str | None = None,
            server_pid: int | None = None, timeout: float = 3600, count_lines: bool = True,
            cwd: str | None = None, tree_sample_s: float = 0.1) -> Measurement:
    """Run `cmd` (under /usr/bin/time), wait for it with wait4, report time, CPU and memory.

    Stdout goes to the file `stdout` (or /dev/null); with `count_lines`, its lines are counted
    afterwards (a listing tool prints one key per line: that checks it listed everything).
    """
    server = psutil.Process(server_pid) if server_pid else None
    # Handles the child writes to while it runs; closed after it is reaped.
    out = open(stdout, "wb") if stdout else open(os.devnull, "wb")  # noqa: SIM115
    err = tempfile.TemporaryFile()  # noqa: SIM115
    # The command runs under GNU time for its peak RSS: a child of this (big) Python process
    # starts life as a copy of it, and the kernel's high-water mark keeps that pre-exec size,
    # so wait4's ru_maxrss would report max(our RSS, the tool's). `time` is ~2 MB.
    timefile = tempfile.NamedTemporaryFile(prefix="time-", delete=False)  # noqa: SIM115 - only its name
    timefile.close()
    full = ([GNU_TIME, "-f", "%M", "-o", timefile.name, *cmd] if GNU_TIME else list(cmd))
    server_before = _cpu(server)
    started = time.perf_counter()
    proc = subprocess.Popen(full, stdout=out, stderr=err, env=env, cwd=cwd)
    ps = psutil.Process(proc.pid)
    peak_tree = 0
    deadline = started + timeout
    next_sample = 0.0
    while True:
        pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
        if pid == proc.pid:
            break
        now = time.perf_counter()
        if now >= next_sample:
            # Walking /proc for the tree is not free (a few ms): sampling every 20 ms cost a
            # quarter of a core, noise on a 2-core machine. The kernel's high-water mark
            # (peak_rss_mb) misses nothing; the tree sample is for multi-process tools.
            peak_tree = max(peak_tree, _tree_rss(ps))
            next_sample = now + tree_sample_s
        if now > deadline:
            proc.kill()
        time.sleep(0.01)
    wall = time.perf_counter() - started
    server_after = _cpu(server)
    proc.returncode = os.waitstatus_to_exitcode(status)
    out.close()
    peak_kb = usage.ru_maxrss
    if GNU_TIME:
        lines = Path(timefile.name).read_text().strip().splitlines()
        # "Command exited with non-zero status N" comes first when it failed.
        if lines and lines[-1].strip().isdigit():
            peak_kb = int(lines[-1])
    os.unlink(timefile.name)
    if proc.returncode != 0:
        err.seek(0)
        tail = err.read()[-3000:].decode(errors="replace")
        print(f"  ! {cmd[0]} exited {proc.returncode}: {tail}", file=sys.stderr)
    err.close()
    lines = None
    if stdout and count_lines:
        with open(stdout, "rb") as fh:
            lines = sum(1 for _ in fh)
    return Measurement(
        cmd=list(cmd), returncode=proc.returncode, wall_s=wall,
        user_s=usage.ru_utime, sys_s=usage.ru_stime, cpu_s=usage.ru_utime + usage.ru_stime,
        peak_rss_mb=peak_kb / 1024, peak_tree_rss_mb=peak_tree / 2**20,
        server_cpu_s=server_after - server_before, stdout_lines=lines,
    )


def versions() -> dict[str, str]:
    """Versions of the server and the tools, for the report."""
    def first_line(cmd: list[str]) -> str:
        try:
            out = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
        except (OSError, subprocess.SubprocessError):
            return "?"
        text = (out.stdout or out.stderr).strip().splitlines()
        return text[0] if text else "?"

    def version(name: str, flag: str = "version") -> str:
        try:
            return first_line([tool(name), flag])
        except SystemExit:  # not installed: a benchmark that does not run it still reports
            return "not installed"

    import platform

    from cloudexit import __version__

    return {
        "cloudexit": __version__,
        "seaweedfs": version("weed"),
        "s5cmd": version("s5cmd"),
        "rclone": version("rclone"),
        "aws": version("aws", "--version"),
        "python": sys.version.split()[0],
        "cpus": str(os.cpu_count()),
        "memory_gb": f"{psutil.virtual_memory().total / 2**30:.0f}",
        "kernel": platform.release(),
    }
