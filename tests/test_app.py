"""The application layer's one resume rule (`app.choose_run`), case by case, on a real state DB
whose `migration_runs` rows say what earlier runs did; the endpoint fallback (`app.open_source`);
plan documents by name (`app.write_plan`)."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import pytest

from cloudexit import app
from cloudexit.core.config import MigrateConfig, PacsConfig, SourceConfig
from cloudexit.core.errors import StateError, UsageError
from cloudexit.state.db import State


@pytest.fixture
def state(tmp_path: Path) -> State:
    with State(tmp_path / "exit.db", create=True) as s:
        yield s


def _run(state: State, dest: Path, status: str, **options: object) -> None:
    """A row as the engine leaves it for a run into `dest` that ended in `status`."""
    with state.transaction() as tx:
        tx.execute("INSERT INTO migration_runs(started_at, status, dest, options) VALUES (?, ?, ?, ?)",
                   ("2026-01-01T00:00:00+00:00", status, f"file://{dest}", json.dumps(options)))


# (last run: None or (folder, status), the request, what is chosen or the error's words)
CASES = [
    ("no run, --to A", None, dict(dests=["A"]), ("new", "A")),
    ("no run, --resume", None, dict(resume=True), "nothing to resume"),
    ("no run, nothing asked", None, dict(), "say where to"),
    ("--to and --resume", None, dict(dests=["A"], resume=True), "not both"),
    ("finished into A, --to A", ("A", "complete"), dict(dests=["A"]), ("new", "A")),
    ("finished into A, --to B", ("A", "complete"), dict(dests=["B"]), "downloaded again"),
    ("finished into A, --to B --yes", ("A", "partial"), dict(dests=["B"], confirmed=True), ("new", "B")),
    ("finished into A, --resume", ("A", "complete"), dict(resume=True), ("resume", "A")),
    ("interrupted into A, --to A", ("A", "interrupted"), dict(dests=["A"]), ("resume", "A")),
    ("running (killed) into A, --to A", ("A", "running"), dict(dests=["A"]), ("resume", "A")),
    ("stopped into A, --resume", ("A", "stopped"), dict(resume=True), ("resume", "A")),
    # The engine refuses this one, naming the unfinished run (test_migrate.py).
    ("interrupted into A, --to B", ("A", "interrupted"), dict(dests=["B"]), ("new", "B")),
]


@pytest.mark.parametrize("last, asked, expected", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_new_run_or_resume(state: State, tmp_path: Path, last: tuple[str, str] | None,
                           asked: dict[str, object], expected: tuple[str, str] | str) -> None:
    if last is not None:
        _run(state, tmp_path / last[0], last[1], deliver=["dicom://PACS@pacs.local:104"])
    asked = {**asked, "dests": [str(tmp_path / d) for d in asked.get("dests", [])]}  # type: ignore[union-attr]
    if isinstance(expected, str):
        with pytest.raises(UsageError) as caught:
            app.choose_run(state, **asked)  # type: ignore[arg-type]
        assert expected in caught.value.message
        return
    choice = app.choose_run(state, **asked)  # type: ignore[arg-type]
    assert (("resume" if choice.resume else "new"), choice.archive.root) == (expected[0], tmp_path / expected[1])
    if asked.get("resume"):  # the run's own PACS
        assert choice.pacs == ["dicom://PACS@pacs.local:104"]


def test_continuing_keeps_the_recorded_settings(state: State, tmp_path: Path) -> None:
    """An unfinished run continued by `--to` (or a playbook) keeps the layout it was started with
    unless one is given: half an archive in one layout and half in another cannot happen."""
    _run(state, tmp_path / "A", "interrupted", layout="keys", threads=3)
    choice = app.choose_run(state, [str(tmp_path / "A")], settings={"layout": None, "threads": 5})
    assert choice.resume and choice.config.layout == "keys" and choice.archive.layout == "keys"
    assert choice.config.threads == 5  # given: wins over the recorded 3
    fresh = app.choose_run(state, [str(tmp_path / "B")], settings={"layout": None}, confirmed=True)
    assert not fresh.resume and fresh.config.layout == MigrateConfig.layout


def test_resume_keeps_the_recorded_pacs_timeouts(state: State, tmp_path: Path) -> None:
    """The PACS timeouts a run was started with are recorded with its options (as the engine
    writes them: `asdict` of its config), so `--resume` keeps them; one given again wins."""
    started = MigrateConfig(pacs=PacsConfig(dimse_timeout=2, acse_timeout=3))
    _run(state, tmp_path / "A", "interrupted", **asdict(started))
    resumed = app.choose_run(state, resume=True)
    assert resumed.config.pacs == started.pacs
    given = app.choose_run(state, resume=True, pacs={"dimse_timeout": 7, "acse_timeout": None})
    assert (given.config.pacs.dimse_timeout, given.config.pacs.acse_timeout) == (7, 3)
    _run(state, tmp_path / "A", "interrupted", layout="keys")  # a run recorded before: the defaults
    assert app.choose_run(state, resume=True).config.pacs == PacsConfig()


def test_playbooks_are_held_to_the_second_archive_rule(state: State, tmp_path: Path) -> None:
    """A playbook whose folder changed after a finished run would download everything again:
    refused, as `migrate --to` without --yes is (a playbook never passes `confirmed`)."""
    from cloudexit.playbook.runner import Runner
    from cloudexit.playbook.schema import load

    _run(state, tmp_path / "A", "complete")
    book = tmp_path / "book.yaml"
    book.write_text(f"playbook: 1\nname: t\nsource: {{url: 's3://b'}}\ntargets: ['{tmp_path / 'B'}']\n"
                    "steps: [migrate]\n")
    runner = Runner(load(book), state.path)
    with pytest.raises(UsageError) as caught:
        runner._migrate(state, runner.pb.steps[0], runner._archive())
    assert "would be downloaded again" in caught.value.message


def test_the_source_falls_back_to_the_recorded_endpoint(state: State) -> None:
    with pytest.raises(StateError, match="no inventory yet"):
        app.open_source(state)
    state.set_meta(source_url="s3://pacs/archive", endpoint_url="http://127.0.0.1:9", region="cn-hangzhou")
    recorded = app.open_source(state)
    assert (recorded.config.endpoint_url, recorded.config.region) == ("http://127.0.0.1:9", "cn-hangzhou")
    given = app.open_source(state, SourceConfig(endpoint_url="http://127.0.0.1:8", region="eu-west-1"))
    assert (given.config.endpoint_url, given.config.region) == ("http://127.0.0.1:8", "eu-west-1")
    state.set_meta(endpoint_url="aws")
    assert app.open_source(state).config.endpoint_url is None  # AWS: the default chain


def test_plan_documents_by_name(tmp_path: Path) -> None:
    assert [app.plan_format(n) for n in ("p.md", "P.HTML", "p.json", "p.pdf", "plan")] == \
        ["md", "html", "json", None, None]
    with pytest.raises(UsageError, match="unknown format"):
        app.write_plan(object(), tmp_path / "plan.pdf")
