"""How fast a migrate worker decodes Orthanc-compressed instances (one core), against the link.

    PYTHONPATH=. /work/main/.venv/bin/python benchmarks/decode.py --instances 200 --matrix 512

Makes N synthetic CT slices (512x512 16-bit: ~0.5 MB each), puts a CT-like phantom in their
pixels (the synthetic pixels are noise, which does not compress), compresses each as Orthanc's
`StorageCompression` does (8-byte size + zlib at its default level), writes them to a tmpfs
folder, then times `cloudexit.containers.decode_file` over all of them on one thread (what one
worker thread does after the raw object's checksums passed: inflate, Adler-32, declared size,
SHA-256 of the plain file, write), without fsync, so the figure is CPU only. Prints MB/s of
compressed input and of decoded output, and the link each core keeps up with.

    PYTHONPATH=. /work/main/.venv/bin/python benchmarks/decode.py --instances 200 --zip

also zips the same instances (deflate, as `zipfile` writes it) and times
`cloudexit.dicom.zipped.extract_member` over each member's bytes as a worker fetched them (local
header check, inflate capped at the declared size, CRC-32, SHA-256 of the plain file and of the
bytes as stored, write), on one thread, without fsync.

    PYTHONPATH=. /work/main/.venv/bin/python benchmarks/decode.py --instances 1000 --migrate

also puts the same N instances into two buckets of a local SeaweedFS, as plain `.dcm` objects
and as Orthanc-compressed `{uuid}.dcm` ones, and times `cloudexit migrate` of each (after its
inventory) into a fresh folder: wall, CPU of migrate and its workers, peak RSS, the S3 server's CPU.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import struct
import sys
import tempfile
import time
import zlib
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from cloudexit.testing import synthetic  # noqa: E402
from cloudexit.dicom.containers import decode_file  # noqa: E402


def _phantom(matrix: int) -> bytes:
    """A CT-like slice: air around a body disc of smooth tissue with noise (12 bits in 16)."""
    import array
    import math
    import random

    rng = random.Random(0)
    values = array.array("H")
    for row in range(matrix):
        y = row / matrix - 0.5
        for col in range(matrix):
            x = col / matrix - 0.5
            inside = x * x + y * y < 0.2
            values.append(int(1000 + 60 * math.cos(8 * x) + rng.gauss(0, 12)) if inside else 0)
    if sys.byteorder == "big":
        values.byteswap()
    return values.tobytes()


def end_to_end(profile: synthetic.Profile, phantom: bytes) -> None:
    import uuid

    from common import measure

    from cloudexit.testing.s3server import SeaweedServer

    with tempfile.TemporaryDirectory() as tmp, SeaweedServer(Path(tmp) / "s3") as server:
        client = server.client()
        for bucket in ("plain", "orthanc"):
            client.create_bucket(Bucket=bucket)
        for obj in synthetic.generate(profile):
            body = obj.body()[:-len(phantom)] + phantom
            client.put_object(Bucket="plain", Key=f"{uuid.uuid4()}.dcm", Body=body)
            client.put_object(Bucket="orthanc", Key=f"{uuid.uuid4()}.dcm",
                              Body=struct.pack("<Q", len(body)) + zlib.compress(body))
        env = {**os.environ, **server.env(), "PYTHONPATH": str(REPO)}
        cli = [sys.executable, "-m", "cloudexit.cli"]
        for bucket in ("plain", "orthanc"):
            db, dest = Path(tmp) / f"{bucket}.db", Path(tmp) / f"{bucket}-archive"
            inv = measure([*cli, "inventory", f"s3://{bucket}", "--db", str(db), "-q"], env=env)
            assert inv.returncode == 0, inv
            os.sync()
            run = measure([*cli, "migrate", "--to", str(dest), "--db", str(db), "-q"], env=env,
                          server_pid=server.proc.pid)
            assert run.returncode == 0, run
            print(f"migrate {bucket:8}: wall {run.wall_s:.2f} s, CPU {run.cpu_s:.2f} s, "
                  f"peak RSS {run.peak_tree_rss_mb:.0f} MB (tree), "
                  f"S3 server CPU {run.server_cpu_s:.2f} s")


def unzip(profile: synthetic.Profile, phantom: bytes, folder: str | None) -> None:
    """Time `extract_member` over every member of one zip of the instances (one core)."""
    import zipfile

    from cloudexit.dicom.zipped import Window, extract_member, member_header, read_directory

    with tempfile.TemporaryDirectory(dir=folder) as tmp:
        archive = Path(tmp) / "study.zip"
        with zipfile.ZipFile(archive, "w", compression=zipfile.ZIP_DEFLATED) as out:
            for n, obj in enumerate(synthetic.generate(profile)):
                out.writestr(f"IM{n:05d}", obj.body()[:-len(phantom)] + phantom)
        data = archive.read_bytes()
        members, _ = read_directory(lambda a, b: data[a:b], len(data))
        window = Window(lambda a, b: data[a:b], len(data))
        raws = []
        for m in members:
            member_header(window, m, 8192, 2**20)
            raw = Path(tmp) / f"{m.name}.raw"
            raw.write_bytes(data[m.offset:m.end])
            raws.append((m, str(raw)))
        stored = sum(m.end - m.offset for m in members)
        plain = sum(m.usize for m in members)
        out_path = str(Path(tmp) / "out.dcm")
        cpu0 = time.process_time()
        for m, raw in raws:
            extract_member(raw, m, out_path, fsync=False)
        cpu = time.process_time() - cpu0
    print(f"zip: {len(members)} members, {stored / 1e6:.1f} MB as stored -> {plain / 1e6:.1f} MB; "
          f"extract_member CPU {cpu:.2f} s: {stored / cpu / 1e6:.0f} MB/s in, {plain / cpu / 1e6:.0f} "
          f"MB/s out per core ({stored * 8 / cpu / 1e9:.2f} Gbit/s of link per core)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--instances", type=int, default=200)
    parser.add_argument("--matrix", type=int, default=512)
    parser.add_argument("--dir", default="/dev/shm" if os.path.isdir("/dev/shm") else None)
    parser.add_argument("--migrate", action="store_true", help="also time migrate, plain vs compressed")
    parser.add_argument("--zip", action="store_true", help="also time unpacking the instances from a zip")
    args = parser.parse_args()
    profile = synthetic.Profile.ct_bench(args.instances, matrix=args.matrix)
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        raws, raw_bytes, plain_bytes = [], 0, 0
        phantom = _phantom(args.matrix)
        for n, obj in enumerate(synthetic.generate(profile)):
            # Real CT compresses (air, smooth tissue); the synthetic pixels are noise.
            body = obj.body()[:-len(phantom)] + phantom
            packed = struct.pack("<Q", len(body)) + zlib.compress(body)
            path = Path(tmp) / f"{n}.raw"
            path.write_bytes(packed)
            raws.append(str(path))
            raw_bytes += len(packed)
            plain_bytes += len(body)
        out = str(Path(tmp) / "out.dcm")
        cpu0, wall0 = time.process_time(), time.perf_counter()
        for path in raws:
            decode_file("orthanc-zlib", path, out, fsync=False)
        cpu, wall = time.process_time() - cpu0, time.perf_counter() - wall0
        inflate0 = time.process_time()
        for path in raws:
            zlib.decompress(Path(path).read_bytes()[8:])
        inflate = time.process_time() - inflate0
        hashed0 = time.process_time()
        for path in raws:
            hashlib.sha256(zlib.decompress(Path(path).read_bytes()[8:]))
        hashed = time.process_time() - hashed0
    print(f"{len(raws)} instances, {raw_bytes / 1e6:.1f} MB compressed -> {plain_bytes / 1e6:.1f} MB "
          f"(ratio {plain_bytes / raw_bytes:.2f})")
    print(f"wall {wall:.2f} s, CPU {cpu:.2f} s: {raw_bytes / cpu / 1e6:.0f} MB/s compressed in, "
          f"{plain_bytes / cpu / 1e6:.0f} MB/s decoded out per core "
          f"({raw_bytes * 8 / cpu / 1e9:.2f} Gbit/s of link per core)")
    if args.zip:
        unzip(profile, phantom, args.dir)
    if args.migrate:
        end_to_end(profile, _phantom(args.matrix))
    print(f"of which zlib inflate alone: {plain_bytes / inflate / 1e6:.0f} MB/s decoded; inflate + "
          f"SHA-256: {plain_bytes / hashed / 1e6:.0f} MB/s")


if __name__ == "__main__":
    main()
