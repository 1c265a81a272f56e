"""Shared fixtures: a real S3 server (SeaweedFS) on loopback, buckets, the CLI runner."""

from __future__ import annotations

import itertools
import os
import ssl
from pathlib import Path
from typing import Any, Iterator

import pytest
from click.testing import CliRunner, Result

from cloudexit.cli import main
from cloudexit.testing import synthetic
from cloudexit.testing.s3server import SeaweedServer
from dasknodes import dask_nodes  # noqa: F401 - real dask scheduler and workers (test_cluster.py)
from faultproxy import fault_proxy  # noqa: F401 - fixtures, registered for every test
from orthanc import needs, orthanc, overwriting_orthanc, overwriting_pacs, pacs, status_scp  # noqa: F401

_bucket_ids = itertools.count(1)


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "needs(*parts): skips unless these system parts are installed "
                            "(orthanc, dcmtk, chromium; see tests/orthanc.py SYSTEM_PARTS)")


def pytest_runtest_setup(item: pytest.Item) -> None:
    for mark in item.iter_markers("needs"):
        needs(*mark.args)


@pytest.fixture(scope="session")
def s3(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SeaweedServer]:
    """One SeaweedFS for the whole test session, started once, stopped after."""
    with SeaweedServer(tmp_path_factory.mktemp("seaweed")) as server:
        yield server


def point_at(s3: SeaweedServer, monkeypatch: pytest.MonkeyPatch) -> None:
    """Point boto3 (in this process and in subprocesses) at the test server."""
    for name, value in s3.env().items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("AWS_PROFILE", raising=False)


@pytest.fixture
def s3_env(s3: SeaweedServer, monkeypatch: pytest.MonkeyPatch) -> SeaweedServer:
    """Point boto3 (in this process and in subprocesses) at the test server."""
    point_at(s3, monkeypatch)
    return s3


@pytest.fixture
def bucket(s3: SeaweedServer) -> str:
    """A fresh, empty bucket."""
    name = f"test-{os.getpid()}-{next(_bucket_ids)}"
    s3.client().create_bucket(Bucket=name)
    return name


def upload_ct(s3: SeaweedServer, prefix: str, patients: int, slices: int,
              seed: int = 11) -> tuple[str, list[synthetic.SyntheticObject]]:
    """CT slices only (~0.5 MB each; one study of `slices` slices per patient: no CR, multi-frame
    or awkward objects), uploaded to a bucket of their own; for a module-scoped fixture."""
    bucket = f"{prefix}-{os.getpid()}"
    profile = synthetic.Profile(patients=patients, studies_per_patient=1, ct_slices_per_series=slices,
                                cr_per_study=0, multiframe_objects=0, awkward=False, seed=seed)
    return bucket, synthetic.upload(s3.client(), bucket, synthetic.generate(profile))


@pytest.fixture
def awkward(s3: SeaweedServer, bucket: str) -> str:
    """The tiny synthetic PACS with its awkward cases (odd keys, non-DICOM, unreadable, a
    multipart multi-frame object), in a fresh bucket (test_cluster*.py)."""
    synthetic.upload(s3.client(), bucket, synthetic.generate(synthetic.Profile.tiny()), part_size=5 * 2**20)
    return bucket


@pytest.fixture
def db(tmp_path: Path) -> Path:
    return tmp_path / "state" / "cloudexit.db"


@pytest.fixture
def cli(s3_env: SeaweedServer) -> Any:
    """Call the CLI in-process, as a user would type it."""
    runner = CliRunner()

    def run(*args: str, input: str | None = None) -> Result:
        return runner.invoke(main, list(args), input=input, catch_exceptions=False)

    return run


@pytest.fixture(scope="session")
def ca(tmp_path_factory: pytest.TempPathFactory) -> tuple[Any, Path]:
    """A throwaway CA (trustme) that signs the TLS front's certificate, and its PEM file."""
    import trustme  # in the test extra: missing, the TLS tests fail rather than skip in CI

    authority = trustme.CA()
    pem = tmp_path_factory.mktemp("ca") / "hospital-ca.pem"
    authority.cert_pem.write_to_path(str(pem))
    return authority, pem


def server_context(authority: Any) -> ssl.SSLContext:
    """A server SSLContext with a certificate for 127.0.0.1 from `authority` (a trustme CA)."""
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    authority.issue_cert("127.0.0.1", "localhost").configure_cert(ctx)
    return ctx
