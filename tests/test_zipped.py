"""Zipped studies: zip archives of DICOM files in the bucket (one per study or series, as
teleradiology and vendor archives keep them). Zips are made with Python's zipfile (stored,
deflated, zip64); the inventory reads their directory and members by range, migrate unpacks
each member into STUDY/SERIES/SOP.dcm verified (CRC-32, size, DICOM check; DCMTK's `dcmftest`
checks the files independently), and hostile archives each get one clear reason and lose
nothing."""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import signal
import struct
import subprocess
import sys
import time
import warnings
import zipfile
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from dbutil import rows
from orthanc import OrthancServer, needs

from cloudexit.dicom import zipped
from cloudexit.dicom.zipped import (
    ExtractError,
    ZipProblem,
    extract_member,
    read_directory,
)
from cloudexit.testing import synthetic
from cloudexit.testing.s3server import SeaweedServer


def _instances(n: int = 3, seed: int = 0, matrix: int = 64) -> list[synthetic.SyntheticObject]:
    profile = synthetic.Profile(patients=1, studies_per_patient=1, ct_series_per_study=1,
                                ct_slices_per_series=n, ct_matrix=matrix, cr_per_study=0,
                                multiframe_objects=0, awkward=False, layouts=("uid",), seed=seed)
    return [o for o in synthetic.generate(profile) if o.kind == "dicom"][:n]


def _zip(files: dict[str, bytes], method: int = zipfile.ZIP_DEFLATED, zip64: bool = False) -> bytes:
    """A zip made by zipfile; `zip64`: its zip64 records forced on a small archive (zipfile
    writes them past 4 GiB or 65535 entries: the limits lowered while writing)."""
    buf = io.BytesIO()
    saved = zipfile.ZIP64_LIMIT, zipfile.ZIP_FILECOUNT_LIMIT
    if zip64:
        zipfile.ZIP64_LIMIT, zipfile.ZIP_FILECOUNT_LIMIT = 64, 1
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # duplicate names are made on purpose below
            with zipfile.ZipFile(buf, "w", compression=method) as archive:
                for name, data in files.items():
                    archive.writestr(name.split("\x00")[0], data)  # "a\x00b": a second "a"
    finally:
        zipfile.ZIP64_LIMIT, zipfile.ZIP_FILECOUNT_LIMIT = saved
    return buf.getvalue()


def _dicomdir(objects: list[synthetic.SyntheticObject]) -> bytes:
    """A DICOMDIR indexing `objects`, as a CD/DVD export (and its zip) carries it."""
    import tempfile

    import pydicom
    from pydicom.fileset import FileSet

    fileset = FileSet()
    for o in objects:
        fileset.add(pydicom.dcmread(io.BytesIO(o.body())))
    with tempfile.TemporaryDirectory() as folder:
        fileset.write(folder)
        return (Path(folder) / "DICOMDIR").read_bytes()


def _reader(data: bytes) -> Any:
    return lambda start, end: data[start:end]


def _patch_directory(data: bytes, change: Any) -> bytes:
    """Apply `change(entry: bytearray)` to every central directory entry (and the matching local
    header's flags when it sets the encryption bit), as another tool would have written them."""
    out = bytearray(data)
    pos = out.find(b"PK\x01\x02")
    while pos >= 0:
        entry = out[pos:pos + 46]
        change(entry)
        out[pos:pos + 46] = entry
        local = struct.unpack_from("<L", entry, 42)[0]
        out[local + 6:local + 8] = entry[8:10]
        pos = out.find(b"PK\x01\x02", pos + 46)
    return bytes(out)


def test_read_directory_stored_deflated_zip64() -> None:
    files = {f"study/IM{i:04d}": o.body() for i, o in enumerate(_instances())}
    for method in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED):
        for zip64 in (False, True):
            data = _zip(files, method, zip64)
            if zip64:
                assert b"PK\x06\x06" in data and b"PK\x06\x07" in data
            members, start = read_directory(_reader(data), len(data))
            assert [m.name for m in members] == list(files) and start < len(data)
            for m in members:
                assert m.method == method and m.usize == len(files[m.name])
                assert m.crc == zlib.crc32(files[m.name])
    # a name in the old DOS code page (no UTF-8 flag), as Windows tools write them
    data = _patch_directory(_zip({"Ä/ÖÜ.dcm": files["study/IM0000"]}),
                            lambda e: struct.pack_into("<H", e, 8, struct.unpack_from("<H", e, 8)[0] & ~0x800))
    (m,), _ = read_directory(_reader(data), len(data))
    assert m.nlen == len("Ä/ÖÜ.dcm".encode()) and m.name != "Ä/ÖÜ.dcm"  # read as cp437, kept whole
    # bytes before the archive (a self-extracting stub): offsets count from the archive
    data = b"#!stub\n" * 100 + _zip(files)
    members, _ = read_directory(_reader(data), len(data))
    assert all(data[m.offset:m.offset + 4] == b"PK\x03\x04" for m in members)


def test_hostile_zips_each_get_one_clear_reason() -> None:
    body = _instances(1)[0].body()
    cases = {
        "traversal": (_zip({"../../etc/cron.d/x.dcm": body}), "unsafe member name"),
        "absolute": (_zip({"/etc/x.dcm": body}), "unsafe member name"),
        "duplicate": (_zip({"a.dcm": body, "a.dcm\x00second": body}), "two members named 'a.dcm'"),
        "truncated": (_zip({"a.dcm": body})[:-30], "without its end of central directory"),
        "cut directory": (_zip({"a.dcm": body, "b.dcm": body})[:-60] + _zip({"a.dcm": body})[-22:],
                          "central directory"),
        "encrypted": (_patch_directory(_zip({"a.dcm": body}), lambda e: e.__setitem__(8, e[8] | 1)),
                      "encrypted members"),
        "bzip2": (_patch_directory(_zip({"a.dcm": body}), lambda e: struct.pack_into("<H", e, 10, 12)),
                  "bzip2"),
        # a declared size past deflate's best ratio, and one past the absolute cap
        "ratio bomb": (_patch_directory(_zip({"a.dcm": body}),
                                        lambda e: struct.pack_into("<L", e, 24, 0xFFFFFF00)), "zip bomb"),
    }
    for name, (data, expected) in cases.items():
        with pytest.raises(ZipProblem) as caught:
            read_directory(_reader(data), len(data))
        reason = str(caught.value)
        assert expected in reason and "kept as stored in _quarantine/" in reason, (name, reason)
    # overlapping members: two directory entries pointing at one local header (the trick that
    # multiplies one compressed stream without a high ratio per member)
    data = bytearray(_zip({"a.dcm": body, "b.dcm": body}))
    second = data.find(b"PK\x01\x02", data.find(b"PK\x01\x02") + 4)
    struct.pack_into("<L", data, second + 42, 0)
    with pytest.raises(ZipProblem, match="overlaps"):
        read_directory(_reader(bytes(data)), len(data))
    saved = zipped.MAX_MEMBER
    zipped.MAX_MEMBER = 1000
    try:
        data = _zip({"a.dcm": body})
        with pytest.raises(ZipProblem, match="cap"):
            read_directory(_reader(data), len(data))
    finally:
        zipped.MAX_MEMBER = saved


class _Unseekable(io.RawIOBase):
    """A pipe-like output: zipfile then writes a data descriptor after each member (flag bit 3,
    sizes and CRC zero in the local header), as streaming zip writers do."""

    def __init__(self) -> None:
        self.buf = bytearray()

    def writable(self) -> bool:
        return True

    def write(self, data: Any) -> int:
        self.buf += data
        return len(data)


def test_streamed_zip_with_data_descriptors(tmp_path: Path) -> None:
    bodies = {f"IM{i}": o.body() for i, o in enumerate(_instances(2, seed=3))}
    out = _Unseekable()
    with zipfile.ZipFile(out, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        for name, body in bodies.items():
            with archive.open(name, "w") as member:
                member.write(body)
    data = bytes(out.buf)
    members, _ = read_directory(_reader(data), len(data))
    assert all(struct.unpack_from("<H", data, m.offset + 6)[0] & 0x8 for m in members)
    window = zipped.Window(_reader(data), len(data))
    for m in members:
        assert zipped.member_header(window, m, 8192, 2**20).kind == "dicom"
        raw = tmp_path / "raw"
        raw.write_bytes(data[m.offset:m.end])
        extract_member(str(raw), m, str(tmp_path / m.name))
        assert (tmp_path / m.name).read_bytes() == bodies[m.name]


def test_damaged_zips_never_raise() -> None:
    """Cut or flipped anywhere, a zip is either read or refused with a reason: never an
    exception out of the inventory's header thread."""
    import random

    rng = random.Random(5)
    data = _zip({f"IM{i}": o.body() for i, o in enumerate(_instances(2))}, zip64=True)
    for _ in range(400):
        bad = bytearray(data)
        if rng.random() < 0.3:
            bad = bad[:rng.randrange(len(bad))]
        for _flip in range(rng.randint(1, 4)):
            at = rng.randrange(max(0, len(bad) - 200), len(bad)) if bad and rng.random() < 0.7 \
                else rng.randrange(len(bad) or 1)
            if at < len(bad):
                bad[at] ^= 1 << rng.randrange(8)
        found = zipped.inspect_zip(_reader(bytes(bad)), len(bad), bytes(bad[:4096]), 65536, 2**20)
        assert found.header.kind in ("other", "unreadable") and found.header.encoding == "zip"
        if found.header.kind == "unreadable":
            assert found.header.reason and not found.members


def test_extract_member_checks_crc_size_and_caps_the_output(tmp_path: Path) -> None:
    body = _instances(1)[0].body()
    data = _zip({"a.dcm": body})
    (m,), _ = read_directory(_reader(data), len(data))
    window = zipped.Window(_reader(data), len(data))
    header = zipped.member_header(window, m, 4096, 2**20)
    assert header.kind == "dicom" and header.encoding == "zip" and m.data is not None
    raw = tmp_path / "raw"
    raw.write_bytes(data[m.offset:m.end])
    got = extract_member(str(raw), m, str(tmp_path / "plain"))
    assert (tmp_path / "plain").read_bytes() == body and got.sha256 == hashlib.sha256(body).hexdigest()
    assert got.raw_sha256 == hashlib.sha256(data[m.offset:m.end]).hexdigest()
    assert oct((tmp_path / "plain").stat().st_mode & 0o777) == "0o600"
    for field, value, expected in (("crc", m.crc ^ 1, "CRC-32 mismatch"),
                                   ("usize", m.usize - 100, "decodes to more than"),
                                   ("usize", m.usize + 100, "declares")):
        lying = zipped.Member(**{**m.to_json(), field: value})
        with pytest.raises(ExtractError, match=expected):
            extract_member(str(raw), lying, str(tmp_path / "bad"))
        assert not (tmp_path / "bad").exists()
    raw.write_bytes(data[m.offset:m.end - 50])
    with pytest.raises(ExtractError, match="cut short"):
        extract_member(str(raw), m, str(tmp_path / "bad"))


# -- end to end on SeaweedFS ----------------------------------------------------------------------
@pytest.fixture
def zip_bucket(s3: SeaweedServer, bucket: str) -> Iterator[dict[str, Any]]:
    study_a = _instances(4, seed=11)
    study_b = _instances(3, seed=12, matrix=256)
    study_c = _instances(2, seed=13)
    bad_crc = bytearray(_zip({f"IM{i}": o.body() for i, o in enumerate(study_c)}, zipfile.ZIP_STORED))
    # flip a byte in the first member's pixel data: its CRC-32 no longer matches
    bad_crc[bad_crc.find(b"PK\x03\x04") + 30 + 3 + len(study_c[0].body()) - 10] ^= 0xFF
    objects = {
        "zips/a-deflated.zip": _zip({f"A/IM{i:04d}.dcm": o.body() for i, o in enumerate(study_a)}
                                    | {"A/README.txt": b"exported by a viewer\n",
                                       "A/DICOMDIR": _dicomdir(study_a)}),
        "zips/b-stored-zip64.zip": _zip({f"B/{i}": o.body() for i, o in enumerate(study_b)},
                                        zipfile.ZIP_STORED, zip64=True),
        "zips/c-bad-crc.zip": bytes(bad_crc),
        "zips/hostile.zip": _zip({"../../outside.dcm": study_a[0].body()}),
        "zips/truncated.zip": _zip({"x.dcm": study_a[1].body()})[:-40],
        "plain/one.dcm": _instances(1, seed=14)[0].body(),
    }
    for key, data in objects.items():
        s3.client().put_object(Bucket=bucket, Key=key, Body=data)
    yield {"objects": objects, "a": study_a, "b": study_b, "c": study_c}


def test_status_and_plan_count_zips_and_their_files_once(cli: Any, bucket: str, db: Path,
                                                         zip_bucket: dict[str, Any]) -> None:
    """A file inside a zip has no bytes of its own in the bucket: `status` breaks the DICOM
    files down by their bytes in the zip (not 0 B, and not the zip again), and the plan says
    objects in the bucket and files inside zips apart, with one GET per file instead of the zip."""
    objects = zip_bucket["objects"]
    assert cli("inventory", f"s3://{bucket}", "--db", str(db), "-q").exit_code == 0
    members = rows(db, "SELECT * FROM objects WHERE container IS NOT NULL")
    dicom = [r for r in members if r["kind"] == "dicom"]
    assert {r["modality"] for r in dicom} == {"CT"} and len(dicom) == 9
    ct_bytes = _ct_bytes(objects, dicom)
    status = json.loads(cli("status", "--db", str(db), "--json").output)
    assert status["by_modality"] == [{"name": "CT", "objects": 10, "bytes": ct_bytes}]
    assert sum(y["bytes"] for y in status["by_study_year"]) == ct_bytes
    assert status["bytes"] == sum(map(len, objects.values()))  # each zip counted once
    # the hostile and the cut zip are counted among the zips, and said apart: no files inside
    assert (status["zip_archives"], status["zip_archives_not_unpacked"]) == (5, 2)
    text = cli("status", "--db", str(db)).output
    assert "By modality (DICOM objects, files in zips too, bytes as stored):" in text, text
    assert f"{len(members)} files inside 5 zip archives (2 could not be unpacked)" in text, text

    plan = json.loads(cli("plan", "--db", str(db), "--provider", "aws-s3", "--bandwidth", "100Mbit/s",
                          "--json").output)
    w = plan["workload"]
    assert w["objects"] == len(objects) and w["zip_archives"] == 5 and w["zip_files"] == len(members)
    assert w["zip_archives_not_unpacked"] == 2
    # the three zips read are fetched through their files; the hostile and cut ones whole
    assert w["get_requests"] == len(objects) - 3 + len(members)
    assert w["classes"]["STANDARD"]["objects"] == len(objects)
    en = cli("plan", "--db", str(db), "--provider", "aws-s3", "--bandwidth", "100Mbit/s").output
    assert f"in {len(objects)} objects in the bucket" in en, en
    assert f"{len(members)} files inside 5 zip archives (2 could not be unpacked), one ranged GET each" in en, en
    zh = cli("plan", "--db", str(db), "--provider", "aws-s3", "--bandwidth", "100Mbit/s", "--lang", "zh").output
    assert f"存储桶中 {len(objects)} 个对象" in zh, zh
    assert f"5 个 ZIP 压缩包中的 {len(members)} 个文件（2 个压缩包无法解包）" in zh, zh



def _ct_bytes(objects: dict[str, bytes], dicom: list[Any]) -> int:
    """The bucket's CT bytes as stored: the plain object's, and each zipped file's compressed
    bytes, read from the zips themselves."""
    in_zip: dict[str, int] = {}
    for key in ("zips/a-deflated.zip", "zips/b-stored-zip64.zip", "zips/c-bad-crc.zip"):
        with zipfile.ZipFile(io.BytesIO(objects[key])) as archive:
            in_zip |= {zipped.member_key(key, i.filename): i.compress_size for i in archive.infolist()}
    return len(objects["plain/one.dcm"]) + sum(in_zip[r["key"]] for r in dicom)


def _dcmftest(paths: list[Path]) -> None:
    needs("dcmtk")
    out = subprocess.run(["dcmftest", *map(str, paths)], capture_output=True, text=True, check=False)
    assert out.returncode == 0 and out.stdout.count("yes:") == len(paths), out.stdout


def test_inventory_records_members_and_migrate_unpacks_them(cli: Any, s3: SeaweedServer, bucket: str,
                                                            db: Path, tmp_path: Path,
                                                            zip_bucket: dict[str, Any]) -> None:
    objects = zip_bucket["objects"]
    result = cli("inventory", f"s3://{bucket}", "--db", str(db), "-q")
    assert result.exit_code == 0, result.output
    by_key = {r["key"]: r for r in rows(db, "SELECT * FROM objects")}
    members = [r for r in by_key.values() if r["container"]]
    assert {r["container"] for r in members} == {"zips/a-deflated.zip", "zips/b-stored-zip64.zip",
                                                 "zips/c-bad-crc.zip"}
    expected_sops = {o.sop_uid for o in zip_bucket["a"] + zip_bucket["b"] + zip_bucket["c"]}
    assert {r["sop_uid"] for r in members if r["kind"] == "dicom"} == expected_sops
    readme = by_key["zips/a-deflated.zip!/A/README.txt"]
    assert readme["kind"] == "other" and readme["container"] == "zips/a-deflated.zip"
    dicomdir = by_key["zips/a-deflated.zip!/A/DICOMDIR"]  # the index: not an instance, not damage
    assert dicomdir["kind"] == "other" and "a DICOMDIR" in dicomdir["reason"], dict(dicomdir)
    for key in ("zips/a-deflated.zip", "zips/b-stored-zip64.zip"):
        assert by_key[key]["kind"] == "other" and by_key[key]["encoding"] == "zip"
        assert "recorded as members" in by_key[key]["reason"]
    assert all(r["size"] == 0 and r["etag"] == by_key[r["container"]]["etag"] for r in members)
    hostile, cut = by_key["zips/hostile.zip"], by_key["zips/truncated.zip"]
    assert hostile["kind"] == cut["kind"] == "unreadable"
    assert "unsafe member name" in hostile["reason"] and "end of central directory" in cut["reason"]
    # Never the whole zip for the inventory: its ranged reads stay well under the zips' bytes.
    big = by_key["zips/b-stored-zip64.zip"]
    assert 0 < big["header_bytes"] < big["size"] // 2, dict(big)
    status = json.loads(cli("status", "--db", str(db), "--json").output)
    assert status["dicom_instances"] == len(expected_sops) + 1
    assert status["studies"] == 4
    assert status["objects"] == len(objects) and status["zip_archives"] == 5
    assert status["zip_members"] == len(members) and status["non_dicom"] == 2  # README, DICOMDIR
    # Storage classes are the bucket's objects (a member bills nothing of its own).
    assert status["by_storage_class"] == [{"name": "STANDARD", "objects": len(objects),
                                           "bytes": sum(map(len, objects.values()))}]
    text = cli("status", "--db", str(db)).output
    assert f"files in zips    {len(members):>10}   {len(members)} files inside 5 zip archives" in text, text

    archive = tmp_path / "archive"
    result = cli("migrate", "--to", str(archive), "--db", str(db), "--json")
    assert result.exit_code == 3, result.output  # the hostile, cut and damaged zips: quarantined
    done = {r["key"]: r for r in rows(db, "SELECT t.*, o.sop_uid, o.study_uid, o.series_uid, o.container "
                                          "FROM transfers t JOIN objects o ON o.key = t.key")}
    bodies = {o.sop_uid: o.body() for o in zip_bucket["a"] + zip_bucket["b"] + zip_bucket["c"]}
    placed = []
    for key, r in done.items():
        if not r["container"] or r["sop_uid"] is None or key.startswith("zips/c-bad-crc.zip!/IM0"):
            continue
        assert r["state"] == "verified" and r["encoding"] == "zip", dict(r)
        assert r["path"] == f"{r['study_uid']}/{r['series_uid']}/{r['sop_uid']}.dcm"
        plain = (archive / r["path"]).read_bytes()
        assert plain == bodies[r["sop_uid"]] and r["file_size"] == len(plain)
        assert r["sha256"] == hashlib.sha256(plain).hexdigest() and r["raw_sha256"]
        assert {"if-match-etag", "zip-crc32", "zip-size", "dicom-sop-uid"} <= set(r["checks"].split(","))
        placed.append(archive / r["path"])
    assert len(placed) == len(bodies) - 1
    _dcmftest(placed)
    # The member whose CRC-32 is wrong: quarantined with its bytes as stored, its neighbour fine.
    damaged = done["zips/c-bad-crc.zip!/IM0"]
    assert damaged["state"] == "quarantined" and "CRC-32 mismatch" in damaged["reason"], dict(damaged)
    assert (archive / damaged["path"]).exists()
    assert done["zips/a-deflated.zip!/A/README.txt"]["path"].startswith("_non-dicom/zips/a-deflated.zip!/A/")
    # The zips themselves are not downloaded again (no --keep-containers); hostile ones are kept.
    for key in ("zips/a-deflated.zip", "zips/b-stored-zip64.zip"):
        assert done[key]["state"] == "skipped" and "--keep-containers" in done[key]["reason"]
    for key in ("zips/hostile.zip", "zips/truncated.zip"):
        assert done[key]["state"] == "quarantined"
        assert (archive / done[key]["path"]).read_bytes() == objects[key]
    assert not (tmp_path / "outside.dcm").exists() and not list(tmp_path.rglob("outside.dcm"))
    check = cli("verify", "--db", str(db), "--json")
    assert check.exit_code == 3, check.output  # the damaged member's study is one instance short
    findings = rows(db, "SELECT * FROM verify_findings")
    assert [(f["level"], f["problem"]) for f in findings] == [("study", "count")], [dict(f) for f in findings]

    # Decommission: a zip goes only when every member is verified at every destination.
    dry = json.loads(cli("decommission", "--db", str(db), "--json").output)
    manifest = {r["key"]: r for r in _manifest(dry)}
    assert manifest["zips/a-deflated.zip"]["action"] == "delete"
    assert manifest["zips/b-stored-zip64.zip"]["action"] == "delete"
    assert manifest["zips/c-bad-crc.zip"]["action"] == "keep"
    assert "zipped study: not every file inside is verified" in manifest["zips/c-bad-crc.zip"]["reason"]
    assert manifest["zips/hostile.zip"]["action"] == "keep"
    assert not any("!/" in k for k in manifest)  # members are never sent to the bucket
    # The audit applies the same rule to the zips (one rule for both reports).
    out = tmp_path / "audit"
    assert cli("audit", "--db", str(db), "--out", str(out), "-q").exit_code in (0, 3)
    with open(out / "manifest.csv", newline="") as fh:
        audited = {r["key"]: r for r in csv.DictReader(fh)}
    assert audited["zips/a-deflated.zip"]["decommission"].startswith("safe")
    assert audited["zips/c-bad-crc.zip"]["decommission"] == "keep: zip_members"
    audit = json.loads((out / "audit.json").read_text())
    facts = audit["containers"]
    assert facts["decoded"]["zip"] == len(placed) + 2  # the instances, README and DICOMDIR
    assert facts["stored_in"]["zip"] == 5 and facts["zip_members"] == len(members)
    # The unpacked zips' own rows are not "skipped" exceptions: their files were migrated.
    assert audit["exceptions"]["skipped"]["count"] == 0
    assert audit["exceptions"]["quarantined"]["count"] == 3  # the damaged member, two zips
    # It counts as status and plan do: the bucket's objects, the files inside zips apart (the two
    # zips that could not be unpacked said so), DICOM files by their bytes in the zip, the same
    # words in en and zh (core/i18n.py).
    src, ct_bytes = audit["source"], _ct_bytes(objects, [r for r in members if r["kind"] == "dicom"])
    assert src["objects"] == status["objects"] == len(objects) and src["bytes"] == status["bytes"]
    assert (src["zip_archives"], src["zip_archives_not_unpacked"], src["zip_files"]) == (5, 2, len(members))
    assert src["dicom_objects"] == status["dicom_objects"] and src["dicom_bytes"] == ct_bytes
    assert [(r["name"], r["objects"], r["bytes"]) for r in audit["charts"]["by_modality"]] == [("CT", 10, ct_bytes)]
    assert sum(r["bytes"] for r in audit["charts"]["by_study_year"]) == ct_bytes
    assert f"{len(members)} files inside 5 zip archives (2 could not be unpacked)" in (out / "audit.html").read_text()
    assert cli("audit", "--db", str(db), "--out", str(tmp_path / "zh"), "--lang", "zh", "-q").exit_code in (0, 3)
    assert f"5 个 ZIP 压缩包中的 {len(members)} 个文件（2 个压缩包无法解包）" in (tmp_path / "zh" / "audit.html").read_text()


def _manifest(dry: dict[str, Any]) -> list[dict[str, str]]:
    with open(dry["manifest"], newline="") as fh:
        return list(csv.DictReader(fh))


def test_keep_containers_and_a_changed_zip(cli: Any, s3: SeaweedServer, bucket: str, db: Path,
                                           tmp_path: Path) -> None:
    first = _instances(2, seed=21)
    data = _zip({f"IM{i}": o.body() for i, o in enumerate(first)})
    s3.client().put_object(Bucket=bucket, Key="s.zip", Body=data)
    archive = tmp_path / "archive"
    assert cli("inventory", f"s3://{bucket}", "--db", str(db), "-q").exit_code == 0
    result = cli("migrate", "--to", str(archive), "--db", str(db), "--keep-containers", "-q")
    assert result.exit_code == 0, result.output
    (kept,) = rows(db, "SELECT * FROM transfers WHERE key = 's.zip'")
    assert kept["state"] == "verified" and (archive / kept["path"]).read_bytes() == data
    assert "md5" in kept["checks"]
    # The archive rewrites the zip (one instance more): the next round replaces its members.
    second = first + _instances(1, seed=22)
    s3.client().put_object(Bucket=bucket, Key="s.zip",
                           Body=_zip({f"IM{i}": o.body() for i, o in enumerate(second)}))
    assert cli("inventory", f"s3://{bucket}", "--db", str(db), "-q").exit_code == 0
    members = rows(db, "SELECT * FROM objects WHERE container = 's.zip' AND status = 'present'")
    assert len(members) == 3 and {r["change"] for r in members} == {"changed", "new"}
    assert cli("migrate", "--resume", "--db", str(db), "-q").exit_code == 0
    verified = rows(db, "SELECT t.*, o.sop_uid FROM transfers t JOIN objects o ON o.key = t.key "
                        "WHERE o.container = 's.zip' AND t.state = 'verified'")
    assert {r["sop_uid"] for r in verified} == {o.sop_uid for o in second}
    # A third round with the zip unchanged keeps its members present.
    assert cli("inventory", f"s3://{bucket}", "--db", str(db), "-q").exit_code == 0
    assert len(rows(db, "SELECT 1 FROM objects WHERE container = 's.zip' AND status = 'present'")) == 3


@pytest.mark.slow
def test_kill_9_mid_extraction_then_resume(s3_env: SeaweedServer, bucket: str, db: Path,
                                           tmp_path: Path, fault_proxy: Any) -> None:
    """kill -9 of migrate once some members are committed, then --resume: every member ends
    verified once, with no temp file left, and `dcmftest` takes every file."""
    study = _instances(12, seed=31)
    s3_env.client().put_object(Bucket=bucket, Key="big.zip",
                               Body=_zip({f"IM{i:03d}": o.body() for i, o in enumerate(study)}))
    cmd, at = [sys.executable, "-m", "cloudexit.cli"], ["--db", str(db)]
    subprocess.run(cmd + ["inventory", f"s3://{bucket}", "-q", *at], check=True, timeout=120)
    fault_proxy.delay(0.3, method="GET")
    archive = tmp_path / "archive"
    run = cmd + ["migrate", "--endpoint-url", fault_proxy.endpoint_url, "--processes", "1",
                 "--threads", "2", "-q", *at]
    proc = subprocess.Popen(run + ["--to", str(archive)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    deadline, done = time.monotonic() + 60, 0
    while time.monotonic() < deadline and not done and proc.poll() is None:
        try:
            done = len(rows(db, "SELECT 1 FROM transfers WHERE state = 'verified' AND encoding = 'zip'"))
        except Exception:  # noqa: BLE001 - the tables may not be there yet
            done = 0
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert 0 < done < len(study)
    result = subprocess.run(run + ["--resume"], capture_output=True, text=True, timeout=300, check=False)
    assert result.returncode == 0, result.stderr
    members = rows(db, "SELECT t.*, o.sop_uid FROM transfers t JOIN objects o ON o.key = t.key "
                       "WHERE o.container = 'big.zip'")
    assert len(members) == len(study) and all(r["state"] == "verified" for r in members)
    bodies = {o.sop_uid: o.body() for o in study}
    for r in members:
        assert (archive / r["path"]).read_bytes() == bodies[r["sop_uid"]]
    assert not [p for p in archive.rglob(".cloudexit-*") if not p.name.startswith(".cloudexit-archive")]
    _dcmftest([archive / r["path"] for r in members])


@pytest.mark.slow
@pytest.mark.parametrize("protocol", ["dicom", "dicomweb"])
def test_zipped_study_delivered_to_a_pacs(cli: Any, s3: SeaweedServer, bucket: str, db: Path,
                                          tmp_path: Path, pacs: OrthancServer, protocol: str) -> None:
    """The instances unpacked from a zip reach a real Orthanc (C-STORE or STOW-RS), byte for
    byte the files that went into the zip (but for the file meta the PACS rewrites)."""
    study = _instances(3, seed=41)
    s3.client().put_object(Bucket=bucket, Key="study.zip",
                           Body=_zip({f"DICOM/IM{i}": o.body() for i, o in enumerate(study)}))
    assert cli("inventory", f"s3://{bucket}", "--db", str(db), "-q").exit_code == 0
    target = pacs.dicom_url if protocol == "dicom" else pacs.dicomweb_url
    result = cli("migrate", "--to", str(tmp_path / "archive"), "--to", target, "--db", str(db), "-q")
    assert result.exit_code == 0, result.output
    assert pacs.instance_count() == len(study)
    for o in study:
        assert _dataset(pacs.stored_file(o.sop_uid)) == _dataset(o.body())
    check = cli("verify", "--deep", "--db", str(db), "--json")
    assert check.exit_code == 0, check.output
    assert all(d["status"] == "passed" for d in json.loads(check.output)["destinations"])
    dry = json.loads(cli("decommission", "--db", str(db), "--json").output)
    assert dry["to_delete"] == 1  # the zip: every member verified in the archive and the PACS


def _dataset(data: bytes) -> Any:
    import pydicom

    ds = pydicom.dcmread(io.BytesIO(data))
    del ds.file_meta
    return ds


def test_a_zip_found_after_a_restore_is_read_by_the_next_round(cli: Any, s3: SeaweedServer, bucket: str,
                                                                db: Path) -> None:
    """A zip in an archive storage class is not readable at inventory time; migrate restores it
    and finds a zip (quarantined whole, with the reason that says to run inventory again): the
    next round reads its directory and records its files. (SeaweedFS has no archive class: the
    row is put in the state migrate leaves it in.)"""
    import sqlite3

    from cloudexit.dicom.containers import classify_object

    study = _instances(2, seed=51)
    data = _zip({f"IM{i}": o.body() for i, o in enumerate(study)})
    s3.client().put_object(Bucket=bucket, Key="cold.zip", Body=data)
    assert cli("inventory", f"s3://{bucket}", "--db", str(db), "-q").exit_code == 0
    seen = classify_object("cold.zip", data[:65536], len(data))  # what migrate's inspection says
    assert seen.kind == "unreadable" and "run `cloudexit inventory` again" in str(seen.reason)
    conn = sqlite3.connect(db)
    conn.execute("DELETE FROM objects WHERE container = 'cold.zip'")
    conn.execute("UPDATE objects SET kind = 'unreadable', reason = ? WHERE key = 'cold.zip'", (seen.reason,))
    conn.commit()
    conn.close()
    assert cli("inventory", f"s3://{bucket}", "--db", str(db), "-q").exit_code == 0
    found = rows(db, "SELECT sop_uid FROM objects WHERE container = 'cold.zip' AND status = 'present'")
    assert {r["sop_uid"] for r in found} == {o.sop_uid for o in study}
    (row,) = rows(db, "SELECT kind FROM objects WHERE key = 'cold.zip'")
    assert row["kind"] == "other"


def test_a_member_already_in_place_is_accepted_without_a_get(cli: Any, s3: SeaweedServer, bucket: str,
                                                              db: Path, tmp_path: Path) -> None:
    """Placed, then the run was killed before its commit: --resume accepts the file by its CRC-32,
    size and DICOM check (no GET), and leaves no temp file."""
    import sqlite3

    study = _instances(2, seed=61)
    s3.client().put_object(Bucket=bucket, Key="s.zip", Body=_zip({f"IM{i}": o.body() for i, o in enumerate(study)}))
    archive = tmp_path / "archive"
    assert cli("inventory", f"s3://{bucket}", "--db", str(db), "-q").exit_code == 0
    assert cli("migrate", "--to", str(archive), "--db", str(db), "-q").exit_code == 0
    conn = sqlite3.connect(db)
    conn.execute("UPDATE transfers SET state = 'fetching', raw_sha256 = NULL WHERE key = 's.zip!/IM0'")
    conn.execute("UPDATE migration_runs SET status = 'interrupted'")
    conn.commit()
    conn.close()
    gets = rows(db, "SELECT sum(get_requests) AS n FROM migration_runs")[0]["n"]
    assert cli("migrate", "--resume", "--db", str(db), "-q").exit_code == 0
    (row,) = rows(db, "SELECT * FROM transfers WHERE key = 's.zip!/IM0'")
    assert row["state"] == "verified" and row["raw_sha256"] is None and "zip-crc32" in row["checks"]
    assert rows(db, "SELECT sum(get_requests) AS n FROM migration_runs")[0]["n"] == gets
    assert not list(archive.rglob(".cloudexit-*.part*"))


@pytest.mark.parametrize("later", [False, True], ids=["same-round", "next-round"])
def test_a_bucket_key_spelled_like_a_member_never_takes_its_place(cli: Any, s3: SeaweedServer, bucket: str,
                                                                 db: Path, tmp_path: Path,
                                                                 later: bool) -> None:
    """S3 keys may hold '!': a bucket object `s.zip!/IM0` has the name the zip's member IM0 is
    recorded under. The object stays an object of its own (copied from the bucket), and the zip
    is refused with the reason (kept as stored), whichever was inventoried first."""
    study = _instances(2, seed=31)
    (other,) = _instances(1, seed=32)
    put = s3.client().put_object
    put(Bucket=bucket, Key="s.zip", Body=_zip({f"IM{i}": o.body() for i, o in enumerate(study)}))
    if later:
        assert cli("inventory", f"s3://{bucket}", "--db", str(db), "-q").exit_code == 0
        assert len(rows(db, "SELECT 1 FROM objects WHERE container = 's.zip' AND status = 'present'")) == 2
    put(Bucket=bucket, Key="s.zip!/IM0", Body=other.body())
    assert cli("inventory", f"s3://{bucket}", "--db", str(db), "-q").exit_code == 0
    by_key = {r["key"]: r for r in rows(db, "SELECT * FROM objects")}
    mine = by_key["s.zip!/IM0"]
    assert (mine["container"], mine["member"], mine["kind"], mine["sop_uid"], mine["size"]) == (
        None, None, "dicom", other.sop_uid, len(other.body())), dict(mine)
    assert by_key["s.zip"]["kind"] == "unreadable" and "s.zip!/IM0" in by_key["s.zip"]["reason"]
    assert not rows(db, "SELECT 1 FROM objects WHERE container = 's.zip' AND status = 'present'")
    result = cli("migrate", "--to", str(tmp_path / "archive"), "--db", str(db), "-q")
    states = {r["key"]: r["state"] for r in rows(db, "SELECT key, state FROM transfers")}
    assert result.exit_code == 3 and states["s.zip!/IM0"] == "verified", (result.output, states)
    assert states["s.zip"] == "quarantined", states
    # Once the object is gone (the round after the one that no longer lists it), the zip's
    # files are read again.
    s3.client().delete_object(Bucket=bucket, Key="s.zip!/IM0")
    for _round in range(2):
        assert cli("inventory", f"s3://{bucket}", "--db", str(db), "-q").exit_code == 0
    present = rows(db, "SELECT sop_uid FROM objects WHERE container = 's.zip' AND status = 'present'")
    assert {r["sop_uid"] for r in present} == {o.sop_uid for o in study}
