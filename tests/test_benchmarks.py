"""The shaped-link benchmark runs end to end on a tiny set (its figures are not checked here:
benchmarks are measured side by side, never timed in tests)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))


@pytest.mark.slow
def test_link_benchmark_quick(tmp_path: Path) -> None:
    from netlink import can_shape

    why = can_shape()
    if why:
        pytest.skip(f"benchmarks/link.py {why}")
    bin_dir = Path(sys.executable).parent
    tools = ["cloudexit"] + [t for t in ("s5cmd", "rclone") if (bin_dir / t).exists()]
    out = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "link.py"), "--quick", "--tools", *tools,
         "--workdir", str(tmp_path / "work"), "--json", str(tmp_path / "r.json")],
        capture_output=True, text=True, timeout=600,
        env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    assert "| tiny | 500mbit | cloudexit |" in out.stdout
    assert (tmp_path / "r.json").exists()


@pytest.mark.slow
def test_inventory_benchmark_headers_and_startup(tmp_path: Path) -> None:
    """benchmarks/inventory.py, pinned, on a tiny header-read bucket against s5cmd cp, with the
    start-up probe: runs end to end and every run passes its completeness check."""
    import json

    bin_dir = Path(sys.executable).parent
    if not (bin_dir / "s5cmd").exists() or (os.cpu_count() or 1) < 2:
        pytest.skip("needs s5cmd and two cores")
    out = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "inventory.py"), "--keys", "0", "--layout", "flat",
         "--header-keys", "20", "--tools", "cloudexit-headers,s5cmd-cp", "--repeat", "1", "--pin",
         "--startup", "1", "--workdir", str(tmp_path / "work"), "--out", str(tmp_path / "r.json")],
        capture_output=True, text=True, timeout=600, check=False,
        env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    result = json.loads((tmp_path / "r.json").read_text())
    assert result["pinned"] and {r["tool"] for r in result["runs"]} == {"cloudexit-headers", "s5cmd-cp"}
    assert all(r["ok"] for r in result["runs"]), [r["check"] for r in result["runs"]]
    rows = {r["what"]: r for r in result["startup"]}
    assert rows["cloudexit inventory (1 object)"]["first_get_s"] is not None
    assert rows["cloudexit migrate (1 object)"]["first_get_s"] is not None
    assert "| cloudexit inventory (1 object) |" in out.stdout
