"""Each shipped playbook, run by `cloudexit run` against the local SeaweedFS (and Orthanc where
it targets one), its source pointed there through the environment and --set (docs/playbooks.md)."""

from __future__ import annotations

import json
import re
import sqlite3
from pathlib import Path

import pytest
from click.testing import CliRunner, Result

from cloudexit.testing import synthetic
from cloudexit.cli import main
from cloudexit.testing.s3server import SeaweedServer
from cloudexit.state.db import State
from cloudexit.report.status import delta_summary
from orthanc import OrthancServer

PLAYBOOKS = Path(__file__).resolve().parent.parent / "playbooks"
TOKEN = re.compile(r"--confirm ([0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4})")


def small(layout: str, awkward: bool = False, seed: int = 0, patients: int = 2) -> synthetic.Profile:
    return synthetic.Profile(patients=patients, studies_per_patient=1, ct_slices_per_series=2, ct_matrix=32,
                             cr_per_study=1, cr_matrix=32, multiframe_objects=0, layouts=(layout,),
                             awkward=awkward, seed=seed)


class Book:
    """One playbook run through the CLI, pointed at the test's bucket, folder and PACS."""

    def __init__(self, name: str, s3: SeaweedServer, bucket: str, tmp: Path, pacs: str | None = None,
                 sets: tuple[str, ...] = ()) -> None:
        self.path = PLAYBOOKS / f"{name}.yaml"
        self.db = tmp / "state" / f"{name}.db"
        self.archive = tmp / "archive"
        self.env = {**s3.env(), "AWS_PROFILE": None, "CLOUDEXIT_DB": None,
                    "CLOUDEXIT_ENDPOINT": s3.endpoint_url, "CLOUDEXIT_BUCKET": bucket,
                    "CLOUDEXIT_ARCHIVE": str(self.archive), "CLOUDEXIT_PACS": pacs or ""}
        self.sets = [a for s in ("source.profile=", "schedule.bwlimit=", *sets) for a in ("--set", s)]

    def __call__(self, *args: str) -> Result:
        return CliRunner(env=self.env).invoke(main, ["run", str(self.path), "--db", str(self.db), *self.sets, *args],
                                              catch_exceptions=False)

    def steps(self) -> dict[str, sqlite3.Row]:
        conn = sqlite3.connect(self.db)
        conn.row_factory = sqlite3.Row
        try:
            return {r["step"]: r for r in conn.execute("SELECT * FROM playbook_steps ORDER BY seq")}
        finally:
            conn.close()

    def ran(self, result: Result) -> list[str]:
        return re.findall(r"^== step (\S+)", result.output, re.M)


def keys_in(s3: SeaweedServer, bucket: str) -> set[str]:
    out: set[str] = set()
    for page in s3.client().get_paginator("list_objects_v2").paginate(Bucket=bucket):
        out.update(o["Key"] for o in page.get("Contents", []))
    return out


@pytest.mark.slow
def test_branch_hospital_pacs(s3, bucket, tmp_path: Path, pacs: OrthancServer) -> None:
    first = synthetic.upload(s3.client(), bucket, synthetic.generate(small("uid")))
    book = Book("branch-hospital-pacs", s3, bucket, tmp_path, pacs=pacs.dicom_url)
    result = book("--until", "migrate")
    assert result.exit_code == 0, result.output
    assert book.ran(result) == ["inventory", "plan", "pilot", "migrate"]
    assert "stopped after step migrate (--until)" in result.output
    assert "pilot: 2 studies" in result.output and "zero mismatches" in result.output
    steps = book.steps()
    assert [s["status"] for s in steps.values()] == ["done"] * 4
    assert json.loads(steps["plan"]["result"])["written"] == [str(book.db.parent / "branch-plan.html")]
    assert (book.db.parent / "branch-plan.html").read_text().startswith("<!")
    assert pacs.instance_count() == len(first)  # delivered to Orthanc from the verified archive

    # The cloud PACS keeps receiving studies: the next night's run continues at the delta.
    late = synthetic.upload(s3.client(), bucket, synthetic.generate(small("uid", seed=1, patients=1)))
    with State(book.db) as state:
        assert delta_summary(state)["left_objects"] == 0  # type: ignore[index]
    result = book()
    assert result.exit_code == 3, result.output  # stops at the decommission gate
    assert book.ran(result) == ["delta", "verify", "audit", "decommission"]
    delta = json.loads(book.steps()["delta"]["result"])
    assert (delta["new"], delta["changed"], delta["migrate"]["fetched_this_run"]) == (len(late), 0, len(late))
    assert pacs.instance_count() == len(first) + len(late)
    verify = json.loads(book.steps()["verify"]["result"])
    assert [v["passed"] for v in verify.values()] == [True, True]
    assert json.loads(book.steps()["audit"]["result"])["out"].endswith("branch-audit")
    # The engine records each delivery to Orthanc per object and verify counted them there: what
    # both destinations hold may go, once confirmed (nothing is deleted before --confirm).
    assert "--confirm" in result.output
    manifest = Path(json.loads(book.steps()["decommission"]["result"])["manifest"])
    rows = {line.split(",")[1]: line.split(",")[0] for line in manifest.read_text().splitlines()[1:]}
    assert {k for k, a in rows.items() if a == "delete"} == {o.key for o in first + late}
    assert len(keys_in(s3, bucket)) == len(first) + len(late)

    again = book()
    assert again.exit_code == 3 and book.ran(again) == ["decommission"]  # continues at the step in progress
    assert book.steps()["decommission"]["attempts"] == 2


@pytest.mark.slow
def test_aws_s3_exit_with_checkpoints_and_every_version_deleted(s3, bucket, tmp_path: Path) -> None:
    client = s3.client()
    client.put_bucket_versioning(Bucket=bucket, VersioningConfiguration={"Status": "Enabled"})
    objects = synthetic.upload(client, bucket, synthetic.generate(small("uid")))
    client.put_object(Bucket=bucket, Key=objects[0].key, Body=objects[0].body())  # a second version, same bytes
    book = Book("aws-s3-exit", s3, bucket, tmp_path, sets=("pricing.bandwidth=1Gbit/s",))
    result = book()
    assert result.exit_code == 3 and book.ran(result) == ["inventory", "plan", "exit-approval"]
    assert "Open an AWS Support case" in result.output and "--ack exit-approval" in result.output
    assert book.steps()["exit-approval"]["status"] == "gated"

    result = book("--ack", "exit-approval")
    assert result.exit_code == 3, result.output
    assert book.ran(result) == ["exit-approval", "pilot", "migrate", "delta", "verify", "audit", "decommission"]
    assert "the window ends" in result.output
    token = TOKEN.search(result.output).group(1)  # type: ignore[union-attr]
    plan = json.loads(book.steps()["decommission"]["result"])
    assert plan["versioning"] == "Enabled" and plan["all_versions"] is True
    assert plan["to_delete"] == len(objects) + 1 and plan["kept"] == 0

    result = book("--confirm", token)
    assert result.exit_code == 3 and book.ran(result) == ["decommission", "request-credit"]
    assert "deleted" in book.steps()["decommission"]["message"]
    versions = client.list_object_versions(Bucket=bucket)
    assert not versions.get("Versions") and not versions.get("DeleteMarkers")
    result = book("--ack", "request-credit")
    assert result.exit_code == 0 and "every step is done" not in result.output
    assert {s["status"] for s in book.steps().values()} == {"done"}
    result = book()
    assert result.exit_code == 0 and "every step is done" in result.output
    with State(book.db) as state:
        assert state.verify_event_chain() == []
        assert state.scalar("SELECT count(*) FROM deletions WHERE outcome = 'deleted' AND confirmed_at IS NOT NULL") \
            == len(objects) + 1
        assert state.meta("exit_window_ends")


@pytest.mark.slow
def test_dcm4chee_s3_pilot_gate_then_the_whole_exit(s3, bucket, tmp_path: Path) -> None:
    objects = synthetic.upload(s3.client(), bucket, synthetic.generate(small("dcm4chee", awkward=True)))
    book = Book("dcm4chee-s3", s3, bucket, tmp_path, sets=("steps.2.pilot.studies=10",))
    result = book()
    assert result.exit_code == 3, result.output
    assert book.ran(result) == ["inventory", "plan", "pilot"]
    assert re.search(r"pilot of 2 studies is not clean: 0 failed, 0 missing, [1-9] quarantined", result.output)
    assert "allow_quarantined: true" in " ".join(result.output.split())  # the way past the gate is named
    assert book.steps()["pilot"]["status"] == "gated" and "migrate" not in book.steps()

    book.sets += ["--set", "steps.2.pilot.allow_quarantined=true"]
    result = book()
    assert result.exit_code == 3, result.output
    assert book.ran(result) == ["pilot", "migrate", "delta", "verify", "audit", "decommission"]
    token = TOKEN.search(result.output).group(1)  # type: ignore[union-attr]
    result = book("--confirm", token)
    assert result.exit_code == 3 and "object versions stay in the bucket" in result.output
    left = keys_in(s3, bucket)
    with State(book.db) as state:
        deleted = {r[0] for r in state.query("SELECT key FROM deletions WHERE outcome = 'deleted'")}
        kept_states = {r[0] for r in state.query(
            f"SELECT state FROM transfers WHERE key IN ({','.join('?' * len(left))})", tuple(left))}
    assert deleted and left and deleted | left == {o.key for o in objects} and not deleted & left
    assert kept_states <= {"quarantined", "skipped", "failed"} and "quarantined" in kept_states


@pytest.mark.slow
def test_orthanc_object_storage(s3, bucket, tmp_path: Path, pacs: OrthancServer) -> None:
    objects = synthetic.upload(s3.client(), bucket, synthetic.generate(small("orthanc")))
    sidecars = {o.key for o in objects if o.kind == "other"}
    assert sidecars and all(o.key.endswith((".dcm", ".json")) for o in objects)
    book = Book("orthanc-object-storage", s3, bucket, tmp_path, pacs=pacs.dicomweb_url,
                )
    result = book()
    assert result.exit_code == 3, result.output
    assert book.ran(result) == ["inventory", "plan", "pilot", "migrate", "delta", "verify", "audit", "decommission"]
    assert pacs.instance_count() == len(objects) - len(sidecars)
    with State(book.db) as state:
        kinds = {r["key"]: r["kind"] for r in state.query("SELECT key, kind FROM objects")}
        assert state.scalar("SELECT count(*) FROM objects WHERE header_source = 'header'") == len(objects)
    assert {k for k, v in kinds.items() if v == "other"} == sidecars
    manifest = Path(json.loads(book.steps()["decommission"]["result"])["manifest"])
    rows = {line.split(",")[1]: line.split(",")[0] for line in manifest.read_text().splitlines()[1:]}
    # The JSON attachments are not DICOM: the archive alone must hold them, and it does. The DICOM
    # instances are recorded per object in Orthanc too (stored, then counted by verify).
    assert {k for k, a in rows.items() if a == "delete"} == set(kinds)


@pytest.mark.slow
def test_playbook_interrupted_mid_step_continues_there(s3_env, bucket, tmp_path: Path) -> None:
    from cloudexit.playbook import Runner, load

    synthetic.upload(s3_env.client(), bucket, synthetic.generate(small("uid", patients=1)))
    book = Book("dcm4chee-s3", s3_env, bucket, tmp_path, sets=("steps.2.pilot.studies=1",))

    pb = load(book.path, [s for s in book.sets if s != "--set"], env=book.env)  # type: ignore[arg-type]

    def say(text: str) -> None:
        if text == "== step migrate (migrate)":
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        Runner(pb, book.db, say=say).run()
    steps = book.steps()
    assert steps["pilot"]["status"] == "done" and steps["migrate"]["status"] == "running"
    with State(book.db) as state:
        assert delta_summary(state) is None  # nothing migrated yet (the pilot has its own DB)
    report = Runner(pb, book.db, say=lambda t: None).run(until="migrate")
    assert [s.name for s in report.steps if s.status == "done"] == ["migrate"]
    assert book.steps()["migrate"]["attempts"] == 2

    # The delta left, as `cloudexit status` shows it: what the next delta round would move.
    s3_env.client().put_object(Bucket=bucket, Key="late/readme.txt", Body=b"a new non-DICOM object")
    from cloudexit.core.config import InventoryConfig
    from cloudexit.inventory import Inventory

    runner = Runner(pb, book.db, say=lambda t: None)
    with State(book.db) as state:
        assert delta_summary(state)["left_objects"] == 0  # type: ignore[index]
        Inventory(state, runner._source(), InventoryConfig()).run()
        delta = delta_summary(state)
    assert delta is not None and delta["left_objects"] == 1 and delta["left_bytes"] == 22
    assert delta["destinations"] == [{"dest": f"file://{book.archive}", "objects": 1, "bytes": 22}]
    assert delta["rounds"][0]["new"] == 1


def test_a_step_error_names_the_playbook_keys_not_the_cli_options(s3, bucket, tmp_path: Path) -> None:
    """The library's hint for a missing bucket says "--endpoint-url and --region" (the command
    line's words); run from a playbook, it names the playbook's keys and the file."""
    book = Book("dcm4chee-s3", s3, f"{bucket}-never-made", tmp_path)
    result = book("--until", "inventory")
    assert result.exit_code == 1, result.output
    assert f"bucket '{bucket}-never-made' does not exist" in result.output, result.output
    assert (f"hint: check the bucket name, source.endpoint and source.region (in {book.path})"
            in result.output), result.output
    assert "--endpoint-url" not in result.output and "--region" not in result.output
    failed = book.steps()["inventory"]
    assert failed["status"] == "failed" and "source.endpoint" in failed["message"]
