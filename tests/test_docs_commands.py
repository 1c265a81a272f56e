"""Every command shown in README.md and docs/*.md runs, against the embedded SeaweedFS holding a
synthetic PACS (as `cloudexit demo` does), so the docs cannot drift from the tool.

The shown bucket, endpoint, state DB and folders are replaced by the test's; each doc file runs
in a folder of its own (relative paths such as `audit/` stay apart) and shares one state DB, in
the order README.md, then docs/ by name. A line that cannot run here is in ALLOWED, with why.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from cloudexit.testing import synthetic
from cloudexit.testing.s3server import SeaweedServer

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
SHELL = ("bash", "sh", "console", "")  # fenced blocks read as commands (a bare ``` too)

# Lines shown in the docs that this test does not run, each with the reason.
ALLOWED = {
    "python3 -m venv .venv && .venv/bin/pip install -e '.[demo]' && .venv/bin/cloudexit demo":
        "installs into a fresh venv; test_demo.py runs the demo",
    "./scripts/test": "the test suite itself",
    './scripts/test -m "not slow"': "the test suite's fast tier",
    "pip install cloudexit": "installs from PyPI",
    "python3 -m venv .venv && . .venv/bin/activate": "makes a venv; the test runs in one",
    "pip install -e '.[demo]'": "installs the checkout; the test runs from it",
    "export AWS_ACCESS_KEY_ID=... AWS_SECRET_ACCESS_KEY=...": "placeholders for real credentials",
    "cloudexit demo": "test_demo.py runs the demo",
    "cloudexit status --db cloudexit-demo/cloudexit.db": "needs the demo's folder; test_demo.py pastes "
                                                          "every command the demo prints",
    "cloudexit decommission --execute --confirm 3f2a-9c1e-07bd-55e0":
        "an example token; test_decommission.py pastes the command the dry run prints",
    "cloudexit verify [--to DEST]... [--deep] [--sample N] [--seed S] [--calling-aet AET] [--json] [-q]":
        "a synopsis, not a command",
    "cloudexit run playbooks/": "a PACS and the playbook's own cloud; test_playbook_run.py runs every "
                                "playbook end to end, and the rehearsal block in playbooks.md runs here",
}
# What a line may exit with: 0 done, 3 finished with something to review (the synthetic PACS has
# awkward objects that are quarantined, so migrate, audit and the decommission dry run say 3).
DOCUMENTED_EXITS = {0, 3}


def commands(doc: Path) -> list[str | list[str]]:
    """The command lines of a doc's shell blocks; a block that is a script is one item (a list)."""
    out: list[str | list[str]] = []
    blocks: list[tuple[str, str]] = []
    kind: str | None = None  # None: outside a fence
    body: list[str] = []
    for text in doc.read_text().splitlines():
        if text.startswith("```"):
            if kind is None:
                kind, body = text[3:].strip(), []
            else:
                blocks.append((kind, "\n".join(body)))
                kind = None
        elif kind is not None:
            body.append(text)
    for kind, body in blocks:
        if kind not in SHELL:
            continue
        if "<<" in body:  # a here-document: the block runs as one script
            out.append(body.splitlines())
            continue
        for line in body.splitlines():
            line = line.strip()
            if kind == "console":
                if not line.startswith("$ "):
                    continue  # output shown, not a command
                line = line[2:]
            line = re.split(r"\s+#\s", line)[0].strip()
            if line and not line.startswith("#"):
                out.append(line)
    return out


def _allowed(line: str) -> bool:
    return any(line == a or (a.endswith("/") and line.startswith(a)) for a in ALLOWED)


@pytest.mark.slow
def test_every_documented_command_runs(s3: SeaweedServer, bucket: str, tmp_path: Path) -> None:
    synthetic.upload(s3.client(), bucket, synthetic.generate(synthetic.Profile.tiny()))
    db = tmp_path / "state" / "exit.db"
    db.parent.mkdir(mode=0o700)
    env = {**os.environ, **s3.env(), "CLOUDEXIT_DB": str(db),
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
           "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    env.pop("AWS_PROFILE", None)
    swaps = [
        (r"s3://[a-z-]+/[a-z/]*", f"s3://{bucket}/"),
        (r"--endpoint-url https://\S+", f"--endpoint-url {s3.endpoint_url}"),
        (r"--db \S+\.db", f"--db {db}"),
        (r"/srv/pacs-archive", str(tmp_path / "archive")),
        (r"/srv/records/", str(tmp_path / "records") + "/"),
        # The shown timetable pauses weekdays 07:30-19:00; the test runs at any hour.
        (r'--bwlimit "[^"]*"', '--bwlimit off'),
    ]
    ran: list[str] = []
    for doc in DOCS:
        cwd = tmp_path / doc.stem
        cwd.mkdir()
        for item in commands(doc):
            if isinstance(item, list):  # a script: run it as shown, from the checkout
                done = subprocess.run(["bash", "-c", "\n".join(item)], cwd=ROOT, env=env, text=True,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=300)
                shown = f"{doc.name}: script block"
            elif _allowed(item):
                continue
            elif item.startswith("python -c "):  # a one-liner with the library: run it as shown
                done = subprocess.run(["bash", "-c", item], cwd=cwd, env=env, text=True,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=120)
                shown = f"{doc.name}: {item}"
            else:
                assert item.startswith("cloudexit"), f"{doc.name}: not run and not in ALLOWED: {item}"
                line = item
                for pattern, value in swaps:
                    line = re.sub(pattern, value, line)
                if line.startswith("cloudexit plan") and "--provider" not in line:
                    line += " --provider aliyun-oss --region cn-hangzhou"  # as the docs' endpoint implies
                done = subprocess.run([sys.executable, "-m", "cloudexit.cli", *shlex.split(line)[1:]],
                                      cwd=cwd, env=env, text=True, stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, timeout=120)
                shown = f"{doc.name}: {item}\n  ran: {line}"
            assert done.returncode in DOCUMENTED_EXITS, f"{shown}\n{done.stdout}"
            assert "Traceback" not in done.stdout, f"{shown}\n{done.stdout}"
            ran.append(shown)
    assert len(ran) >= 20, ran
