"""The engine's policy (engine/policy.py): one row per fault kind and circumstance.

Pure function, no services: these run in milliseconds. The same faults are produced for real
(through the fault proxy, a read-only archive, a killed worker) in test_migrate_faults.py.
"""

from __future__ import annotations

from typing import Any

import pytest

from cloudexit.engine.policy import Action, Context, Do, decide
from cloudexit.transfer.tasks import Result

CTX = Context(attempts=6, capacity=16)  # a plain moment: link up, no streak, no strikes


def result(outcome: str = "failed", kind: str | None = None, **kw: Any) -> Result:
    return Result(1, "k", outcome, error_kind=kind, **kw)


CASES: list[tuple[str, Result, Context, dict[str, Any]]] = [
    # landed
    ("verified", result("verified"), CTX, dict(do=Do.DONE, state="verified", answered=True, conflict=False)),
    ("quarantined keeps its reason", result("quarantined", detail="UID differs"), CTX,
     dict(do=Do.DONE, state="quarantined", reason="UID differs", answered=True)),
    ("archive conflict", result("verified", conflict="/a/b.dcm"), CTX, dict(do=Do.DONE, conflict=True)),
    # a stop in the middle: queued again, the link judgement untouched
    ("cancelled", result("cancelled"), Context(6, 16, streak=2), dict(do=Do.REQUEUE, answered=False, streak=2)),
    # no answer while others get answers: a strike against the object, retried
    ("unreachable, link up", result(kind="unreachable"), Context(6, 16, since_answer=0.5),
     dict(do=Do.RETRY, delay=1.0, strike=True, retry_counted=True, link_down=False, streak=1, answered=False)),
    ("unreachable, link up, long streak: not down", result(kind="unreachable"),
     Context(6, 16, streak=9, since_answer=0.5), dict(do=Do.RETRY, strike=True, link_down=False, streak=10)),
    ("unreachable, strikes used up", result(kind="unreachable", detail="reset"),
     Context(6, 16, strikes=5, since_answer=0.5), dict(do=Do.FAIL, state="failed", reason="reset")),
    ("unreachable, strikes used up, no detail", result(kind="unreachable"),
     Context(6, 16, strikes=5, since_answer=0.5), dict(do=Do.FAIL, reason="connection lost")),
    # no answer and nobody else gets one: no strike; after a streak, the link is down
    ("unreachable, link quiet, short streak", result(kind="unreachable"), Context(6, 16, streak=1, since_answer=5),
     dict(do=Do.RETRY, strike=False, link_down=False, streak=2)),
    ("unreachable, link quiet, streak", result(kind="unreachable"), Context(6, 16, streak=5, since_answer=5),
     dict(do=Do.RETRY, strike=False, link_down=True, streak=6)),
    ("unreachable, small executor: streak of 3", result(kind="unreachable"),
     Context(6, 2, streak=2, since_answer=5), dict(do=Do.RETRY, link_down=True)),
    ("unreachable, link quiet, strikes do not fail it", result(kind="unreachable"),
     Context(6, 16, strikes=5, streak=9, since_answer=5), dict(do=Do.RETRY, link_down=True)),
    # TLS refused mid-run: wait and probe as for an outage, saying what to do
    ("tls", result(kind="tls", detail="the certificate is not trusted"), Context(6, 16, streak=1),
     dict(do=Do.RETRY, link_down=True, strike=False, answered=False, streak=1)),
    # credentials
    ("credentials, renewed", result(kind="credentials"), Context(6, 16, renewed_credentials=True),
     dict(do=Do.RETRY, renew=True, delay=0.0, strike=True, answered=True)),
    ("credentials, renewed twice already", result(kind="credentials", detail="ExpiredToken"),
     Context(6, 16, strikes=2, renewed_credentials=True), dict(do=Do.STOP, stop="credentials", reason="ExpiredToken")),
    ("credentials, none new", result(kind="credentials"), CTX, dict(do=Do.STOP, stop="credentials")),
    # the archive
    ("disk full", result(kind="disk", error_code="ENOSPC", detail="no space"), CTX,
     dict(do=Do.STOP, stop="full", reason="no space", answered=True)),
    ("disk read-only", result(kind="disk", error_code="EROFS"), CTX, dict(do=Do.STOP, stop="read-only")),
    ("disk permission", result(kind="disk", error_code="EACCES"), CTX, dict(do=Do.STOP, stop="read-only")),
    # the object at the source
    ("gone", result(kind="gone"), CTX, dict(do=Do.FAIL, state="missing", reason="deleted at the source")),
    ("archived", result(kind="archived"), CTX, dict(do=Do.RESTORE, answered=True)),
    ("changed", result(kind="changed", changed_to={"etag": "e2", "size": 9}), Context(6, 16, changes=1),
     dict(do=Do.CHANGED, new={"etag": "e2", "size": 9})),
    ("changed, deleted meanwhile", result(kind="changed", changed_to={"gone": True}), CTX,
     dict(do=Do.FAIL, state="missing", reason="deleted at the source since inventory")),
    ("changed, new version unknown", result(kind="changed"), CTX,
     dict(do=Do.FAIL, state="failed", reason="the object keeps changing at the source")),
    ("changed too often", result(kind="changed", changed_to={"etag": "e9", "size": 1}), Context(6, 16, changes=3),
     dict(do=Do.FAIL, reason="the object keeps changing at the source")),
    # retried in the worker already: here they fail the object, and the link is up
    ("transient", result(kind="transient", detail="HTTP 503 SlowDown"), Context(6, 16, streak=4),
     dict(do=Do.FAIL, state="failed", reason="HTTP 503 SlowDown", answered=True, streak=0)),
    ("corrupt", result(kind="corrupt", detail="md5 mismatch"), CTX, dict(do=Do.FAIL, reason="md5 mismatch")),
    ("denied", result(kind="denied", detail="HTTP 403 AccessDenied"), CTX, dict(do=Do.FAIL, state="failed")),
    ("sse-c", result(kind="sse-c", detail="customer key"), CTX, dict(do=Do.FAIL, reason="customer key")),
    ("permanent without detail", result(kind="permanent"), CTX, dict(do=Do.FAIL, reason="permanent")),
    ("no kind at all", result(), CTX, dict(do=Do.FAIL, reason="permanent")),
]


@pytest.mark.parametrize("name, r, ctx, expected", CASES, ids=[c[0] for c in CASES])
def test_decide(name: str, r: Result, ctx: Context, expected: dict[str, Any]) -> None:
    action = decide(r, ctx)
    got = {k: getattr(action, k) for k in expected}
    assert got == expected


def test_every_fault_kind_the_worker_reports_has_a_case() -> None:
    """A kind the client can classify (s3/client.py, transfer/fetch.py) and no case here
    would be an untested branch of the policy."""
    import inspect

    from cloudexit.s3 import client
    from cloudexit.transfer import fetch, ranges

    source = "".join(inspect.getsource(m) for m in (client, fetch, ranges))
    import re

    kinds = set(re.findall(r'FetchError\("([a-z-]+)"', source)) - {"cancelled", "cut"}  # worker-internal
    covered = {c[1].error_kind for c in CASES}
    assert kinds and kinds <= covered, kinds - covered


def test_actions_are_plain_data() -> None:
    action = decide(result(kind="unreachable"), Context(6, 16, streak=5, since_answer=5))
    assert isinstance(action, Action)
    with pytest.raises(AttributeError):
        action.do = Do.FAIL  # type: ignore[misc]
