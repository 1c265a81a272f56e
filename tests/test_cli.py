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


def test_a_number_option_refuses_nan(tmp_path: Path) -> None:
    """click's FloatRange lets "nan" through; a NaN PACS timeout made a PACS that is up look down."""
    runner = CliRunner()
    for args in (["migrate", "--to", str(tmp_path / "a"), "--dimse-timeout", "nan"],
                 ["verify", "--http-timeout", "NaN"], ["migrate", "--resume", "--restore-poll", "nan"],
                 ["plan", "--measure-seconds", "nan"]):
        result = runner.invoke(main, [*args, "--db", str(tmp_path / "x.db")])
        assert result.exit_code == 2 and "is not a number" in result.output, (args, result.output)


def test_traceback_flag_shows_the_stack(tmp_path: Path) -> None:
    runner = CliRunner()
    plain = runner.invoke(main, ["status", "--db", str(tmp_path / "x.db")])
    assert plain.exit_code == 1 and "Traceback" not in plain.output
    loud = runner.invoke(main, ["--traceback", "status", "--db", str(tmp_path / "x.db")])
    assert loud.exception is not None and type(loud.exception).__name__ == "StateError"


def test_every_command_help_shows_examples_that_parse() -> None:
    """Each command's --help ends in 1-3 examples, and each example is a valid command line."""
    import shlex

    import click

    from cloudexit.cli import EXAMPLES, main as cli_main

    commands = {name: cmd for name, cmd in cli_main.commands.items()}
    assert set(commands) == {"inventory", "status", "plan", "migrate", "verify", "audit", "run",
                             "decommission", "demo", "link-report", "serve"}
    for name in [*commands, "audit verify"]:
        shown = CliRunner().invoke(cli_main, [*name.split(), "--help"]).output
        assert "Examples:\n    cloudexit " in shown, name
    for key, lines in EXAMPLES.items():
        assert 1 <= len(lines) <= 3, key
        for line in lines:
            args = shlex.split(line.split("  #")[0])[1:]
            assert args[0] == {"run_playbook": "run", "audit_verify": "audit"}.get(key, key), line
            with click.Context(cli_main, info_name="cloudexit") as parent:
                group: click.Group = cli_main
                cmd = group.commands[args[0]]
                rest = args[1:]
                if isinstance(cmd, click.Group) and rest and rest[0] in cmd.commands:
                    cmd, rest = cmd.commands[rest[0]], rest[1:]
                cmd.make_context(args[0], rest, parent=parent)  # raises on an unknown option


def test_timetable_syntax_is_in_the_help() -> None:
    from cloudexit.cli import main as cli_main

    for command, option in (("migrate", "--bwlimit"), ("plan", "--schedule")):
        text = " ".join(CliRunner().invoke(cli_main, [command, "--help"]).output.split())
        assert option in text and "0 19:00,off" in text
        assert ("nothing (0)" in text and "without limit (off)" in text) or ("0 pauses, off means no limit" in text)
