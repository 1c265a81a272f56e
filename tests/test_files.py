"""Reports and manifests name keys and buckets: they are written owner-only, even over an
existing file that was readable by others."""

from __future__ import annotations

import stat
from pathlib import Path

from cloudexit.core.files import write_private


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_new_file_is_0600(tmp_path: Path) -> None:
    target = tmp_path / "plan.html"
    write_private(target, "<p>plan</p>")
    assert target.read_text() == "<p>plan</p>" and _mode(target) == 0o600


def test_existing_world_readable_file_becomes_0600(tmp_path: Path) -> None:
    for durable in (False, True):
        target = tmp_path / f"report-{durable}.md"
        target.write_text("old, much longer content than the new one")
        target.chmod(0o644)
        write_private(target, b"new", durable=durable)
        assert target.read_bytes() == b"new" and _mode(target) == 0o600


def test_durable_write_leaves_no_temp_file(tmp_path: Path) -> None:
    target = tmp_path / "manifest.csv"
    write_private(target, "a,b\n", durable=True)
    assert [p.name for p in tmp_path.iterdir()] == ["manifest.csv"]
