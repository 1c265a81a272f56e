"""The archive on disk: layouts, safe paths, atomic placement.

Layouts (`--layout`):
* `uid` (default): `STUDY_UID/SERIES_UID/SOP_UID.dcm`, the layout Google's Healthcare export and
  most PACS tools understand;
* `keys`: the source keys, sanitised by `cloudexit.paths.safe_relative_path` (`..` escaped,
  backslashes and control characters escaped, over-long segments shortened with a hash).

Side areas, never mixed with the images (underscore names cannot be UIDs):
* `_non-dicom/<key>`: objects that are not DICOM (sidecars, thumbnails, reports);
* `_quarantine/unreadable/<key>`: DICOM the inventory could not use (truncated, no UIDs);
* `_quarantine/conflicts/<SOP_UID>/<hash of key>.dcm`: a second object claiming a SOP Instance
  UID already taken by another key, with different content;
* `_quarantine/mismatch/<key>`: a download whose header does not match the inventory.

Whatever the key, the path stays inside DEST: segments come from UIDs (digits and dots only) or
from `safe_relative_path`; parent directories are resolved and checked to be inside DEST before
anything is written (so a symlink planted in DEST cannot redirect writes), and files are opened
with O_NOFOLLOW. Files are created 0600 and directories 0700.
"""

from __future__ import annotations

import errno
import hashlib
import os
import re
import shutil
from collections.abc import Iterable
from pathlib import Path, PurePosixPath
from typing import ClassVar

from ..files import make_private_dirs
from ..paths import safe_relative_path
from . import Delivery, Item, StoreError

UID = re.compile(r"^[0-9]+(\.[0-9]+)*$")
TEMP_PREFIX = ".cloudexit-"
SIDE_AREAS = ("_non-dicom", "_quarantine")
NON_DICOM = "_non-dicom"
QUARANTINE = "_quarantine"
MISMATCH = f"{QUARANTINE}/mismatch"


def key_hash(key: str, n: int = 16) -> str:
    return hashlib.sha256(key.encode("utf-8", "surrogatepass")).hexdigest()[:n]


def _uid_segment(uid: str | None, what: str) -> str:
    if uid and UID.match(uid) and len(uid) <= 64:
        return uid
    if not uid:
        return f"unknown-{what}"
    return f"x-{key_hash(uid)}"  # not a valid UID: never used as a name as it is


def safe_key_path(key: str) -> str:
    """The key as a relative path that cannot leave DEST nor hit our own names."""
    parts = list(safe_relative_path(key).parts)
    parts = [("%2E" + p[1:]) if p.startswith(TEMP_PREFIX) else p for p in parts]
    if parts and parts[0] in SIDE_AREAS:
        parts[0] = "%5F" + parts[0][1:]
    return str(PurePosixPath(*parts))


class FilesystemStore:
    """A folder that receives the archive."""

    kind: ClassVar[str] = "filesystem"

    def __init__(self, root: str | os.PathLike[str], layout: str = "uid") -> None:
        self.root = Path(os.path.abspath(os.path.expanduser(os.fspath(root))))
        self._root_str = str(self.root).rstrip("/")  # "" for the root folder itself
        self.url = f"file://{self.root}"
        self.id = self.url
        self.layout = layout
        self.parallel = 4

    # -- where things go -------------------------------------------------------------------------
    def path_for(self, key: str, kind: str, study: str | None, series: str | None,
                 sop: str | None) -> str:
        """Relative path of an object in this archive (before collision handling)."""
        if kind == "other":
            return f"{NON_DICOM}/{safe_key_path(key)}"
        if kind == "unreadable" or kind == "pending":
            return f"{QUARANTINE}/unreadable/{safe_key_path(key)}"
        if self.layout == "keys":
            return safe_key_path(key)
        return f"{_uid_segment(study, 'study')}/{_uid_segment(series, 'series')}/{_uid_segment(sop, 'sop')}.dcm"

    def conflict_path(self, key: str, sop: str | None) -> str:
        return f"{QUARANTINE}/conflicts/{_uid_segment(sop, 'sop')}/{key_hash(key)}.dcm"

    def mismatch_path(self, key: str) -> str:
        return f"{MISMATCH}/{safe_key_path(key)}"

    def absolute(self, relative: str) -> str:
        root = self._root_str
        full = os.path.normpath(relative if relative.startswith("/") else f"{root}/{relative}")
        if not (full + os.sep).startswith(root + os.sep):
            raise StoreError(f"refusing to write outside {self.root}: {relative!r}")
        return full

    def temp_for(self, relative: str, key: str, etag: str) -> str:
        """The temp file beside the final path; its name binds it to the object version."""
        return self.temp_beside(self.absolute(relative), key, etag)

    @staticmethod
    def temp_beside(final: str, key: str, etag: str) -> str:
        """`temp_for`, given the absolute final path."""
        return f"{os.path.dirname(final)}/{TEMP_PREFIX}{key_hash(key + chr(0) + etag, 24)}.part"

    # -- Store protocol ---------------------------------------------------------------------------
    def check(self) -> None:
        root = self.root
        try:
            make_private_dirs(str(root))
        except OSError as exc:
            raise StoreError(f"cannot create the archive folder {root}: {exc.strerror}",
                             hint="choose a writable --to folder") from exc
        if not root.is_dir():
            raise StoreError(f"--to {root} is not a folder")
        probe = root / f"{TEMP_PREFIX}probe-{os.getpid()}"
        try:
            fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            os.close(fd)
            os.unlink(probe)
        except OSError as exc:
            raise StoreError(f"the archive folder {root} is not writable: {exc.strerror}",
                             hint="fix its permissions or mount, then run the command again") from exc

    def free_bytes(self) -> int:
        return shutil.disk_usage(self.root).free

    def deliver(self, item: Item, staged: str) -> Delivery:
        """Copy a verified file staged elsewhere into the archive (fsync + atomic rename)."""
        relative = self.path_for(item.key, item.kind, item.study_uid, item.series_uid, item.sop_uid)
        final = self.absolute(relative)
        placer = Placer(str(self.root))
        placer.prepare(final)
        temp = self.temp_for(relative, item.key, item.sha256)
        fd = placer.open_temp(temp, truncate=True)
        try:
            with open(staged, "rb") as src:
                while True:
                    chunk = src.read(2**20)
                    if not chunk:
                        break
                    os.write(fd, chunk)
            placer.place(fd, temp, final)
        except OSError as exc:
            placer.discard(temp)
            raise StoreError(f"cannot write {final}: {exc.strerror}") from exc
        finally:
            os.close(fd)
        return Delivery("stored", location=relative)

    def close(self) -> None:
        pass


class Placer:
    """File operations of the workers: directories, temp files, fsync + atomic rename."""

    def __init__(self, root: str, fsync: bool = True) -> None:
        self.base = root  # as the engine builds paths
        self.root = os.path.realpath(root)  # for the containment check
        self.fsync = fsync
        self._checked: set[str] = set()

    def prepare(self, final: str) -> None:
        """Create the parent folders (0700) and check they resolve inside the archive."""
        parent = os.path.dirname(final)
        if parent in self._checked:
            return
        make_private_dirs(parent)
        real = os.path.realpath(parent)
        if real != self.root and not real.startswith(self.root + os.sep):
            raise OSError(errno.ELOOP, f"{parent} resolves outside the archive ({real})")
        if len(self._checked) > 100_000:
            self._checked.clear()
        self._checked.add(parent)

    def open_temp(self, temp: str, truncate: bool, size: int | None = None) -> int:
        flags = os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC
        if truncate:
            flags |= os.O_TRUNC
        fd = os.open(temp, flags, 0o600)
        if truncate and size:
            try:
                os.posix_fallocate(fd, 0, size)  # reserve the space now: disk full shows early
            except OSError as exc:
                if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                    os.close(fd)
                    self.discard(temp)
                    raise
        return fd

    @staticmethod
    def partial_size(temp: str, size: int) -> int:
        """Bytes of a temp file to resume from (0: start over)."""
        try:
            have = os.stat(temp, follow_symlinks=False).st_size
        except FileNotFoundError:
            return 0
        if size <= 0 or have <= 0 or have > size:
            return 0
        return min(have, size - 1)  # a complete temp still re-reads its last byte: one tiny GET

    def place(self, fd: int, temp: str, final: str, sync_folder: bool = True) -> bool:
        """fsync the temp file, rename it to `final`, fsync the folder. True if it replaced
        a file that was there.

        sync_folder=False leaves the folder's fsync to the caller (`sync_folders`, once for a
        batch of files): the file is not durable under its name until then."""
        if self.fsync:
            os.fsync(fd)
        replaced = os.path.lexists(final)
        if replaced and os.path.isdir(final) and not os.path.islink(final):
            raise OSError(errno.EISDIR, f"a folder is in the way of {final}")
        os.rename(temp, final)
        if sync_folder:
            self.sync_folders([os.path.dirname(final)])
        return replaced

    def sync_folders(self, folders: Iterable[str]) -> None:
        """fsync each folder once (its new entries become durable)."""
        if not self.fsync:
            return
        for folder in folders:
            dfd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
            try:
                os.fsync(dfd)
            finally:
                os.close(dfd)

    @staticmethod
    def discard(temp: str) -> None:
        try:
            os.unlink(temp)
        except FileNotFoundError:
            pass
