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
