"""`cloudexit demo` as a newcomer runs it: the commands it echoes can be pasted, Ctrl-C says the
right thing."""

from __future__ import annotations

import os
import shlex
import signal
import subprocess
import sys
from pathlib import Path

import pytest


def _cloudexit(*args: str, cwd: Path) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-m", "cloudexit.cli", *args], cwd=cwd, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=dict(os.environ))


@pytest.mark.slow
def test_the_commands_it_echoes_can_be_pasted(tmp_path: Path) -> None:
    proc = _cloudexit("demo", "--size", "tiny", cwd=tmp_path)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out
    echoed = [line[2:] for line in out.splitlines() if line.startswith("$ cloudexit ")]
    assert len(echoed) >= 5, out
    for line in echoed:
        args = shlex.split(line)[1:]
        assert "--db" in args, line
        if args[0] in ("inventory", "migrate"):
            continue  # they talk to the demo's S3 server, which stops when the demo ends
        pasted = _cloudexit(*args, cwd=tmp_path)
        text, _ = pasted.communicate(timeout=120)
        # 3: finished with exceptions to review (the demo's awkward objects), as the demo says.
        assert pasted.returncode in (0, 3), f"{line}\n{text}"
        assert "Traceback" not in text and "no state database" not in text


@pytest.mark.slow
def test_ctrl_c_says_the_demo_starts_afresh(tmp_path: Path) -> None:
    proc = _cloudexit("demo", "--size", "tiny", cwd=tmp_path)
    assert proc.stdout is not None
    for line in proc.stdout:  # interrupt once the inventory has started
        if line.startswith("$ cloudexit inventory"):
            proc.send_signal(signal.SIGINT)
            break
    rest = proc.stdout.read()
    proc.wait(timeout=60)
    assert proc.returncode == 130, rest
    assert "starts afresh" in rest and "run the same command again" not in rest
    assert "Traceback" not in rest


def test_a_ctrl_c_met_inside_exec_still_exits_130(tmp_path: Path) -> None:
    """A Ctrl-C that lands while a dataclass is being made (an exec() of a string, during a lazy
    import) and that the command catches must end with 130, not by SIGINT: it did under
    `python -m` (the demo's Ctrl-C test failed so, once in CI and 3 in 8 runs on a loaded
    machine). The stand-in command raises the KeyboardInterrupt in exec'd code itself, as the
    signal handler does there, so the test needs no timing."""
    (tmp_path / "interrupted_cli.py").write_text(
        "from cloudexit.cli import main\n\n"
        "@main.command('interrupted-in-exec')\n"
        "def interrupted() -> None:\n"
        "    exec('raise KeyboardInterrupt')\n\n"
        "main()\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), *sys.path])}
    done = subprocess.run([sys.executable, "-m", "interrupted_cli", "interrupted-in-exec"], cwd=tmp_path,
                          env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 130, (done.returncode, done.stderr)
    assert "Interrupted." in done.stderr and "Traceback" not in done.stderr


def test_a_ctrl_c_met_while_a_class_is_made_is_no_traceback(tmp_path: Path) -> None:
    """Python 3.11 turns a KeyboardInterrupt raised in a class's `__set_name__` (a dataclass's
    fields, while a module is imported lazily) into a RuntimeError: it was a traceback, seen
    when the demo's Ctrl-C landed in `import cloudexit.inventory`. The stand-in raises it there."""
    (tmp_path / "interrupted_cli.py").write_text(
        "from cloudexit.cli import main\n\n"
        "class Field:\n"
        "    def __set_name__(self, owner: type, name: str) -> None:\n"
        "        raise KeyboardInterrupt\n\n"
        "@main.command('interrupted-in-class')\n"
        "def interrupted() -> None:\n"
        "    type('Summary', (), {'failed': Field()})\n\n"
        "main()\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), *sys.path])}
    done = subprocess.run([sys.executable, "-m", "interrupted_cli", "interrupted-in-class"], cwd=tmp_path,
                          env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 130, (done.returncode, done.stderr)
    assert "Interrupted." in done.stderr and "Traceback" not in done.stderr
