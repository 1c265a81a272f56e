"""The live page and the link report, with real parts: `cloudexit serve` and `cloudexit migrate`
in subprocesses, SeaweedFS behind the fault proxy (which refuses connections for a while),
headless Chromium reading the page's DOM, and `cloudexit link-report` on the run's DB."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from chromium_pipe import CHROMIUM, Page
from dbutil import rows

from cloudexit.testing import synthetic
from cloudexit.testing.s3server import SeaweedServer

ROOT = Path(__file__).resolve().parent.parent
TOKEN = "live-page-test-token-0123456789"
OUTAGE_S = 6.0  # how long the proxy refuses connections


@pytest.fixture(scope="module")
def pacs(s3: SeaweedServer) -> tuple[str, list[synthetic.SyntheticObject]]:
    """Three patients' CT series (~0.5 MB a slice), uploaded once for this module."""
    bucket = f"live-{os.getpid()}"
    profile = synthetic.Profile(patients=3, studies_per_patient=1, ct_slices_per_series=16,
                                cr_per_study=0, multiframe_objects=0, awkward=False, seed=11)
    return bucket, synthetic.upload(s3.client(), bucket, synthetic.generate(profile))


@pytest.fixture
def inventoried(cli, pacs, db: Path) -> Path:
    result = cli("inventory", f"s3://{pacs[0]}", "--db", str(db), "-q")
    assert result.exit_code == 0, result.output
    return db


def start_serve(db: Path, *extra: str) -> tuple[subprocess.Popen[str], str]:
    proc = subprocess.Popen([sys.executable, "-m", "cloudexit.cli", "serve", "--db", str(db), "--port", "0",
                             "-q", *extra], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    url = proc.stdout.readline().strip()
    assert url.startswith("http://"), (url, proc.stderr.read() if proc.poll() is not None else "")
    return proc, url


@pytest.fixture
def served(inventoried: Path) -> Iterator[str]:
    proc, url = start_serve(inventoried, "--token", TOKEN)
    try:
        yield url
    finally:
        proc.terminate()
        proc.wait(10)


def get(url: str, headers: dict[str, str] | None = None, method: str = "GET") -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers or {}, method=method),
                                    timeout=10) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def base(url: str) -> str:
    return url.split("/?", 1)[0]


def phi_in(text: str, truth: list[synthetic.SyntheticObject]) -> list[str]:
    ids = {o.patient_id for o in truth if o.patient_id}
    names = {part for name in synthetic.PATIENT_NAMES for part in name.replace("=", "^").split("^") if len(part) > 2}
    return sorted(x for x in ids | set(synthetic.PATIENT_NAMES) | names if x in text)


def test_every_request_needs_the_token_and_nothing_writes(served: str) -> None:
    root = base(served)
    assert get(root + "/")[0] == 401
    assert get(root + "/api/live")[0] == 401
    assert get(root + "/api/live", {"Authorization": "Bearer wrong-token-wrong-token"})[0] == 401
    assert get(root + "/api/live?token=" + TOKEN[:-1])[0] == 401
    status, body = get(root + "/api/live", {"Authorization": "Bearer " + TOKEN})
    assert status == 200
    snap = json.loads(body)
    assert snap["run"] is None  # inventoried, never migrated: the page works without a run
    assert get(root + "/api/live", {"Authorization": "Bearer " + TOKEN}, method="POST")[0] in (401, 405)
    assert get(root + "/api/live", {"Authorization": "Bearer " + TOKEN}, method="DELETE")[0] == 405
    status, html = get(served)
    assert status == 200 and b"<script>" in html
    assert b"http://" not in html.replace(b"http://www.w3.org/2000/svg", b"")  # no external asset


def test_serve_beyond_loopback_generates_and_prints_a_token(inventoried: Path) -> None:
    proc = subprocess.Popen([sys.executable, "-m", "cloudexit.cli", "serve", "--db", str(inventoried),
                             "--host", "0.0.0.0", "--port", "0"], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        lines = [proc.stdout.readline().strip() for _ in range(3)]
        assert "not only this computer" in lines[0]
        token = lines[1].rsplit(" ", 1)[1]
        assert len(token) >= 24 and lines[2].endswith("token=" + token)
        port = lines[2].split(":")[2].split("/")[0]
        assert get(f"http://127.0.0.1:{port}/api/live")[0] == 401
        assert get(f"http://127.0.0.1:{port}/api/live?token={token}")[0] == 200
    finally:
        proc.terminate()
        proc.wait(10)


def test_serve_and_link_report_say_what_is_wrong_in_one_line(cli, tmp_path: Path, inventoried: Path) -> None:
    r = cli("serve", "--db", str(tmp_path / "none.db"))
    assert r.exit_code == 1 and "no state database" in r.output and "Traceback" not in r.output
    r = cli("serve", "--db", str(inventoried), "--token", "short")
    assert r.exit_code == 2 and "too short" in r.output
    r = cli("link-report", "--db", str(inventoried), "--out", str(tmp_path / "l"), "--since", "yesterday-ish")
    assert r.exit_code == 2 and "cannot read --since" in r.output
    for far in ("0001-01-01", "99999999d"):  # dates a clock cannot show: one line, not a traceback
        r = cli("link-report", "--db", str(inventoried), "--out", str(tmp_path / "l"), "--since", far)
        assert r.exit_code == 2 and "cannot read --since" in r.output, r.output
    r = cli("link-report", "--db", str(inventoried), "--out", str(tmp_path / "l"))
    assert r.exit_code == 0, r.output
    facts = json.loads((tmp_path / "l" / "link.json").read_text())
    assert facts["totals"]["requests"]["list"] >= 1  # the inventory's own requests are evidence too


def test_a_db_deleted_while_served_is_said_not_shown_frozen(tmp_path: Path) -> None:
    from cloudexit.state.db import State

    db = tmp_path / "x.db"
    State(db, create=True).close()
    proc, url = start_serve(db, "--token", TOKEN)
    try:
        auth = {"Authorization": "Bearer " + TOKEN}
        assert get(base(url) + "/api/live", auth)[0] == 200
        for suffix in ("", "-wal", "-shm"):
            Path(f"{db}{suffix}").unlink(missing_ok=True)
        # The open connection could still read the unlinked file: the page must not go on
        # showing its figures as if they were live.
        status, body = get(base(url) + "/api/live", auth)
        assert status == 503 and json.loads(body) == {"error": "gone"}
        assert "cloudexit serve` again" in get(url)[1].decode()  # the page's words for it
    finally:
        proc.terminate()
        proc.wait(10)


@pytest.mark.slow
@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed")
def test_live_page_follows_a_migration_through_an_outage(cli, pacs, inventoried: Path, tmp_path: Path,
                                                          fault_proxy) -> None:
    db, truth = inventoried, pacs[1]
    serve, url = start_serve(db, "--token", TOKEN)
    migrate: subprocess.Popen[str] | None = None
    served: list[bytes] = []
    try:
        with Page(url + "&every=0.5") as page:
            page.wait("document.body.dataset.polls > 0", 30, "the page's first data")
            assert page.evaluate("document.getElementById('norun').hidden") is False  # no run yet
            migrate = subprocess.Popen(
                [sys.executable, "-m", "cloudexit.cli", "migrate", "--to", str(tmp_path / "archive"), "--db",
                 str(db), "--endpoint-url", fault_proxy.endpoint_url, "--bwlimit", "2M", "--processes", "1", "-q"],
                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            # The outage: once objects are verified in the DB (observed, not timed), the proxy
            # refuses connections for OUTAGE_S seconds.
            wait_db(db, "SELECT 1 FROM transfers WHERE state = 'verified'", migrate)
            fault_proxy.refuse()
            refused_at = time.time()
            wait_db(db, "SELECT 1 FROM link_outages WHERE ended IS NULL", migrate, 30)
            first = int(page.wait("+document.getElementById('objects').dataset.done", 20, "objects done"))
            shown = page.wait("(document.getElementById('wait-link_down') || {}).dataset?.cause", 20,
                              "the link-down banner")
            assert shown == "refused"
            page.screenshot(tmp_path / "live-down.png")
            time.sleep(max(0.0, refused_at + OUTAGE_S - time.time()))  # the fault's length itself
            fault_proxy.accept()
            accepted_at = time.time()
            wait_db(db, "SELECT 1 FROM link_outages WHERE ended IS NOT NULL", migrate, 60)
            row = page.wait("(() => { const r = document.querySelector('#outages tr.outage');"
                            " return r && !document.getElementById('wait-link_down') && r.dataset.seconds > 0"
                            " ? [r.dataset.cause, +r.dataset.seconds] : null })()", 20, "the closed outage")
            assert row[0] == "refused" and abs(row[1] - OUTAGE_S) <= 4, row
            page.wait(f"+document.getElementById('objects').dataset.done > {first}", 60, "more objects done")
            _out, err = migrate.communicate(timeout=180)
            assert migrate.returncode == 0, err[-2000:]
            total = len(rows(db, "SELECT key FROM transfers"))
            page.wait(f"+document.getElementById('objects').dataset.done == {total}", 20, "every object done")
            page.wait("document.getElementById('status').textContent == W['status.complete']", 20, "complete")
            assert all(u.startswith(base(url)) for u in page.requests()), page.requests()
            shots = ROOT / "docs" if os.environ.get("CLOUDEXIT_SCREENSHOTS") else tmp_path
            page.screenshot(shots / "live-page-en.png")
            page.goto(url.replace("lang=en", "lang=zh") + "&every=0.5")
            page.wait("document.getElementById('status').textContent == '已完成'", 20, "the Chinese page's data")
            assert page.evaluate("document.documentElement.lang") == "zh-CN"
            assert "中断" in page.evaluate("document.body.innerText")
            page.screenshot(shots / "live-page-zh.png")
            for lang in ("en", "zh"):
                served.append(get(url.replace("lang=en", f"lang={lang}"))[1])
            served.append(get(base(url) + "/api/live", {"Authorization": "Bearer " + TOKEN})[1])
    finally:
        if migrate is not None and migrate.poll() is None:
            migrate.kill()
            migrate.wait()
        serve.terminate()
        serve.wait(10)
    down_for = accepted_at - refused_at
    # The link report from that run lists the outage, its duration within a few seconds.
    report = tmp_path / "link"
    r = cli("link-report", "--db", str(db), "--out", str(report), "--json")
    assert r.exit_code == 0, r.output
    facts = json.loads((report / "link.json").read_text())
    assert [o["cause"] for o in facts["outages"]] == ["refused"]
    print(f"outage: proxy refused for {down_for:.1f} s; link-report says {facts['outages'][0]['seconds']} s")
    assert abs(facts["outages"][0]["seconds"] - down_for) <= 4, (facts["outages"], down_for)
    assert facts["totals"]["errors"]["refused"] >= 1 and facts["totals"]["bytes"] > 0
    assert facts["summary"]["outages"] == 1
    html = (report / "link.html").read_text()
    assert "connection refused" in html and "<svg" in html and "<script" not in html
    outages_csv = (report / "link-outages.csv").read_text().splitlines()
    assert len(outages_csv) == 2 and ",refused," in outages_csv[1]
    r = cli("link-report", "--db", str(db), "--out", str(tmp_path / "link-zh"), "--lang", "zh", "-q")
    assert r.exit_code == 0 and "连接被拒绝" in (tmp_path / "link-zh" / "link.html").read_text()
    # The audit carries the one-page digest.
    r = cli("audit", "--db", str(db), "--out", str(tmp_path / "audit"), "-q")
    assert r.exit_code == 0, r.output
    audit_html = (tmp_path / "audit" / "audit.html").read_text()
    digest = audit_html.split('id="link"', 1)[1]
    assert "connection refused" in digest and "cloudexit link-report" in digest
    # Nothing served or written carries a patient's name or ID.
    texts = [b.decode() for b in served] + [p.read_text() for p in (*report.iterdir(), *(tmp_path / "link-zh").iterdir())]
    texts.append(digest.split("</section>", 1)[0])
    for text in texts:
        assert not phi_in(text, truth)


def wait_db(db: Path, sql: str, proc: subprocess.Popen[str], timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not rows(db, sql):
        if proc.poll() is not None:
            raise AssertionError(f"migrate ended ({proc.returncode}) before: {sql}\n{proc.communicate()[1][-2000:]}")
        if time.monotonic() > deadline:
            raise AssertionError(f"never seen in the DB: {sql}")
        time.sleep(0.1)


def test_audit_digest(tmp_path: Path) -> None:
    """The audit's one-page digest: empty without evidence, the summary and outages with it."""
    from cloudexit.report.linkreport import digest_html
    from cloudexit.state.db import State
    from cloudexit.state.linkseries import LinkRecorder

    with State(tmp_path / "d.db", create=True) as state:
        assert digest_html(state.conn) == ""
        clock = [1_750_000_000.0]
        rec = LinkRecorder("migrate", clock=lambda: clock[0])
        with state.transaction() as tx:
            rec.traffic(10**6, get=3)
            rec.error("unreachable", "cannot reach h: TimeoutError: timed out")
            rec.down(tx)
            clock[0] += 90
            rec.up(tx)
            rec.flush(tx)
        html = digest_html(state.conn, "zh", href="link/link.html")
    assert "超时" in html and "link/link.html" in html and "<svg" in html


def test_throttling_the_workers_retried_past_is_evidence(cli, inventoried: Path, tmp_path: Path,
                                                         fault_proxy) -> None:
    """503 SlowDown answers a worker retried past (the objects then verified) are counted as
    5xx in the minute they happened, with the time to first byte of every object."""
    db = inventoried
    fault_proxy.status(503, "SlowDown", method="GET", key=".", times=3)
    r = cli("migrate", "--to", str(tmp_path / "archive"), "--db", str(db), "--endpoint-url",
            fault_proxy.endpoint_url, "-q")
    assert r.exit_code == 0, r.output
    series = rows(db, "SELECT * FROM link_series WHERE source = 'migrate'")
    total = lambda column: sum(row[column] for row in series)  # noqa: E731
    assert total("err_5xx") == 3 and total("err_refused") == total("err_reset") == 0
    verified = rows(db, "SELECT count(*) AS n FROM transfers WHERE state = 'verified'")[0]["n"]
    assert total("objects") == verified
    assert sum(total(f"ttfb_{i}") for i in range(10)) == verified  # one sample per object fetched
    run = rows(db, "SELECT bytes_downloaded, get_requests FROM migration_runs")[0]
    assert total("bytes") == run["bytes_downloaded"] and total("get_requests") == run["get_requests"]
    assert not rows(db, "SELECT 1 FROM link_outages")


def test_the_page_says_which_pacs_is_paused_and_why_the_link_waits(tmp_path: Path) -> None:
    """What a live run waits for, from the DB alone: the open outage with its cause, a PACS
    whose last word was pacs_down (its answer not shown), and nothing once the run is gone."""
    import json as json_
    import socket as socket_

    from cloudexit.report.live import snapshot
    from cloudexit.state.db import State, now
    from cloudexit.state.linkseries import LinkRecorder

    with State(tmp_path / "w.db", create=True) as state:
        options = json_.dumps({"deliver": ["dicom://PACS@10.0.0.5:104"]})
        with state.transaction() as tx:
            tx.execute("INSERT INTO migration_runs(started_at, status, dest, options, pid, host, heartbeat_at, "
                       "waiting_since) VALUES (?, 'running', 'file:///a', ?, ?, ?, ?, ?)",
                       (now(), options, os.getpid(), socket_.gethostname(), now(), now()))
            state.log("migrate.pacs_down", tx, run=1, dest="dicom://PACS@10.0.0.5:104", detail="DOE^JANE refused")
            state.log("migrate.pacs_down", tx, run=1, dest="dicom://OTHER@10.0.0.6:104", detail="x")
            state.log("migrate.pacs_up", tx, run=1, dest="dicom://OTHER@10.0.0.6:104", down_seconds=3)
            rec = LinkRecorder("migrate", run_id=1)
            rec.error("unreachable", "cannot reach h: TimeoutError: timed out")
            rec.down(tx)
        snap = snapshot(state)
        waits = snap["run"]["waiting"]
        assert waits[0]["what"] == "link_down" and waits[0]["cause"] == "timeout"
        assert [(w["what"], w["dest"]) for w in waits[1:]] == [("pacs", "dicom://PACS@10.0.0.5:104")]
        assert "DOE" not in json_.dumps(snap)
        with state.transaction() as tx:
            tx.execute("UPDATE migration_runs SET heartbeat_at = '2000-01-01T00:00:00+00:00', host = 'elsewhere'")
        snap = snapshot(state)
        assert snap["run"]["waiting"] == [] and snap["run"]["status"] == "interrupted"
        assert snap["outages"][0]["cause"] == "timeout"


def test_the_page_lists_cluster_workers(tmp_path: Path) -> None:
    """A run on a cluster: each dask worker with its objects, bytes, errors and last report."""
    from cloudexit.report.live import page, snapshot
    from cloudexit.state.db import State, now

    with State(tmp_path / "c.db", create=True) as state:
        with state.transaction() as tx:
            tx.execute("INSERT INTO migration_runs(started_at, status, dest, options, pid, host, heartbeat_at) "
                       "VALUES (?, 'running', 'file:///a', '{}', ?, 'h', ?)", (now(), os.getpid(), now()))
            for i, (worker, state_name) in enumerate([("tcp://10.0.0.7:4001", "verified"),
                                                      ("tcp://10.0.0.7:4001", "failed"),
                                                      ("tcp://10.0.0.8:4001", "verified"), (None, "queued")]):
                tx.execute("INSERT INTO transfers(key, dest, seq, state, size, worker, updated_at, run_id) "
                           "VALUES (?, 'file:///a', ?, ?, 1000, ?, ?, 1)", (f"k{i}", i, state_name, worker, now()))
        workers = snapshot(state)["run"]["workers"]
    assert [(w["worker"], w["objects"], w["bytes"], w["errors"]) for w in workers] == [
        ("tcp://10.0.0.7:4001", 1, 1000, 1), ("tcp://10.0.0.8:4001", 1, 1000, 0)]
    assert all(w["last_seen"] for w in workers)
    assert 'id="workers"' in page("en") and 'id="workers"' in page("zh")
