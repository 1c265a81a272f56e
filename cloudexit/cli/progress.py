"""Progress on the terminal: tqdm bars on a terminal, a plain line now and then otherwise."""

from __future__ import annotations

import sys
import time
from typing import Any

import click


class InventoryBar:
    """tqdm bars on a terminal; a plain line every 10 s otherwise."""

    def __init__(self, quiet: bool) -> None:
        self.quiet = quiet
        self.tty = sys.stderr.isatty()
        self.bar: Any = None
        self.last = 0.0

    def __enter__(self) -> "InventoryBar":
        if not self.quiet and self.tty:
            from tqdm import tqdm
            self.bar = tqdm(total=0, unit="obj", desc="inventory", file=sys.stderr, dynamic_ncols=True)
        return self

    def update(self, p: Any) -> None:
        if self.quiet:
            return
        if self.bar is not None:
            self.bar.total = p.listed
            self.bar.n = max(0, p.listed - p.pending)
            self.bar.set_postfix(listed=p.listed, pending=p.pending, failed=p.failed,
                                 listing="done" if p.listing_done else "running", refresh=False)
            self.bar.refresh()
        elif time.monotonic() - self.last > 10:
            self.last = time.monotonic()
            click.echo(f"inventory: {p.listed} listed, {p.listed - p.pending} classified, "
                       f"{p.pending} pending, {p.failed} failed", err=True)

    def __exit__(self, *exc: object) -> None:
        if self.bar is not None:
            self.bar.close()



class ByteBar:
    """A tqdm byte counter on a terminal, nothing otherwise."""

    def __init__(self, quiet: bool, desc: str) -> None:
        self.show = not quiet and sys.stderr.isatty()
        self.desc = desc
        self.bar: Any = None

    def __enter__(self) -> "ByteBar":
        if self.show:
            from tqdm import tqdm
            self.bar = tqdm(unit="B", unit_scale=True, desc=self.desc, file=sys.stderr)
        return self

    def update(self, n: int) -> None:
        if self.bar is not None:
            self.bar.update(n)

    def __exit__(self, *exc: object) -> None:
        if self.bar is not None:
            self.bar.close()



class MigrateBar:
    """A tqdm bar (bytes, objects, rate, ETA, failures) on a terminal; a plain line every
    30 s otherwise, and at once when the run starts or stops waiting for the link."""

    def __init__(self, quiet: bool) -> None:
        self.quiet = quiet
        self.tty = sys.stderr.isatty()
        self.bar: Any = None
        self.last = time.monotonic()
        self.last_bytes = 0
        self.waiting: str | None = None  # the waiting_since last shown
        self.stopping = False

    def __enter__(self) -> "MigrateBar":
        if not self.quiet and self.tty:
            from tqdm import tqdm
            self.bar = tqdm(total=0, unit="B", unit_scale=True, desc="migrate", file=sys.stderr,
                            dynamic_ncols=True)
        return self

    def update(self, p: Any) -> None:
        if p.stopping is not None and not self.stopping:  # Ctrl-C: said at once, even with -q
            self.stopping = True
            if self.bar is not None:
                self.bar.clear()
            click.echo(f"\nstopping: finishing {p.stopping} objects in flight "
                       "(Ctrl-C again to stop now)", err=True)
            return
        if self.quiet:
            return
        from cloudexit.core.units import format_bytes, format_rate

        waiting = ""
        if p.waiting_since:
            waiting = f"waiting for the link since {p.waiting_since}" + (
                f" ({p.waiting_why})" if p.waiting_why else "")
        if self.bar is not None:
            self.bar.total = p.bytes_total
            self.bar.n = p.bytes_done
            self.bar.set_postfix_str(
                f"{p.done}/{p.total} obj, {p.failed} failed"
                + (f", {p.restoring} restoring" if p.restoring else "")
                + (f", limit {format_rate(p.rate_limit)}" if p.rate_limit is not None else "")
                + (f", {waiting}" if waiting else ""), refresh=False)
            self.bar.refresh()
            return
        clock = time.monotonic()
        if p.waiting_since != self.waiting:  # a log under nohup or systemd says so at once
            self.waiting = p.waiting_since
            click.echo(f"migrate: {waiting or 'the link is back'}", err=True)
        if clock - self.last >= 30:
            rate = (p.bytes_done - self.last_bytes) / (clock - self.last)
            self.last, self.last_bytes = clock, p.bytes_done
            eta = (p.bytes_total - p.bytes_done) / rate if rate > 0 else None
            click.echo(f"migrate: {p.done}/{p.total} objects, {format_bytes(p.bytes_done)} of "
                       f"{format_bytes(p.bytes_total)}, {format_bytes(rate)}/s"
                       + (f", ETA {int(eta)} s" if eta is not None else "")
                       + f", {p.failed} failed" + (f", {waiting}" if waiting else ""), err=True)

    def __exit__(self, *exc: object) -> None:
        if self.bar is not None:
            self.bar.close()



class PhaseBar:
    """One tqdm bar per phase (files, studies, samples) on a terminal, with rate and ETA; a
    plain line every 30 s otherwise."""

    def __init__(self, quiet: bool, desc: str) -> None:
        self.quiet = quiet
        self.tty = sys.stderr.isatty()
        self.desc = desc
        self.bar: Any = None
        self.phase = ""
        self.started = self.last = time.monotonic()

    def __call__(self, phase: str, done: int, total: int) -> None:
        if self.quiet:
            return
        if phase != self.phase:
            self.close()
            self.phase, self.started = phase, time.monotonic()
            if self.tty:
                from tqdm import tqdm
                self.bar = tqdm(total=total, unit=phase, desc=f"{self.desc} {phase}", file=sys.stderr,
                                dynamic_ncols=True)
        if self.bar is not None:
            self.bar.total = total
            self.bar.n = done
            self.bar.refresh()
        elif time.monotonic() - self.last >= 30:
            self.last = time.monotonic()
            rate = done / max(self.last - self.started, 1e-6)
            eta = f", ETA {int((total - done) / rate)} s" if rate > 0 and total >= done else ""
            click.echo(f"{self.desc}: {phase} {done}/{total}{eta}", err=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
