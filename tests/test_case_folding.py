"""Destinations that fold case (exFAT here, as on USB disks; SMB shares, macOS, ext4 casefold
alike) or normalise Unicode: two keys that name one file there are a collision, quarantined,
never one written over the other."""

from __future__ import annotations

import os
import shutil
import subprocess
import unicodedata
from collections.abc import Iterator
from pathlib import Path

import pytest
from dbutil import rows

from cloudexit.stores import filesystem
from cloudexit.stores.filesystem import probe_folding


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, capture_output=True, text=True, timeout=60)


@pytest.fixture
def exfat(tmp_path: Path) -> Iterator[Path]:
    """A real exFAT filesystem (mkfs.exfat on a loop image, mounted with exfat-fuse)."""
    if os.geteuid() != 0:
        pytest.skip("mounting a loop image needs root")
    missing = [t for t in ("mkfs.exfat", "mount.exfat-fuse", "losetup") if not shutil.which(t)]
    if missing:
        pytest.skip(f"no case-folding filesystem to mount: {', '.join(missing)} not installed "
                    "(apt-get install exfatprogs exfat-fuse)")
    if not os.path.exists("/dev/fuse"):
        pytest.skip("no /dev/fuse: exfat-fuse cannot mount here")
    image, mnt = tmp_path / "exfat.img", tmp_path / "mnt"
    with open(image, "wb") as fh:
        fh.truncate(32 * 2**20)
    mnt.mkdir()
    made = _run("mkfs.exfat", str(image))
    if made.returncode:
        pytest.skip(f"mkfs.exfat failed: {made.stderr.strip()}")
    loop = _run("losetup", "-f", "--show", str(image))
    if loop.returncode:
        pytest.skip(f"no loop device: {loop.stderr.strip()}")
    device = loop.stdout.strip()
    try:
        mounted = _run("mount.exfat-fuse", device, str(mnt))
        if mounted.returncode:
            pytest.skip(f"cannot mount exFAT: {mounted.stderr.strip()}")
        try:
            yield mnt
        finally:
            _run("umount", str(mnt))
    finally:
        _run("losetup", "-d", device)


def _bucket(s3, name: str, objects: dict[str, bytes]) -> None:
    client = s3.client()
    client.create_bucket(Bucket=name)
    for key, body in objects.items():
        client.put_object(Bucket=name, Key=key, Body=body)


def _migrate_and_check(cli, db: Path, dest: Path, objects: dict[str, bytes], bucket: str) -> list:
    assert cli("inventory", f"s3://{bucket}", "--db", str(db), "-q").exit_code == 0
    result = cli("migrate", "--to", str(dest), "--db", str(db))
    assert result.exit_code == 3, result.output  # finished, one object in quarantine
    t = {r["key"]: r for r in rows(db, "SELECT * FROM transfers")}
    for key, body in objects.items():  # every object's bytes are in the archive, none lost
        assert (dest / t[key]["path"]).read_bytes() == body, key
    quarantined = [r for r in t.values() if r["state"] == "quarantined"]
    assert len(quarantined) == 1
    assert quarantined[0]["path"].startswith("_quarantine/case-collisions/")
    assert "letter case or Unicode form" in quarantined[0]["reason"]
    return quarantined


@pytest.mark.slow
def test_exfat_folds_case_and_nothing_is_overwritten(cli, s3, exfat: Path, tmp_path: Path) -> None:
    assert probe_folding(str(exfat)) == (True, False)
    assert probe_folding(str(tmp_path)) == (False, False)
    objects = {"notes/Report.txt": b"the first report", "notes/report.txt": b"another report, longer"}
    bucket = f"fold-{os.getpid()}"
    _bucket(s3, bucket, objects)
    dest = exfat / "archive"
    quarantined = _migrate_and_check(cli, tmp_path / "s.db", dest, objects, bucket)
    assert quarantined[0]["key"] == "notes/report.txt"  # the second in key order
    check = cli("verify", "--db", str(tmp_path / "s.db"))
    assert check.exit_code == 0, check.output


@pytest.mark.slow
def test_unicode_normalising_destination_double(cli, s3, tmp_path: Path, monkeypatch) -> None:
    """No filesystem here normalises names (macOS and some SMB servers do): a store double whose
    probe says it does stands in, named as such. NFC and NFD spellings of one name collide."""
    monkeypatch.setattr(filesystem, "probe_folding", lambda folder: (False, True))
    nfc = unicodedata.normalize("NFC", "caf\u00e9.txt")
    nfd = unicodedata.normalize("NFD", nfc)
    objects = {nfc: b"nfc", nfd: b"nfd spelling"}
    bucket = f"nfd-{os.getpid()}"
    _bucket(s3, bucket, objects)
    _migrate_and_check(cli, tmp_path / "s.db", tmp_path / "archive", objects, bucket)
