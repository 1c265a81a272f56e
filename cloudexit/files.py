"""Files that may name patients, keys or buckets: created owner-only (0600)."""

from __future__ import annotations

import os
from pathlib import Path


def write_private(path: str | os.PathLike[str], data: str | bytes, durable: bool = False) -> None:
    """Write `data` to `path`, readable by its owner only.

    `durable`: write a temp file beside it, fsync, then rename over `path`, so a crash leaves
    either the old file or the new one, never half of it. The mode is set on the open file
    descriptor too: O_CREAT's mode does not apply to a file that already exists.
    """
    target = Path(path)
    raw = data.encode("utf-8") if isinstance(data, str) else data
    tmp = target.with_name(target.name + ".tmp") if durable else target
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    with os.fdopen(fd, "wb") as fh:
        os.fchmod(fh.fileno(), 0o600)
        fh.write(raw)
        if durable:
            fh.flush()
            os.fsync(fh.fileno())
    if durable:
        os.replace(tmp, target)
