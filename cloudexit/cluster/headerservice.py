"""The cluster's worker side of `inventory --cluster`: one round's header reads on one dask worker.

The coordinator (headers.py) admits a worker with `admit` (`Client.run`): the worker opens its
own connection to the bucket, with its own credentials (or the coordinator's, forwarded the same
way as for migrate), and lists one key to show it can. Then each `read_batch` (a dask task)
reads a few hundred headers on this worker's threads and returns the results as plain data;
nothing here opens the state DB or sees the patient key. Task keys carry a run token and a
number only (the dask dashboard shows them).
"""

from __future__ import annotations

import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from typing import Any

from cloudexit.cluster.sameness import other_code
from cloudexit.cluster.service import end_idle, worker_label
from cloudexit.core.config import SourceConfig
from cloudexit.core.errors import CloudexitError
from cloudexit.s3.client import Credentials, Endpoint
from cloudexit.transfer.headers import HeaderReader, HeaderResult, Item

_readers: dict[str, Readers] = {}
_lock = threading.Lock()


class Readers:
    """One round's header readers on this worker: a connection to the bucket per thread."""

    def __init__(self, name: str, url: str, config: SourceConfig, endpoint: Endpoint, threads: int,
                 header_bytes: int, max_header_bytes: int, credentials: Credentials | None) -> None:
        from cloudexit.s3.lean import LeanS3
        from cloudexit.s3.source import Source

        self.name = name
        self.source = Source(url, config, credentials=credentials)
        if isinstance(endpoint.verify, str) and not os.path.exists(endpoint.verify):
            # The coordinator's CA bundle is not at the same path here: this machine's, as boto3's.
            endpoint = replace(endpoint, verify=self.source.ca_bundle())
        # Reachable, and these credentials may list the bucket: asked with few retries, as the
        # coordinator waits for the answer (an unreachable endpoint is said in seconds, not minutes).
        probe = LeanS3(Source(url, replace(config, max_attempts=2), credentials=credentials), endpoint)
        try:
            probe.check()
        finally:
            probe.close()
        self.lean = LeanS3(self.source, endpoint)
        self.reader = HeaderReader(self.lean, header_bytes, max_header_bytes)
        self.pool = ThreadPoolExecutor(threads, thread_name_prefix="cloudexit-header")
        self.last_active = time.monotonic()
        self.running = 0

    def read(self, items: list[Item]) -> list[HeaderResult]:
        self.running += 1
        try:
            futures = [self.pool.submit(self.reader.read, *item) for item in items]
            return [f.result() for f in futures]
        finally:
            self.running -= 1
            self.last_active = time.monotonic()

    def busy(self) -> bool:
        return self.running > 0

    def end(self) -> None:
        self.reader.stop.set()
        self.pool.shutdown(wait=True, cancel_futures=True)
        self.lean.close()


def admit(token: str, url: str, config: SourceConfig, endpoint: Endpoint, threads: int, header_bytes: int,
          max_header_bytes: int, credentials: Credentials | None, code: str,
          dask_worker: Any = None) -> dict[str, str | None]:
    """Can this worker read the bucket: {"worker": its name, "problem": None or why not}; it
    must run the coordinator's cloudexit (`code`: sameness.py). Ends other rounds' readers left
    idle (a coordinator killed, or gone without a word)."""
    name = worker_label(dask_worker) if dask_worker is not None else "?"
    problem = other_code(code)
    if problem is not None:
        return {"worker": name, "problem": problem}
    with _lock:
        end_idle(_readers, token)
        if token in _readers:
            return {"worker": name, "problem": None}
        try:
            _readers[token] = Readers(name, url, config, endpoint, threads, header_bytes, max_header_bytes,
                                      credentials)
        except CloudexitError as exc:
            return {"worker": name, "problem": exc.message}
        except Exception as exc:  # noqa: BLE001 - botocore's configuration errors: said, not raised
            return {"worker": name, "problem": f"{type(exc).__name__}: {exc}"}
    return {"worker": name, "problem": None}


def read_batch(token: str, items: list[Item]) -> tuple[str, list[HeaderResult] | None, tuple[str, str, str] | None]:
    """One batch: (worker name, its results, None) or, when nothing more can be read here
    (credentials, endpoint), (name, None, (error class, message, hint)). Results None without
    an error: this worker has no readers for the round (it restarted, or was never admitted).
    Never raises: dask would log the arguments, keys and all."""
    readers = _readers.get(token)
    if readers is None:
        return "?", None, None
    try:
        return readers.name, readers.read(items), None
    except CloudexitError as exc:
        return readers.name, None, (type(exc).__name__, exc.message, exc.hint or "")
    except Exception as exc:  # noqa: BLE001 - a bug: the coordinator says it, without the keys
        return readers.name, None, ("StateError", f"{type(exc).__name__}: {exc}", "")


def set_credentials(token: str, credentials: Credentials) -> None:
    """The coordinator's renewed credentials (forwarded)."""
    readers = _readers.get(token)
    if readers is not None:
        readers.source.credentials = credentials
        readers.lean.reader.set_credentials(credentials)


def end(token: str) -> None:
    with _lock:
        readers = _readers.pop(token, None)
    if readers is not None:
        readers.end()
