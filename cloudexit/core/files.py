"""Files that may name patients, keys or buckets: created owner-only (0600), in folders
created owner-only (0700) when they are missing."""

from __future__ import annotations

import errno
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO


def write_private(path: str | os.PathLike[str], data: str | bytes, durable: bool = False) -> None:
    """Write `data` to `path`, readable by its owner only.

    `durable`: write a temp file beside it, fsync, then rename over `path`, so a crash leaves
    either the old file or the new one, never half of it.
    """
    raw = data.encode("utf-8") if isinstance(data, str) else data
    make_parent_dirs(path)
    if durable:
        with private_writer(path) as fh:
            fh.write(raw)
        return
    with open_private(Path(path)) as fh:
        fh.write(raw)


@contextmanager
def private_writer(path: str | os.PathLike[str]) -> Iterator[BinaryIO]:
    """A file to stream into, owner-only; it replaces `path` (fsynced) only when the block ends
    without an error, so a reader never sees half of it."""
    target = Path(path)
    tmp = target.with_name(target.name + ".tmp")
    make_parent_dirs(target)
    try:
        with open_private(tmp) as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def open_private(path: str | os.PathLike[str], buffering: int = -1) -> BinaryIO:
    """`path` opened for writing (truncated), owner-only."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    # O_CREAT's mode does not apply to a file that already exists.
    os.fchmod(fd, 0o600)
    return os.fdopen(fd, "wb", buffering=buffering)


def make_parent_dirs(path: str | os.PathLike[str]) -> None:
    """Create the missing folders above `path`, 0700: every output of every command does the
    same (a user who names `reports/plan.html` expects `reports/` to appear)."""
    parent = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(parent):
        make_private_dirs(parent)


def make_private_dirs(path: str | os.PathLike[str]) -> None:
    """`os.makedirs` with every folder it creates 0700 (makedirs applies the mode to the leaf
    only). Safe when several threads create the same folders at once."""
    path = os.fspath(path)
    try:
        os.mkdir(path, 0o700)
        return
    except FileExistsError:
        if os.path.isdir(path):
            return
        raise NotADirectoryError(errno.ENOTDIR, "a file is in the way of a folder", path) from None
    except FileNotFoundError:
        parent = os.path.dirname(path)
        if parent == path:
            raise
        make_private_dirs(parent)
    try:
        os.mkdir(path, 0o700)
    except FileExistsError:
        if not os.path.isdir(path):
            raise NotADirectoryError(errno.ENOTDIR, "a file is in the way of a folder", path) from None


@contextmanager
def new_output(path: str | os.PathLike[str], fsync: bool = True) -> Iterator[int]:
    """A new file (0600, never through a symlink) as a raw fd: fsynced (if asked) and closed when
    the block ends, removed when it raises, so a failed decode leaves no half file behind."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        yield fd
        if fsync:
            os.fsync(fd)
    except BaseException:
        os.close(fd)
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
        raise
    os.close(fd)
