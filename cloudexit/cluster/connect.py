"""What `migrate --cluster` and `inventory --cluster` share: dask.distributed checked, the
client (and for local:N the LocalCluster) opened, and the workers' answers to an admission
check turned into admitted workers, or one error line naming those that cannot take part."""

from __future__ import annotations

import logging
from typing import Any, Callable

from cloudexit.cluster.address import ClusterAddress
from cloudexit.core.errors import StateError, UsageError

# dask's defaults suit interactive analysis; a migration's dask processes mostly wait while
# cloudexit's worker processes work, and these timers cost CPU per second, not per GB
# (docs/performance.md, Cluster). `--cluster local:N` applies them; docs/scale-out.md gives
# them to `dask scheduler` and `dask worker` as DASK_* variables.
DASK_SETTINGS: dict[str, Any] = {
    "distributed.worker.profile.enabled": False,  # samples every thread's stack 100 times a second
    "distributed.admin.tick.interval": "500ms",  # event-loop health check, 50 times a second
    "distributed.admin.system-monitor.interval": "2s",  # psutil readings for the dashboard
    "distributed.worker.memory.monitor-interval": "1s",  # a batch's results are a few KB
    "distributed.scheduler.work-stealing": False,  # batches are pinned to admitted workers
    "distributed.scheduler.active-memory-manager.start": False,  # tasks share no data
}


def dask_environment() -> dict[str, str]:
    """DASK_SETTINGS as the DASK_* variables `dask scheduler` and `dask worker` read."""
    return {"DASK_" + key.upper().replace(".", "__").replace("-", "_"): str(value)
            for key, value in DASK_SETTINGS.items()}


# Seconds to reach the scheduler, at start and at each attempt to reconnect: a wrong address
# or a scheduler that is down is said at once (dask's default is 30 s), and the engine's
# thread, which dials again while the scheduler restarts, is not held long.
CONNECT_TIMEOUT = 5.0
# Seconds for an answer once connected: a scheduler or worker that is stopped (SIGSTOP, a frozen
# VM) keeps its connections open and never answers; without a bound the run would wait forever.
LOOK_TIMEOUT = 10.0  # the scheduler's list of workers
ANSWER_TIMEOUT = 120.0  # the workers' answer to an admission check or a start (Client.run)
TELL_TIMEOUT = 10.0  # a worker told something (a rate, credentials, the end)


def check_dask(address: ClusterAddress) -> None:
    """dask.distributed is installed, and for tls:// it has the certificates to use (without
    them dask fails with a TypeError deep in its connect)."""
    try:
        import distributed
    except ImportError:
        raise UsageError("--cluster needs dask.distributed, which is not installed",
                         hint="pip install 'cloudexit[cluster]'") from None
    if address.scheme != "tls":
        return
    hint = "give dask the CA, certificate and key in its configuration (docs/scale-out.md, TLS)"
    try:
        context = distributed.Security().get_connection_args("client").get("ssl_context")
    except (OSError, ValueError) as exc:  # a file named there is missing, unreadable or not PEM
        raise UsageError(f"--cluster {address.url}: dask's TLS settings cannot be used: {exc}", hint=hint) from None
    if context is None:
        raise UsageError(f"--cluster {address.url}: dask has no TLS certificates configured", hint=hint)


def open_client(address: ClusterAddress, threads: int) -> tuple[Any, Any]:
    """(LocalCluster or None, Client) for `address`; local:N starts N worker processes of
    `threads` dask threads each. StateError when the scheduler cannot be reached."""
    import distributed

    cluster = None
    try:
        if address.scheme == "local":
            import dask

            # Not daemonic: cloudexit's worker processes are its children.
            with dask.config.set({**DASK_SETTINGS, "distributed.worker.daemon": False}):
                cluster = distributed.LocalCluster(
                    n_workers=address.workers, threads_per_worker=threads, processes=True,
                    host="127.0.0.1", dashboard_address="127.0.0.1:0", silence_logs=40)
            return cluster, distributed.Client(cluster, timeout=30)
        # dask's client logs its connection troubles with tracebacks on stderr: the executors
        # say what matters (waiting, back, given up) in their own lines.
        # (dask's configuration gives some of its loggers levels of their own: each is set.)
        for name in [n for n in logging.root.manager.loggerDict if n.split(".")[0] == "distributed"]:
            logging.getLogger(name).setLevel(logging.CRITICAL)
        return None, distributed.Client(address.url, timeout=CONNECT_TIMEOUT)
    except (OSError, TimeoutError) as exc:
        if cluster is not None:
            cluster.close(timeout=10)
        raise StateError(f"cannot reach the dask scheduler at {address.url} ({type(exc).__name__}: {exc})",
                         hint=f"is `dask scheduler` running on {address.host or 'this machine'}? Check the "
                              f"address, the port ({address.port or 8786}) and any firewall between here "
                              "and there (docs/scale-out.md, Deploy)") from None


def present(client: Any, metrics: dict[str, Any] | None = None) -> dict[str, int]:
    """The workers the scheduler knows: address -> dask threads; `metrics`, if given, gets
    each one's metrics from its last heartbeat (address -> dict). Raises (ConnectionError,
    TimeoutError, OSError) when the scheduler does not answer within LOOK_TIMEOUT."""
    if client.status != "running":  # dask's client reconnecting, or given up
        raise ConnectionError("the connection to it was lost")
    # Not `scheduler_info()`: it waits for ever on a scheduler that does not answer, and hides a
    # lost connection behind its last answer. This is the call its docstring points to.
    info = client.sync(client.scheduler.identity, n_workers=-1, callback_timeout=LOOK_TIMEOUT)["workers"]
    if metrics is not None:
        metrics.update({addr: w.get("metrics") or {} for addr, w in info.items()})
    return {addr: int(w.get("nthreads", 1)) for addr, w in info.items()}


def ask(client: Any, function: Callable[..., Any], *args: Any, workers: list[str]) -> dict[str, Any]:
    """`Client.run(function, *args)` on `workers`, their answers by address. Those that do not
    answer within ANSWER_TIMEOUT (a frozen machine) answer as a check that failed, saying so:
    dask's TimeoutError is an OSError, which would otherwise read as a problem with a file."""
    try:
        return dict(client.run(function, *args, workers=workers, on_error="return",
                               callback_timeout=ANSWER_TIMEOUT))
    except TimeoutError:
        return {addr: {"worker": addr, "problem": f"it did not answer within {ANSWER_TIMEOUT:.0f} s"}
                for addr in workers}


def sort_answers(found: dict[str, Any], asked: list[str]) -> tuple[list[str], dict[str, str]]:
    """The answers of `Client.run(check, workers=asked, on_error="return")` (each a dict with
    `worker`, its name, and `problem`, None when it may take part): (admitted addresses,
    {address: "name: why not"})."""
    ok, bad = [], {}
    for addr in asked:
        answer = found.get(addr)
        if isinstance(answer, dict) and answer.get("problem") is None:
            ok.append(addr)
        else:
            label = answer.get("worker", addr) if isinstance(answer, dict) else addr
            why = answer.get("problem") if isinstance(answer, dict) else f"it did not answer ({answer})"
            bad[addr] = f"{label}: {why}"
    return ok, bad


def refuse(bad: dict[str, str], first: bool, admitted: int, min_workers: int | None, what: str,
           hint: str, notice: Callable[[str], None]) -> None:
    """Workers that failed the check: at the start, one StateError naming them all unless
    `--cluster-min-workers` is still met by the `admitted`; otherwise each left out, saying so."""
    if not bad:
        return
    if first and (min_workers is None or admitted < min_workers):
        raise StateError(f"dask worker(s) cannot take part in this {what}: " + "; ".join(bad.values()),
                         hint=hint + "; or stop those workers, or allow fewer with --cluster-min-workers")
    for why in bad.values():
        notice(f"warning: dask worker left out: {why}")
