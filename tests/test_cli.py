"""The CLI contract: help everywhere, every command documented, errors mapped in one place."""

from __future__ import annotations

from pathlib import Path

from click.testing import CliRunner

from cloudexit.cli import main

ROOT = Path(__file__).resolve().parents[1]


def test_every_command_has_help_and_is_documented() -> None:
    docs = (ROOT / "README.md").read_text() + "".join(
        p.read_text() for p in sorted((ROOT / "docs").glob("*.md")))
    runner = CliRunner()
    assert runner.invoke(main, ["--help"]).exit_code == 0
    for name, command in main.commands.items():
        assert command.help and len(command.help) > 20, name
        result = runner.invoke(main, [name, "--help"])
        assert result.exit_code == 0 and "Usage:" in result.output, name
        assert f"cloudexit {name}" in docs, f"`cloudexit {name}` is not documented"


def test_usage_error_exit_code() -> None:
    result = CliRunner().invoke(main, ["inventory"])
    assert result.exit_code == 2
    assert "Missing argument" in result.output


def test_traceback_flag_shows_the_stack(tmp_path: Path) -> None:
    runner = CliRunner()
    plain = runner.invoke(main, ["status", "--db", str(tmp_path / "x.db")])
    assert plain.exit_code == 1 and "Traceback" not in plain.output
    loud = runner.invoke(main, ["--traceback", "status", "--db", str(tmp_path / "x.db")])
    assert loud.exception is not None and type(loud.exception).__name__ == "StateError"
