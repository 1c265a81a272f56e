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
* `_quarantine/mismatch/<key>`: a download whose header does not match the inventory;
* `_quarantine/case-collisions/<hash of key>`: on a destination that folds case or Unicode
  forms (probed at start: `probe_folding`), an object whose path is another key's under that
  folding;
* `_quarantine/archive-conflicts/<path>~<sha256>`: a verified object whose path already held
  another file (another migration's, in an archive joined with `--join-archive`, or another
  key's under a name a case-folding destination takes as the same): that file is never replaced.

Whatever the key, the path stays inside DEST: segments come from UIDs (digits and dots only) or
from `safe_relative_path`; parent directories are resolved and checked to be inside DEST before
any folder is created in them (so a symlink planted in DEST cannot redirect writes nor make
folders appear elsewhere), and files are opened with O_NOFOLLOW. A file is moved into place
without ever replacing another one (`move_noreplace`). Files are created 0600 and directories
0700.
"""

from __future__ import annotations

import ctypes
import errno
import hashlib
import os
import re
import secrets
import shutil
import stat
import unicodedata
from collections.abc import Iterable
from pathlib import Path, PurePosixPath
from typing import Any, ClassVar

from cloudexit.core.files import make_private_dirs
from cloudexit.core.paths import safe_relative_path
from cloudexit.stores import Delivery, Item, StoreError

UID = re.compile(r"^[0-9]+(\.[0-9]+)*$")
TEMP_PREFIX = ".cloudexit-"
SIDE_AREAS = ("_non-dicom", "_quarantine")
NON_DICOM = "_non-dicom"
QUARANTINE = "_quarantine"
MISMATCH = f"{QUARANTINE}/mismatch"
ARCHIVE_CONFLICTS = f"{QUARANTINE}/archive-conflicts"
COLLISIONS = f"{QUARANTINE}/collisions"
CASE_COLLISIONS = f"{QUARANTINE}/case-collisions"


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
        self.folds_case = False  # set by `check` (probe_folding)
        self.normalises = False

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
        try:
            self.folds_case, self.normalises = probe_folding(str(root))
        except OSError as exc:
            raise StoreError(f"the archive folder {root} is not writable: {exc.strerror}",
                             hint="fix its permissions or mount, then run the command again") from exc

    def fold(self, relative: str) -> str | None:
        """`relative` as this destination compares names (None: it compares them as they are).
        Two paths with the same fold are one file here: the engine treats them as a collision."""
        if not (self.folds_case or self.normalises):
            return None
        text = unicodedata.normalize("NFC", relative) if self.normalises else relative
        return text.casefold() if self.folds_case else text

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


def probe_folding(folder: str) -> tuple[bool, bool]:
    """(folds case, normalises Unicode) for names in `folder`, by experiment: create a file
    with a mixed-case name and one with an NFC name, and look each up under another form.
    SMB shares, macOS, FAT/exFAT and ext4 with casefold fold case; macOS and some SMB servers
    also match NFC and NFD forms of a name. Raises OSError if the folder is not writable."""
    tag = f"{os.getpid()}-{secrets.token_hex(4)}"
    mixed = os.path.join(folder, f"{TEMP_PREFIX}probe-{tag}-Ab")
    nfc = os.path.join(folder, f"{TEMP_PREFIX}probe-{tag}-\u00e9")
    made = []
    try:
        for name in (mixed, nfc):
            os.close(os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
            made.append(name)
        folds = os.path.lexists(mixed[:-2] + "aB")
        normalises = os.path.lexists(nfc[:-1] + "e\u0301")
    finally:
        for name in made:
            try:
                os.unlink(name)
            except FileNotFoundError:
                pass
    return folds, normalises


class PlacementConflict(OSError):
    """The final path holds a file this migration did not place there (or one of other bytes):
    it is never replaced."""

    def __init__(self, path: str, why: str) -> None:
        super().__init__(errno.EEXIST, f"{path} {why}", path)
        self.path = path


_RENAME_NOREPLACE = 1
_AT_FDCWD = -100
try:
    _renameat2: Any = ctypes.CDLL(None, use_errno=True).renameat2
except (AttributeError, OSError):  # not glibc 2.28+ (or not Linux)
    _renameat2 = None


def move_noreplace(src: str, dst: str) -> None:
    """Rename `src` to `dst`, atomically refusing (FileExistsError) if `dst` exists, also under
    another case or Unicode form on a destination that folds names.

    renameat2(RENAME_NOREPLACE) where the kernel and filesystem have it; else a hard link (which
    never replaces) and unlink; else (FAT, some SMB and FUSE mounts: no links, no flag) a check
    then rename, which leaves a window of microseconds against a concurrent writer."""
    if _renameat2 is not None:
        if _renameat2(_AT_FDCWD, os.fsencode(src), _AT_FDCWD, os.fsencode(dst), _RENAME_NOREPLACE) == 0:
            return
        err = ctypes.get_errno()
        if err == errno.EEXIST:
            raise FileExistsError(err, os.strerror(err), dst)
        if err not in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
            raise OSError(err, os.strerror(err), dst)
    try:
        os.link(src, dst, follow_symlinks=False)
    except FileExistsError:
        raise
    except OSError as exc:
        if exc.errno not in (errno.EPERM, errno.EOPNOTSUPP, errno.ENOSYS, errno.EXDEV, errno.EMLINK):
            raise
        if os.path.lexists(dst):
            raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), dst) from None
        os.rename(src, dst)
        return
    os.unlink(src)


def file_sha256(path: str) -> str:
    digest = hashlib.sha256()
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    with os.fdopen(fd, "rb") as fh:
        while chunk := fh.read(2**20):
            digest.update(chunk)
    return digest.hexdigest()


def make_inside(root_real: str, base: str, folder: str) -> None:
    """Create `folder` (under `base`, the archive as the engine names it; `root_real`, its real
    path) and the folders above it, 0700, checking each one before anything is created in it:
    a folder that is a symlink must resolve inside the archive, so a planted symlink can never
    make us create folders outside it."""
    rel = os.path.relpath(folder, base)
    if rel == ".":
        return
    if rel == ".." or rel.startswith("../") or os.path.isabs(rel):
        raise OSError(errno.EXDEV, f"{folder} is outside the archive {base}")
    current = root_real
    for part in rel.split(os.sep):
        nxt = os.path.join(current, part)
        try:
            os.mkdir(nxt, 0o700)
            current = nxt
            continue
        except FileExistsError:
            pass
        real = os.path.realpath(nxt)
        if real != root_real and not real.startswith(root_real + os.sep):
            raise OSError(errno.ELOOP, f"{nxt} resolves outside the archive ({real})")
        if not os.path.isdir(real):
            raise OSError(errno.ENOTDIR, f"a file is in the way of folder {nxt}")
        current = real


class Placer:
    """File operations of the workers: directories, temp files, fsync + atomic rename."""

    def __init__(self, root: str, fsync: bool = True) -> None:
        self.base = root  # as the engine builds paths
        self.root = os.path.realpath(root)  # for the containment check
        self.fsync = fsync
        self._checked: set[str] = set()

    def prepare(self, final: str) -> None:
        """Create the parent folders (0700), each checked to resolve inside the archive before
        anything is created in it: a symlink planted in the archive cannot make us create
        folders elsewhere (`make_inside`)."""
        parent = os.path.dirname(final)
        if parent in self._checked:
            return
        make_inside(self.root, self.base, parent)
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

    def place(self, fd: int, temp: str, final: str, sync_folder: bool = True,
              sha256: str | None = None, replaceable: int | None = None) -> bool:
        """fsync the temp file and move it to `final`, never over other bytes; fsync the folder.
        True if it replaced this migration's own earlier file there.

        A file already at `final` (or at a name the destination folds to it) is kept: if it
        holds the same bytes (`sha256`), the temp file is dropped; if it is the file this
        migration placed there before (`replaceable`: its mtime_ns, recorded at placement) it is
        replaced (a newer version of the object); otherwise `PlacementConflict`.

        sync_folder=False leaves the folder's fsync to the caller (`sync_folders`, once for a
        batch of files): the file is not durable under its name until then."""
        if self.fsync:
            os.fsync(fd)
        if os.path.isdir(final) and not os.path.islink(final):
            raise OSError(errno.EISDIR, f"a folder is in the way of {final}")
        replaced = False
        try:
            move_noreplace(temp, final)
        except FileExistsError:
            try:
                st = os.lstat(final)
            except FileNotFoundError:  # gone meanwhile: try once more, still without replacing
                move_noreplace(temp, final)
                st = None
            if st is not None:
                if not stat.S_ISREG(st.st_mode):
                    raise PlacementConflict(final, "not a regular file") from None
                # The temp file's size by its name: a decoded instance's `fd` may be the raw
                # object's, which the plain file replaced under the temp name.
                if sha256 is not None and st.st_size == os.stat(temp, follow_symlinks=False).st_size \
                        and file_sha256(final) == sha256:
                    self.discard(temp)  # the same bytes are there already
                elif replaceable is not None and st.st_mtime_ns == replaceable:
                    # Our own earlier version of this object (a newer one was fetched). Between
                    # this check and the rename another writer could slip in: that window needs
                    # a second migration writing this very path within microseconds.
                    os.rename(temp, final)
                    replaced = True
                else:
                    raise PlacementConflict(final, "holds other bytes") from None
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
