"""Playbooks: the whole exit as a YAML file, run step by step, resumably (`cloudexit run`).

A playbook names the source bucket, the targets, prices and schedule, the verification policy
and the ordered steps (docs/playbooks.md). `load()` checks it against the schema and names the
unknown key, wrong type or missing field *and its line*; `${VAR}` / `${VAR:-default}` in any
string come from the environment, and `--set path=value` overrides a field (so a test, or a
rehearsal against a local S3 server, can point the same playbook elsewhere).

`Runner` executes the steps in order through the library (never the CLI) and records each
step's state in the `playbook_steps` table: run the playbook again and it continues at the
step in progress. Gates stop the run with a clear message (`GateNotMet`, exit 3): a pilot with
mismatches, a delta still larger than the cutover threshold, a verify with differences, a
checkpoint awaiting `--ack`, a decommission awaiting `--confirm TOKEN`.
"""

from __future__ import annotations

from cloudexit.playbook.runner import RunReport, Runner, StepReport
from cloudexit.playbook.schema import PACS_PREFIXES, STEP_KINDS, Playbook, Step, load

__all__ = ["PACS_PREFIXES", "STEP_KINDS", "Playbook", "RunReport", "Runner", "Step", "StepReport", "load"]
