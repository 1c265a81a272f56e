"""Playbook files: the shipped ones load, and every mistake is named with its line."""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner

from cloudexit.cli import main
from cloudexit.core.errors import PlaybookError
from cloudexit.playbook import load

PLAYBOOKS = Path(__file__).resolve().parent.parent / "playbooks"
SHIPPED = ("branch-hospital-pacs", "aws-s3-exit", "orthanc-object-storage", "dcm4chee-s3")

GOOD = """\
playbook: 1
name: t
source:
  url: s3://bucket/prefix
  endpoint: ${ENDPOINT:-http://127.0.0.1:8333}
targets: [archive]
verification:
  sample: 2
steps:
  - inventory
  - migrate:
      order: oldest
  - verify
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "pb.yaml"
    path.write_text(text)
    return path


def error(tmp_path: Path, text: str, *overrides: str, env: dict[str, str] | None = None) -> str:
    with pytest.raises(PlaybookError) as info:
        load(write(tmp_path, text), overrides, env=env or {})
    return str(info.value)


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_playbooks_load(name: str) -> None:
    pb = load(PLAYBOOKS / f"{name}.yaml", env={})
    assert pb.name == name
    kinds = [s.kind for s in pb.steps]
    order = [kinds.index(k) for k in ("inventory", "pilot", "migrate", "delta", "verify", "audit", "decommission")]
    assert order == sorted(order) and order[0] == 0
    text = (PLAYBOOKS / f"{name}.yaml").read_text()
    assert text.startswith("#") and "docs/playbooks.md" in text


def test_defaults_environment_and_set(tmp_path: Path) -> None:
    pb = load(write(tmp_path, GOOD), env={})
    assert pb.source["endpoint"] == "http://127.0.0.1:8333" and pb.source["retries"] == 5
    assert pb.targets == [str(tmp_path / "archive")]
    assert pb.step("migrate").opt("order") == "oldest" and pb.verification["sample"] == 2
    pb = load(write(tmp_path, GOOD), ["source.url=s3://other", "verification.deep=true", "steps.1.migrate.threads=2"],
              env={"ENDPOINT": "http://10.0.0.1:9000"})
    assert pb.source["endpoint"] == "http://10.0.0.1:9000" and pb.source["url"] == "s3://other"
    assert pb.verification["deep"] is True and pb.step("migrate").opt("threads") == 2


def test_unknown_key_names_it_and_its_line(tmp_path: Path) -> None:
    text = GOOD.replace("  sample: 2\n", "  sample: 2\n  smaple: 3\n")
    assert error(tmp_path, text).startswith(f"{tmp_path / 'pb.yaml'}, line 9: unknown key 'verification.smaple'")
    text = GOOD.replace("      order: oldest\n", "      order: oldest\n      speed: fast\n")
    assert "line 13: unknown key 'steps.migrate.speed'" in error(tmp_path, text)


def test_wrong_type_names_the_field_and_its_line(tmp_path: Path) -> None:
    text = GOOD.replace("  sample: 2", "  sample: lots")
    assert "line 8: field 'verification.sample' must be a whole number >= 0, not 'lots'" in error(tmp_path, text)
    text = GOOD.replace("order: oldest", "order: random")
    assert "line 12: field 'steps.migrate.order' must be one of newest, oldest, key, not 'random'" in error(tmp_path, text)
    text = GOOD.replace("targets: [archive]", "targets: {a: 1}")
    assert "line 6: field 'targets' must be a string or a list of strings" in error(tmp_path, text)
    assert "--set verification.deep: field 'verification.deep' must be true or false" in error(
        tmp_path, GOOD, "verification.deep=maybe")


def test_missing_field_names_it_and_the_line_of_its_parent(tmp_path: Path) -> None:
    text = GOOD.replace("  url: s3://bucket/prefix\n", "")
    assert "line 4: missing field 'source.url'" in error(tmp_path, text)
    text = GOOD.replace("name: t\n", "")
    assert "line 1: missing field 'name'" in error(tmp_path, text)
    text = GOOD + "  - audit\n"
    assert "line 14: missing field 'steps.audit.out'" in error(tmp_path, text)


def test_steps_and_values_are_checked(tmp_path: Path) -> None:
    assert "line 13: unknown step 'verfiy'" in error(tmp_path, GOOD.replace("  - verify", "  - verfiy"))
    assert "line 14: two steps named 'verify'" in error(tmp_path, GOOD + "  - verify\n")
    assert "must be s3://BUCKET" in error(tmp_path, GOOD.replace("s3://bucket/prefix", "bucket"))
    assert "field 'playbook' must be 1" in error(tmp_path, GOOD.replace("playbook: 1", "playbook: 2"))
    assert "line 5: environment variable NOPE is not set" in error(
        tmp_path, GOOD.replace("${ENDPOINT:-http://127.0.0.1:8333}", "${NOPE}"))
    assert "not valid YAML" in error(tmp_path, "a: [")


def test_cli_reports_a_bad_playbook_with_exit_2(tmp_path: Path) -> None:
    path = write(tmp_path, GOOD.replace("  sample: 2", "  sample: lots"))
    result = CliRunner().invoke(main, ["run", str(path), "--db", str(tmp_path / "x.db")])
    assert result.exit_code == 2
    assert "line 8: field 'verification.sample' must be a whole number" in result.output
    assert "hint: see docs/playbooks.md" in result.output


def test_dry_run_prints_every_step_and_changes_nothing(tmp_path: Path) -> None:
    db = tmp_path / "state.db"
    result = CliRunner().invoke(main, ["run", str(PLAYBOOKS / "aws-s3-exit.yaml"), "--db", str(db), "--dry-run"])
    assert result.exit_code == 0, result.output
    assert not db.exists()
    lines = result.output.splitlines()
    assert lines[0] == f"Playbook aws-s3-exit on {db} (dry run: nothing changes)"
    assert [line.split()[1] for line in lines[1:]] == [
        "inventory", "plan", "exit-approval", "pilot", "migrate", "delta", "verify", "audit", "decommission",
        "request-credit"]
    assert "wait for `--ack exit-approval`" in result.output and "--confirm TOKEN" in result.output
    result = CliRunner().invoke(main, ["run", str(PLAYBOOKS / "aws-s3-exit.yaml"), "--db", str(db), "--dry-run",
                                       "--from", "verify", "--until", "audit"])
    assert [line.split()[:2] for line in result.output.splitlines()[1:]] == [
        ["skip", "inventory"], ["skip", "plan"], ["skip", "exit-approval"], ["skip", "pilot"], ["skip", "migrate"],
        ["skip", "delta"], ["run", "verify"], ["run", "audit"]]
    result = CliRunner().invoke(main, ["run", str(PLAYBOOKS / "aws-s3-exit.yaml"), "--db", str(db), "--dry-run",
                                       "--from", "nope"])
    assert result.exit_code == 2 and "no step named 'nope'" in result.output


def test_pacs_timeouts(tmp_path: Path) -> None:
    """`pacs:` sets how long a PACS target is waited for (the CLI's --dimse-timeout and friends)."""
    from cloudexit.core.config import PacsConfig
    from cloudexit.playbook import Runner

    pb = load(write(tmp_path, GOOD + "pacs:\n  dimse_timeout: 4\n  http_timeout: 2.5\n"), env={})
    timeouts = Runner(pb, tmp_path / "t.db")._timeouts()
    assert timeouts == PacsConfig(dimse_timeout=4.0, http_timeout=2.5)
    assert "line 15: field 'pacs.acse_timeout' must be a number of seconds > 0, not 'soon'" in error(
        tmp_path, GOOD + "pacs:\n  acse_timeout: soon\n")
    assert "unknown key 'pacs.dimse'" in error(tmp_path, GOOD + "pacs:\n  dimse: 3\n")
    assert load(write(tmp_path, GOOD), ["pacs.dimse_timeout=7"], env={}).timeouts["dimse_timeout"] == 7.0


@pytest.mark.parametrize(("text", "at", "problem", "hint"), [
    ("playbook: 1\nname: t\n\tsource: {}\n", "line 3, column 1", "found a tab character that violates indentation",
     "indent with spaces, not tabs"),
    ("playbook: 1\nname: step 1: pilot\n", "line 2, column 13", "mapping values are not allowed in this context",
     "needs quotes"),
    ("playbook: 1\nsteps: [inventory\n", "line 3, column 1",
     "did not find expected ',' or ']' (while parsing a flow sequence at line 2, column 8)", "close the bracket"),
])
def test_bad_yaml_is_one_line_naming_file_line_and_column(tmp_path: Path, text: str, at: str, problem: str,
                                                          hint: str) -> None:
    """PyYAML's own text runs over several lines with a caret drawing; the user gets one line."""
    path = write(tmp_path, text)
    result = CliRunner().invoke(main, ["run", str(path), "--db", str(tmp_path / "x.db")])
    assert result.exit_code == 2, result.output
    error_line, hint_line = result.output.rstrip("\n").split("\n")
    assert error_line.startswith(f"Error: {path}, {at}: not valid YAML: {problem}"), result.output
    assert hint_line.startswith("  hint: ") and hint in hint_line and "docs/playbooks.md" in hint_line
    assert not (tmp_path / "x.db").exists()


def test_a_playbook_endpoint_is_named_by_its_key(tmp_path: Path) -> None:
    """The library words an endpoint error for the command line (--endpoint-url); a playbook
    has no such option, so its errors name `source.endpoint` and its line."""
    path = write(tmp_path, GOOD.replace("${ENDPOINT:-http://127.0.0.1:8333}", "ftp://pacs-s3.local"))
    result = CliRunner().invoke(main, ["run", str(path), "--db", str(tmp_path / "x.db"), "--dry-run"])
    assert result.exit_code == 2, result.output
    assert (f"{path}, line 5: source.endpoint 'ftp://pacs-s3.local' is not an http(s) URL of a host"
            in result.output), result.output
    assert "hint: write it as https://HOST" in result.output and "--endpoint-url" not in result.output
    text = error(tmp_path, GOOD, "source.endpoint=s3.local")
    assert "--set source.endpoint: source.endpoint 's3.local' is not an http(s) URL" in text, text


def test_a_playbook_that_is_not_utf8_is_one_line(tmp_path: Path) -> None:
    path = tmp_path / "pb.yaml"
    path.write_bytes(b"playbook: 1\nname: H\xf4pital\n")  # Latin-1, as an old editor saves it
    with pytest.raises(PlaybookError) as info:
        load(path, env={})
    assert info.value.message == f"{path}: not UTF-8 text (byte 19: 0xf4)"
    assert info.value.hint == "save the playbook as UTF-8 (a YAML file is text)"
