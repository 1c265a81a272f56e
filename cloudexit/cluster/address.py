"""What `--cluster` names, and whether credentials may travel to it (pure, no dask import)."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from urllib.parse import urlsplit

from cloudexit.core.errors import UsageError

CREDENTIAL_MODES = ("worker", "forward")


@dataclass(frozen=True)
class ClusterAddress:
    """`tcp://HOST:PORT` / `tls://HOST:PORT` (a running dask scheduler) or `local:N` (a
    LocalCluster of N worker processes started by this command)."""

    scheme: str  # tcp | tls | local
    host: str = ""
    port: int = 0
    workers: int = 0  # local:N

    @property
    def url(self) -> str:
        return f"local:{self.workers}" if self.scheme == "local" else f"{self.scheme}://{self.host}:{self.port}"

    @property
    def loopback(self) -> bool:
        """The scheduler is on this machine (so are workers that reach it on that address)."""
        if self.scheme == "local":
            return True
        if self.host == "localhost":
            return True
        try:
            return ipaddress.ip_address(self.host).is_loopback
        except ValueError:
            return False


def parse(text: str) -> ClusterAddress:
    """`--cluster` / CLOUDEXIT_CLUSTER, checked; UsageError with what to write instead."""
    hint = "e.g. --cluster tls://scheduler.example.org:8786, tcp://127.0.0.1:8786 or local:4"
    text = text.strip()
    if text.startswith("local:") or text == "local":
        count = text.partition(":")[2] or "0"
        if not count.isdigit() or not 1 <= int(count) <= 256:
            raise UsageError(f"--cluster {text!r}: local:N needs N worker processes, 1 to 256", hint=hint)
        return ClusterAddress("local", workers=int(count))
    try:
        parts = urlsplit(text)
    except ValueError:  # an unclosed IPv6 bracket
        raise UsageError(f"--cluster {text!r}: not an address", hint=hint) from None
    if parts.scheme not in ("tcp", "tls"):
        raise UsageError(f"--cluster {text!r}: give tcp://HOST:PORT, tls://HOST:PORT or local:N", hint=hint)
    try:
        port = 8786 if parts.port is None else parts.port
    except ValueError:  # not a number, or over 65535
        port = 0
    if not 1 <= port <= 65535:  # :0 would have been taken as dask's default port, unsaid
        raise UsageError(f"--cluster {text!r}: the port is not a number from 1 to 65535", hint=hint)
    if not parts.hostname:
        raise UsageError(f"--cluster {text!r}: no host", hint=hint)
    return ClusterAddress(parts.scheme, parts.hostname, port)


def check_credentials_mode(address: ClusterAddress, mode: str) -> None:
    """`forward` sends this machine's S3 secret key to every worker: only over TLS, or to a
    scheduler on this machine; otherwise refused, saying why."""
    if mode not in CREDENTIAL_MODES:
        raise UsageError(f"--cluster-credentials {mode!r}: use worker or forward")
    if mode == "forward" and address.scheme != "tls" and not address.loopback:
        raise UsageError(
            f"--cluster-credentials forward refused: {address.url} is plain tcp:// to another "
            "machine, so the S3 secret key would cross the network unencrypted",
            hint="use a tls:// scheduler (see docs/scale-out.md, TLS), or leave each worker to "
                 "resolve its own credentials (the default: instance role, profile or env)")



def check_header_reads(address: ClusterAddress) -> None:
    """Header reads send each object's patient ID back to this machine (to be hashed here, where
    the patient key stays): only over TLS, or from a scheduler on this machine."""
    if address.scheme != "tls" and not address.loopback:
        raise UsageError(
            f"inventory --cluster refused: {address.url} is plain tcp:// to another machine, so "
            "the patient IDs read from the headers would cross the network unencrypted",
            hint="use a tls:// scheduler (see docs/scale-out.md, TLS), or run inventory without --cluster")
