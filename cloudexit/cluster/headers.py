"""`ClusterHeaders`: `inventory --cluster` reads the DICOM headers on dask.distributed workers.

The inventory (the coordinator) stays the only writer of the state DB: it hands keys to this
object in batches of a few hundred (a dask task each, a few per worker in flight, so memory
stays flat), and commits the results as they come back (`Reads` of transfer/headers.py, as its
own threads would give them). Each worker reads with its own S3 credentials (or the
coordinator's, `--cluster-credentials forward`, under the rule of address.py); at the start and
when a worker joins, it must list the bucket first (headerservice.admit), and one that cannot is
named in one error line, or left out with a warning under `--cluster-min-workers`. A worker
lost mid-batch: dask runs the batch again on another; a batch that can run nowhere is dropped
and its keys, still pending in the DB, are handed out again. Requests and bytes come back with
each result, into the round's counts and link evidence as the local reads' do. Patient IDs come
back as read and are hashed by the inventory: the patient key never leaves this machine.
Listing stays on the coordinator: one paginated stream per folder range, cheap next to a GET a
key, and the listing is what plans the reads.
"""

from __future__ import annotations

import math
import secrets
import time
from dataclasses import replace
from typing import Any, Callable

from cloudexit.cluster import headerservice
from cloudexit.cluster.sameness import code_fingerprint
from cloudexit.cluster.address import ClusterAddress, check_credentials_mode, check_header_reads
from cloudexit.cluster.connect import (TELL_TIMEOUT, ask, check_dask, open_client, present, refuse,
                                       sort_answers)
from cloudexit.core import errors
from cloudexit.core.config import InventoryConfig
from cloudexit.core.errors import StateError
from cloudexit.s3.client import Credentials, Endpoint
from cloudexit.transfer.headers import HeaderResult, Item

BATCH_KEYS = 200  # keys a dask task reads (dask costs ~ms of CPU a task: a few hundred keys each)
MIN_BATCH = 10  # a smaller batch is not worth a task, unless that is all there is
BATCHES_PER_WORKER = 3  # in flight on each worker: one reading, others ready behind it
LOCAL_THREADS = 4  # dask threads per LocalCluster worker: batches it works on at once
MEMBERSHIP_EVERY = 2.0  # seconds between looks at which workers are there
CREDENTIALS_EVERY = 300.0  # seconds between looks at renewed credentials to forward
NO_WORKER_GRACE = 300.0  # seconds without any admitted worker before the round stops


class ClusterHeaders:
    """Header reads on a dask cluster, for one inventory round."""

    def __init__(self, address: ClusterAddress, credentials: str = "worker", min_workers: int | None = None,
                 notice: Callable[[str], None] | None = None, wait_for_workers: float = 60.0) -> None:
        """As `DaskExecutor` (executor.py): refused at once when dask is missing or forwarding
        is not allowed to this address, and over plain tcp:// to another machine (patient IDs)."""
        check_header_reads(address)
        check_credentials_mode(address, credentials)
        check_dask(address)
        self.address, self.mode, self.min_workers = address, credentials, min_workers
        self.notice = notice or (lambda text: None)
        self.wait = wait_for_workers
        self.token = secrets.token_hex(6)
        self.client: Any = None
        self.cluster: Any = None
        self.admitted: dict[str, str] = {}  # address -> name
        self.refused: dict[str, str] = {}  # address -> why
        self.futures: dict[Any, tuple[list[str], frozenset[str]]] = {}  # -> keys, where it may run
        self.keys: set[str] = set()  # in flight
        self.done: list[Any] = []
        self.batches = 0
        self.capacity = 0
        self.next_look = 0.0
        self.next_renewal = 0.0
        self.alone_since: float | None = None
        self.forwarded: Credentials | None = None
        self.dashboard: str | None = None

    # -- set-up -------------------------------------------------------------------------------------
    def start(self, source: Any, config: InventoryConfig, endpoint: Endpoint, wake: Callable[[], None]
              ) -> ClusterHeaders:
        """Connect, wait for workers, admit them (each reads with `config.workers` threads)."""
        self.source, self.wake = source, wake
        # Forwarded: no profile name (the keys are given). The endpoint goes as resolved here.
        self.forwarded = source.frozen_credentials() if self.mode == "forward" else None
        self.source_config = replace(source.config, profile=None) if self.forwarded else source.config
        self.endpoint = endpoint
        self.reading = (config.workers, config.header_bytes, config.max_header_bytes)
        self.cluster, self.client = open_client(self.address, LOCAL_THREADS)
        self.dashboard = self.client.dashboard_link
        if self.dashboard:
            self.notice(f"dask dashboard: {self.dashboard}")
        need = max(1, self.min_workers or 1)
        try:
            self.client.wait_for_workers(need, timeout=self.wait)
        except (TimeoutError, OSError):
            raise StateError(f"fewer than {need} dask workers joined {self.address.url} within "
                             f"{self.wait:.0f} s", hint=f"start workers with `dask worker {self.address.url}` "
                             "on machines that can reach the bucket") from None
        self._look(first=True)
        self.next_renewal = time.monotonic() + CREDENTIALS_EVERY
        return self

    def _look(self, first: bool = False) -> None:
        """Admit new workers (after they listed the bucket), forget those that left."""
        here = present(self.client)
        for addr in [a for a in self.admitted if a not in here]:
            self.notice(f"dask worker {self.admitted.pop(addr)} left the inventory")
        new = [a for a in here if a not in self.admitted and a not in self.refused]
        if new:
            found = ask(self.client, headerservice.admit, self.token, self.source.url, self.source_config,
                        self.endpoint, *self.reading, self.forwarded, code_fingerprint(), workers=new)
            ok, bad = sort_answers(found, new)
            for addr in ok:  # first: close() ends their readers if the others stop the round
                self.admitted[addr] = str(found[addr]["worker"])
                if not first:
                    self.notice(f"dask worker {self.admitted[addr]} joined the inventory")
            refuse(bad, first, len(self.admitted), self.min_workers, "inventory",
                   "every worker must reach the bucket's endpoint and have S3 credentials of its own "
                   "(instance role, profile or AWS_* variables), or use --cluster-credentials "
                   "forward over tls://", self.notice)
            self.refused.update(bad)
        # Batches whose workers all left would wait for them forever: their keys go out again.
        live = set(self.admitted)
        for future in [f for f, (_keys, where) in self.futures.items() if not where & live]:
            self._forget(future)
            future.cancel()
        self.capacity = len(self.admitted) * BATCHES_PER_WORKER * BATCH_KEYS
        self.alone_since = None if self.admitted else (self.alone_since or time.monotonic())
        self.next_look = time.monotonic() + MEMBERSHIP_EVERY

    # -- Reads (transfer/headers.py) ----------------------------------------------------------------
    def busy(self, key: str) -> bool:
        return key in self.keys

    def pending(self) -> int:
        return len(self.keys)

    def submit(self, items: list[Item]) -> None:
        if not items or not self.admitted:
            return
        slots = max(1, len(self.admitted) * BATCHES_PER_WORKER - len(self.futures))
        size = min(BATCH_KEYS, max(MIN_BATCH, math.ceil(len(items) / slots)))
        where = frozenset(self.admitted)
        for i in range(0, len(items), size):
            batch = items[i:i + size]
            self.batches += 1
            # The key names the round and the batch number only: the dashboard shows it.
            future = self.client.submit(headerservice.read_batch, self.token, batch,
                                        key=f"cloudexit-headers-{self.token}-{self.batches}",
                                        workers=list(where), allow_other_workers=False, pure=False)
            self.futures[future] = ([k for k, _s, _e in batch], where)
            self.keys.update(k for k, _s, _e in batch)
            future.add_done_callback(self._finished)

    def _finished(self, future: Any) -> None:
        self.done.append(future)  # on the client's thread: a list append only
        self.wake()

    def finished(self) -> list[HeaderResult]:
        clock = time.monotonic()
        if clock >= self.next_look:
            try:
                self._look()
            except StateError:
                raise
            except Exception as exc:  # noqa: BLE001 - the scheduler restarting: wait, say so once
                if self.alone_since is None:
                    self.notice(f"warning: the dask scheduler does not answer ({type(exc).__name__}); waiting")
                self.admitted.clear()  # admitted again (their readers kept) once it answers
                self.alone_since = self.alone_since or clock
                self.capacity = 0
                self.next_look = clock + MEMBERSHIP_EVERY
        if self.alone_since is not None and clock - self.alone_since > NO_WORKER_GRACE:
            raise StateError(f"no dask worker has been available for {NO_WORKER_GRACE:.0f} s at "
                             f"{self.address.url}", hint="start workers, then run inventory again to continue")
        if self.forwarded is not None and clock >= self.next_renewal:
            self._renew()
        if not self.admitted:  # nothing can be read: wait for a worker, without spinning
            time.sleep(MEMBERSHIP_EVERY / 4)
        out: list[HeaderResult] = []
        while self.done:
            future = self.done.pop()
            if future not in self.futures:
                continue  # forgotten already
            self._forget(future)
            try:
                _name, results, fatal = future.result()
            except Exception:  # noqa: BLE001 - KilledWorker, CancelledError: its keys go out again
                continue
            if fatal is not None:
                kind, message, hint = fatal
                error = getattr(errors, kind, None)
                if not (isinstance(error, type) and issubclass(error, errors.CloudexitError)):
                    error = StateError
                raise error(f"dask worker {_name}: {message}", hint=hint or None)
            if results is None:  # ran on a worker without readers for this round: admit it first
                self.next_look = 0.0
                continue
            out.extend(results)
        return out

    def _forget(self, future: Any) -> None:
        keys, _where = self.futures.pop(future)
        self.keys.difference_update(keys)

    def _renew(self) -> None:
        """Forwarded credentials the coordinator's chain renewed go to the workers (directly,
        never in a task's arguments)."""
        self.next_renewal = time.monotonic() + CREDENTIALS_EVERY
        renewed = self.source.frozen_credentials()
        if renewed != self.forwarded:
            self.forwarded = renewed
            self.client.run(headerservice.set_credentials, self.token, renewed, workers=list(self.admitted),
                            on_error="ignore", callback_timeout=TELL_TIMEOUT)

    def close(self) -> None:
        """Idempotent; also after a failed start."""
        client, self.client = self.client, None
        try:
            if client is not None:
                for future in list(self.futures):
                    future.cancel()
                self.futures.clear()
                self.keys.clear()
                if self.admitted:
                    client.run(headerservice.end, self.token, workers=list(self.admitted), on_error="ignore",
                               callback_timeout=TELL_TIMEOUT)
        except Exception:  # noqa: BLE001 - the scheduler may be gone; the workers end theirs when idle
            pass
        finally:
            if client is not None:
                client.close(timeout=10)
            if self.cluster is not None:
                self.cluster.close(timeout=10)
                self.cluster = None
