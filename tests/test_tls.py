"""HTTPS endpoints, with real parts: SeaweedFS behind the fault proxy as a TLS front, with a
throwaway CA (trustme). Every cloud endpoint is HTTPS; verification is on by default, a private
CA is trusted through AWS_CA_BUNDLE, and a certificate that is not trusted stops the work with a
message that says so, instead of looking like an outage."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterator

import pytest
import trustme
from conftest import server_context
from dbutil import rows
from faultproxy import FaultProxy
from test_migrate_faults import check_archive

from cloudexit.testing import synthetic
from cloudexit.testing.s3server import SeaweedServer


@pytest.fixture
def tls_proxy(s3: SeaweedServer, ca) -> Iterator[FaultProxy]:
    with FaultProxy(s3.endpoint_url, tls=server_context(ca[0])) as proxy:
        yield proxy


@pytest.fixture(scope="module")
def tls_bucket(s3: SeaweedServer) -> tuple[str, list[synthetic.SyntheticObject]]:
    """12 CT slices (~0.5 MB) and one 12 MiB multipart object."""
    bucket = f"tls-{os.getpid()}"
    profile = synthetic.Profile(patients=2, studies_per_patient=1, ct_slices_per_series=6,
                                cr_per_study=0, multiframe_objects=1, multiframe_bytes=12 * 2**20,
                                awkward=False, seed=11)
    objects = synthetic.upload(s3.client(), bucket, synthetic.generate(profile), part_size=5 * 2**20)
    return bucket, objects


def test_https_endpoint_with_a_private_ca(cli, tls_bucket, tls_proxy: FaultProxy, db: Path,
                                          tmp_path: Path, ca, monkeypatch) -> None:
    bucket, objects = tls_bucket
    monkeypatch.setenv("AWS_CA_BUNDLE", str(ca[1]))
    url = tls_proxy.endpoint_url
    assert url.startswith("https://")
    result = cli("inventory", f"s3://{bucket}", "--endpoint-url", url, "--db", str(db), "-q")
    assert result.exit_code == 0, result.output
    dest = tmp_path / "archive"
    result = cli("migrate", "--to", str(dest), "--db", str(db), "--endpoint-url", url,
                 "--large-object", str(8 * 2**20), "--range-size", str(4 * 2**20), "-q")
    assert result.exit_code == 0, result.output
    check_archive(db, dest, objects)
    assert tls_proxy.handshake_failures == 0
    assert tls_proxy.count("GET") >= len(objects)  # it all went through the TLS front


def test_our_client_trusts_what_boto3_trusts(s3_env, tmp_path: Path, ca, monkeypatch) -> None:
    """The lean GET path verifies with the bundle boto3 uses: AWS_CA_BUNDLE, a profile's
    `ca_bundle`, or botocore's default; never the OS store behind boto3's back. (Plain HTTP
    has no certificate: botocore's CA lookup is skipped there.)"""
    from botocore.httpsession import get_cert_path

    from cloudexit.core.config import SourceConfig
    from cloudexit.s3.source import Source

    assert Source("s3://b").lean_endpoint()[0].verify is True  # s3_env: http://
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_env.endpoint_url.replace("http://", "https://"))
    monkeypatch.delenv("AWS_CA_BUNDLE", raising=False)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    assert Source("s3://b").lean_endpoint()[0].verify == get_cert_path(True)
    monkeypatch.setenv("AWS_CA_BUNDLE", str(ca[1]))
    assert Source("s3://b").lean_endpoint()[0].verify == str(ca[1])
    monkeypatch.delenv("AWS_CA_BUNDLE")
    config = tmp_path / "config"
    config.write_text(f"[profile hospital]\nca_bundle = {ca[1]}\nregion = us-east-1\n"
                      "aws_access_key_id = AKIDEXAMPLE\naws_secret_access_key = secret\n")
    monkeypatch.setenv("AWS_CONFIG_FILE", str(config))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    endpoint, _ = Source("s3://b", SourceConfig(profile="hospital")).lean_endpoint()
    assert endpoint.verify == str(ca[1])


@pytest.mark.slow
def test_untrusted_certificate_stops_inventory_clearly(cli, tls_bucket, tls_proxy: FaultProxy,
                                                       db: Path, monkeypatch) -> None:
    monkeypatch.delenv("AWS_CA_BUNDLE", raising=False)
    started = time.monotonic()
    result = cli("inventory", f"s3://{tls_bucket[0]}", "--endpoint-url", tls_proxy.endpoint_url,
                 "--db", str(db), "-q")
    assert result.exit_code == 1
    # The early check goes through the lean path, which names the host.
    assert "the certificate of 127.0.0.1 is not trusted" in result.output
    assert "AWS_CA_BUNDLE" in result.output
    assert "cannot reach" not in result.output  # not mistaken for an outage
    assert time.monotonic() - started < 30  # and not retried as one
    assert tls_proxy.handshake_failures >= 1
    assert tls_proxy.count() == 0  # no request was sent over the untrusted connection


@pytest.mark.slow
def test_untrusted_certificate_stops_migrate_before_anything(cli, tls_bucket, tls_proxy: FaultProxy,
                                                              db: Path, tmp_path: Path, ca, monkeypatch) -> None:
    monkeypatch.setenv("AWS_CA_BUNDLE", str(ca[1]))
    url = tls_proxy.endpoint_url
    result = cli("inventory", f"s3://{tls_bucket[0]}", "--endpoint-url", url, "--db", str(db), "-q")
    assert result.exit_code == 0, result.output
    monkeypatch.delenv("AWS_CA_BUNDLE")
    tls_proxy.reset_counters()
    dest = tmp_path / "archive"
    result = cli("migrate", "--to", str(dest), "--db", str(db), "--endpoint-url", url, "-q")
    assert result.exit_code == 1
    assert "the certificate of 127.0.0.1 is not trusted" in result.output
    assert "AWS_CA_BUNDLE" in result.output
    assert tls_proxy.count("GET") == 0
    assert not list(dest.rglob("*.dcm"))


@pytest.mark.slow
def test_certificate_untrusted_mid_run_waits_says_why_and_carries_on(
        s3_env, tls_bucket, tls_proxy: FaultProxy, db: Path, tmp_path: Path, ca, monkeypatch) -> None:
    """Mid-run, the network presents a certificate from another CA: a firewall blocking the
    domain with its own certificate, or a middlebox that started to inspect TLS. The run waits
    and probes as for an outage, says why (live and in `cloudexit status`), keeps only verified
    objects at final paths, and carries on by itself once the right certificate is back."""
    bucket, objects = tls_bucket
    monkeypatch.setenv("AWS_CA_BUNDLE", str(ca[1]))
    url = tls_proxy.endpoint_url
    cli = [sys.executable, "-m", "cloudexit.cli"]
    inventory = subprocess.run(cli + ["inventory", f"s3://{bucket}", "--endpoint-url", url, "--db", str(db), "-q"],
                               capture_output=True, text=True, timeout=120)
    assert inventory.returncode == 0, inventory.stderr
    dest = tmp_path / "archive"
    tls_proxy.delay(0.4, method="GET")  # slow GETs: the switch lands mid-run
    proc = subprocess.Popen(cli + ["migrate", "--db", str(db), "--endpoint-url", url, "--processes", "1",
                                   "--threads", "2", "--large-object", str(8 * 2**20), "--to", str(dest)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and proc.poll() is None:
            if rows(db, "SELECT count(*) AS n FROM transfers WHERE state = 'verified'")[0]["n"] >= 2:
                break
            time.sleep(0.1)
        assert proc.poll() is None, proc.communicate()[1]
        tls_proxy.tls = server_context(trustme.CA())  # a certificate from a CA nobody trusts
        tls_proxy.reset_connections()
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and proc.poll() is None:
            if rows(db, "SELECT waiting_since FROM migration_runs")[0]["waiting_since"]:
                break
            time.sleep(0.2)
        assert proc.poll() is None, proc.communicate()[1]  # waiting, not stopped
        status = subprocess.run(cli + ["status", "--db", str(db)], capture_output=True, text=True, timeout=60)
        assert "waiting for the link since" in status.stdout, status.stdout
        assert "the certificate of 127.0.0.1 is not trusted" in status.stdout
        assert "AWS_CA_BUNDLE" in status.stdout
        verified = {r["key"]: r["path"] for r in rows(
            db, "SELECT key, path FROM transfers WHERE state = 'verified'")}
        assert 2 <= len(verified) < len(objects)
        assert {str(p.relative_to(dest)) for p in dest.rglob("*.dcm")} == set(verified.values())
        assert rows(db, "SELECT count(*) AS n FROM transfers WHERE state = 'failed'")[0]["n"] == 0
        # The right certificate again: the run notices by itself and finishes.
        tls_proxy.tls = server_context(ca[0])
        tls_proxy.clear()
        tls_proxy.reset_counters()
        _, stderr = proc.communicate(timeout=180)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, stderr
    assert "not trusted" in stderr  # the live progress said why it waited
    check_archive(db, dest, objects)
    again = [s.key for s in tls_proxy.requests if s.method == "GET" and s.key in verified]
    assert not again, again
    events = [json.loads(r["detail"]) for r in rows(
        db, "SELECT detail FROM events WHERE kind = 'migrate.link_down'")]
    assert any("not trusted" in (e.get("why") or "") for e in events)
    assert rows(db, "SELECT count(*) AS n FROM events WHERE kind = 'migrate.link_up'")[0]["n"] >= 1
