"""`--cluster` and its options, for `migrate` and `inventory` (cloudexit/cluster/,
docs/scale-out.md).

The options keep their values in the click context (no parameters added to the command's
function); `cluster_executor()` turns them into a `DaskExecutor`, or None (this machine's
worker processes), `cluster_headers()` into `ClusterHeaders`, or None (threads here).
"""

from __future__ import annotations

from typing import Any, Callable

import click

_KEY = "cloudexit.cluster"


def _keep(ctx: click.Context, param: click.Parameter, value: Any) -> Any:
    ctx.meta.setdefault(_KEY, {})[param.name] = value
    return value


def _options(work: str, needs: str, refused: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    def add(f: Callable[..., Any]) -> Callable[..., Any]:
        f = click.option("--cluster", envvar="CLOUDEXIT_CLUSTER", default=None, expose_value=False,
                         callback=_keep, metavar="ADDRESS",
                         help=f"Run {work} on a dask.distributed cluster: tcp://HOST:8786 or "
                              "tls://HOST:8786 (a `dask scheduler`), or local:N (N worker processes "
                              f"here). {needs} Env CLOUDEXIT_CLUSTER. See docs/scale-out.md.")(f)
        f = click.option("--cluster-credentials", type=click.Choice(["worker", "forward"]), default="worker",
                         show_default=True, expose_value=False, callback=_keep,
                         help="worker: each worker uses its own S3 credentials (role, profile, env); "
                              "forward: send this machine's, only over tls:// or to a scheduler on "
                              "this machine.")(f)
        f = click.option("--cluster-min-workers", type=click.IntRange(1, 10_000), default=None,
                         expose_value=False, callback=_keep,
                         help=f"Leave out (with a warning) workers that cannot {refused}, as "
                              "long as this many can; without it any such worker stops the run.")(f)
        return f
    return add


# migrate --cluster, inventory --cluster
_migrate_options = _options("the downloads", "Workers must mount the archive at the same path.",
                            "read the archive")


def cluster_options(f: Callable[..., Any]) -> Callable[..., Any]:
    f = _migrate_options(f)
    return click.option("--cluster-wait", default="5m", show_default=True, expose_value=False, callback=_keep,
                        metavar="DURATION",
                        help="How long a run waits for a dask scheduler that stopped answering (a "
                             "restart), or for a worker when none is left, before it stops "
                             "(--resume continues), e.g. 90s, 10m, 1h.")(f)


inventory_cluster_options = _options("the header reads", "Workers must reach the bucket.", "read the bucket")


def _given(quiet: bool) -> tuple[dict[str, Any], Callable[[str], None]] | None:
    """The --cluster options given, and where notices go (warnings only when quiet)."""
    options = click.get_current_context().meta.get(_KEY, {})
    if not options.get("cluster"):
        return None

    def notice(text: str) -> None:
        if not quiet or text.startswith("warning"):
            click.echo(text, err=True)

    return options, notice


def cluster_executor(profile: str | None, quiet: bool) -> Any:
    """A DaskExecutor for the options given, or None when no --cluster was given."""
    from cloudexit.cluster.address import parse
    from cloudexit.cluster.executor import DaskExecutor
    from cloudexit.core.errors import UsageError
    from cloudexit.core.units import parse_duration

    given = _given(quiet)
    if given is None:
        return None
    options, notice = given
    try:
        grace = parse_duration(options.get("cluster_wait") or "5m").total_seconds()
    except UsageError as exc:
        raise UsageError(f"--cluster-wait: {exc.message}", hint="e.g. --cluster-wait 90s, 10m or 1h") from None
    return DaskExecutor(parse(options["cluster"]), credentials=options.get("cluster_credentials") or "worker",
                        min_workers=options.get("cluster_min_workers"), profile=profile, notice=notice,
                        grace=grace)


def cluster_headers(quiet: bool) -> Any:
    """`inventory --cluster`: a ClusterHeaders for the options given, or None (threads here)."""
    from cloudexit.cluster.address import parse
    from cloudexit.cluster.headers import ClusterHeaders

    given = _given(quiet)
    if given is None:
        return None
    options, notice = given
    return ClusterHeaders(parse(options["cluster"]), credentials=options.get("cluster_credentials") or "worker",
                          min_workers=options.get("cluster_min_workers"), notice=notice)
