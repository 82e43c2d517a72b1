"""The node's local blob cache: package files fetched once, then linked or copied into work folders.

A per-file package version (package/contents.py) names its files by digest. A node that staged
a 1.5 GB base file once keeps it here, and the next run on that node places it in its package
folder without a byte from the store: a hard link where the work folder is on the cache's file
system (a 1 GiB package in 1 ms here), a kernel copy where a run needs a private file or the
link cannot cross file systems.

Where: ``$AICENTER_CACHE/blobs`` (default ``~/.cache/aicenter/blobs`` of the user the runtime
runs as, beside the environments in ``envs/``), or the folder ``AICENTER_BLOB_CACHE`` names
(runtime_cache). A pod has none unless that is set: its ``AICENTER_CACHE`` is a volume of the
pod alone, which a cache would be written to once and never read from again.

Layout: ``sha256/<hex>`` entries, each the blob's bytes, verified by digest while it was
fetched, then sealed: read-only (0444) and its modification time set to ``SEALED_MTIME_NS``;
``tmp/`` for fetches in progress (same file system, so a fetch is published by a link: atomic,
and two runs fetching the same blob on one node never clash: the second finds the first's
entry and drops its own copy).

Trust. A hard link shares the inode, so code that can write the linked file writes the cache
entry. An entry is used only while it is still sealed as it was when verified: a regular file
of its size, owned by this user, mode 0444, modification time ``SEALED_MTIME_NS``. Any write
sets the modification time to now; making it writable changes the mode. Either way the entry
is dropped and fetched again. The inode's change time (ctime) would be a stronger mark, but
creating or removing any link to the inode changes it too (measured: ``ln`` and ``rm`` of a
second name move ctime), so every staging and every removed work folder would invalidate
every entry. Restoring the sealed time after a write takes the file owner's rights
(``utime``): code running as the runtime's own user, which could rewrite the cache anyway;
under ``run_as_user`` package code cannot, and in a pod the cache is on another volume (no link).

What staging placed in a work folder, from this cache or not, is remembered by inode with its
size, modification and change time right after staging (PlacedFiles): ``known`` gives a file's
digest while all of them are unchanged, so the end of a training does not hash a 1.5 GB file it
never touched. There ctime is strict: a write, a chmod, a new link all make the file hashed
again. A pod's stage hands the table to sync.

A shared cache (``shared=True``: a node's folder that every pod's ``stage`` mounts, the
connection extra ``blob_cache``) trusts no seal: any pod that can write the folder could put
other bytes under a digest's name and seal them like ours. There an entry is hashed before it
counts as present (a wrong one is dropped and fetched again), it is never linked (a pod's
package volume is another file system anyway), and each copy into a package folder is hashed
as it is written, so the bytes a run gets are the bytes its manifest names.

No Airflow import: the runtime image uses it.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import secrets
import shutil
import stat
import time
from collections.abc import Collection, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

from airflow_aicenter.errors import ConfigurationError, StorageError
from airflow_aicenter.kernel_copy import copy_range

#: What the cache may hold before trim() removes the least recently used entries (AICENTER_BLOB_CACHE_MAX).
DEFAULT_MAX_BYTES = 32 * 2**30
#: An entry used this recently is never trimmed: a run on the node may be placing it.
RECENT_S = 3600
#: The modification time a verified entry is sealed with: 1980-01-01, the zip epoch. Any write makes it now.
SEALED_MTIME_NS = 315_532_800 * 10**9
SEALED_MODE = 0o444
#: link(2) refused for this pair: another file system or mount (EXDEV), links not allowed (EPERM:
#: protected_hardlinks, or a file system without them), too many links (EMLINK): the file is copied.
_NO_LINK = {errno.EXDEV, errno.EPERM, errno.EMLINK, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EACCES}


def default_cache_dir() -> Path:
    """``$AICENTER_CACHE``, else ``~/.cache/aicenter``: the folder environments and blobs share."""
    chosen = os.environ.get("AICENTER_CACHE") or Path.home() / ".cache" / "aicenter"
    return Path(chosen).absolute()


@dataclass(frozen=True)
class _Placed:
    """A file staging put in a work folder: what its inode looked like right after staging."""

    size: int
    mtime_ns: int
    ctime_ns: int
    sha256: str


class PlacedFiles:
    """The digests of the files a staging placed (verified as they were fetched or copied), by inode.

    ``known`` gives a file's digest while its inode's size, modification and change time are
    all as they were right after staging, so the end of a training does not hash a 1.5 GB file
    it never touched. The change time (ctime) is the strict part: any write, chmod, utime or
    new link moves it, and no unprivileged process can set it back. Three places use it: the
    process that staged (the local launcher); a pod's ``sync`` container, which gets the table
    from ``stage`` through the agent's state volume (user code mounts neither that volume nor
    anything that leads to it, so package code cannot add or change an entry); and a run under
    ``run_as_user``, where the agent's own chown of the package folder to that user moves every
    ctime: ``handing_over`` re-takes the stat of each file it held unchanged right before.

    What a forged entry could do: an entry only ever names the digest staging verified for that
    inode, a blob the parent version references and the store holds. A file changed in place
    with its times and inode kept (impossible without root) would be recorded under that old
    digest: the new version would then reference the stored, correct parent blob, never bytes
    that no one verified.
    """

    def __init__(self, table: Mapping[tuple[int, int], tuple[int, int, int, str]] | None = None) -> None:
        self._placed: dict[tuple[int, int], _Placed] = {
            key: _Placed(*value) for key, value in (table or {}).items()}

    def __len__(self) -> int:
        return len(self._placed)

    def remember(self, path: Path, sha256: str) -> None:
        """Note what ``path`` (just placed, its content verified as ``sha256``) looks like now."""
        st = os.lstat(path)
        self._placed[(st.st_dev, st.st_ino)] = _Placed(st.st_size, st.st_mtime_ns, st.st_ctime_ns, sha256)

    def known(self, path: Path, st: os.stat_result) -> str | None:
        """The digest of a file staging placed and nothing changed since (contents_of's ``known`` hook)."""
        placed = self._placed.get((st.st_dev, st.st_ino))
        if placed is None or (st.st_size, st.st_mtime_ns, st.st_ctime_ns) != (placed.size, placed.mtime_ns, placed.ctime_ns):
            return None
        return placed.sha256

    def table(self) -> dict[tuple[int, int], tuple[int, int, int, str]]:
        """Plain values, for a pod's stage to hand to sync (the agent's state)."""
        return {key: (p.size, p.mtime_ns, p.ctime_ns, p.sha256) for key, p in self._placed.items()}

    @contextlib.contextmanager
    def handing_over(self, root: Path) -> Iterator[None]:
        """Around the agent's own chown of ``root`` to the run's user (run_as_user), before any package code runs.

        Each file under ``root`` still as staged before the block is taken as staged after it
        when only its owner and change time moved (same inode, size, modification time): the
        chown is the agent's, and nothing else ran in between.
        """
        before: dict[Path, tuple[int, int, int, int, str]] = {}
        for base, _, names in os.walk(root):
            for name in names:
                path = Path(base) / name
                with contextlib.suppress(OSError):
                    st = os.lstat(path)
                    if (digest := self.known(path, st)) is not None:
                        before[path] = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, digest)
        yield
        for path, (dev, ino, size, mtime_ns, digest) in before.items():
            with contextlib.suppress(OSError):
                st = os.lstat(path)
                if (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns) == (dev, ino, size, mtime_ns):
                    self._placed[(dev, ino)] = _Placed(size, mtime_ns, st.st_ctime_ns, digest)


class BlobCache:
    """Verified, sealed copies of blobs on this node, placed into work folders by link or copy."""

    def __init__(
        self, cache_dir: Path | None = None, *, max_bytes: int | None = DEFAULT_MAX_BYTES, shared: bool = False
    ) -> None:
        self.root = (Path(cache_dir) if cache_dir is not None else default_cache_dir()) / "blobs"
        self.entries = self.root / "sha256"
        self.tmp = self.root / "tmp"
        #: trim() removes the least recently used entries past this size (None: no limit).
        self.max_bytes = max_bytes
        #: Other pods write this folder too: entries are verified by digest, never by their seal (module doc).
        self.shared = shared
        #: Shared: entries this process hashed, by inode, with the size, modification and change time they had then.
        self._verified: dict[tuple[int, int], tuple[int, int, int, str]] = {}

    def __repr__(self) -> str:
        return f"BlobCache({str(self.root)!r})"

    def prepare(self) -> None:
        """Create the cache's folders (private: package content of every run on the node is in here)."""
        for folder in (self.root, self.entries, self.tmp):
            folder.mkdir(mode=0o700, parents=True, exist_ok=True)

    def path(self, sha256: str) -> Path:
        return self.entries / sha256

    # -- entries -------------------------------------------------------------------------
    def _sealed(self, st: os.stat_result, size: int) -> bool:
        # Shared: another pod's entry may be of another user; its digest, not its owner, vouches for it (_hashes_to).
        return (stat.S_ISREG(st.st_mode) and stat.S_IMODE(st.st_mode) == SEALED_MODE and st.st_size == size
                and st.st_mtime_ns == SEALED_MTIME_NS and (self.shared or st.st_uid == os.geteuid()))

    def _hashes_to(self, path: Path, st: os.stat_result, sha256: str) -> bool:
        """Shared: the entry's bytes hash to its name (hashed once per process while its inode's times stay the same:
        any write, chmod or utime moves the change time, which no one can set back)."""
        if self._verified.get((st.st_dev, st.st_ino)) == (st.st_size, st.st_mtime_ns, st.st_ctime_ns, sha256):
            return True
        try:
            with open(path, "rb", buffering=0) as f:
                return hashlib.file_digest(f, "sha256").hexdigest() == sha256
        except OSError:
            return False

    def lookup(self, sha256: str, size: int) -> Path | None:
        """The entry of ``sha256`` if it is there and still sealed (shared: and hashes to its name); a changed one is
        dropped (fetch it again)."""
        path = self.path(sha256)
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            return None
        if self._sealed(st, size) and (not self.shared or self._hashes_to(path, st, sha256)):
            with contextlib.suppress(OSError):  # the access time orders eviction (trim); the seal is the mtime
                os.utime(path, ns=(time.time_ns(), SEALED_MTIME_NS))
            if self.shared:  # as it is after our own utime; a write in between is caught by copy's hash
                with contextlib.suppress(OSError):
                    now = os.lstat(path)
                    self._verified[(now.st_dev, now.st_ino)] = (now.st_size, now.st_mtime_ns, now.st_ctime_ns, sha256)
            return path
        self._drop(path)
        return None

    def _drop(self, path: Path) -> None:
        """Remove a changed entry; its links in work folders keep their inode (nothing else changes)."""
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
        self._verified.clear()

    def new_temp(self, sha256: str) -> Path:
        """A fresh name in ``tmp/`` for a fetch of ``sha256`` in progress (unique per fetch: runs never clash)."""
        self.prepare()
        return self.tmp / f"{sha256}.{os.getpid()}.{secrets.token_hex(6)}"

    def publish(self, tmp: Path, sha256: str, size: int) -> Path:
        """Seal ``tmp`` (verified by the caller against ``sha256``) and make it the entry; the entry in use.

        Published by a link (create-once): where another run published the same blob first,
        its entry is used when sealed and ``tmp`` is dropped; a changed one is replaced.
        """
        final = self.path(sha256)
        try:
            os.chmod(tmp, SEALED_MODE)
            os.utime(tmp, ns=(SEALED_MTIME_NS, SEALED_MTIME_NS))
            for _ in range(3):
                try:
                    os.link(tmp, final)
                    return final
                except FileExistsError:
                    if self.lookup(sha256, size) is not None:
                        return final
            os.replace(tmp, final)
            return final
        finally:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()

    # -- placing into a work folder ------------------------------------------------------
    def link(self, sha256: str, dest: Path, *, size: int) -> bool:
        """Hard-link the entry to ``dest`` (new); True if linked, False if copied (another file system).

        The linked file is read-only (0444, the entry's mode): package code that rewrites a
        file in place needs a copy (``copy``), and the agent stages copies for runs whose
        package folder becomes a new version.
        """
        if self.shared:  # never an inode another pod can reach: a copy, verified as it is written
            self.copy(sha256, dest, size=size, mode=0o644)
            return False
        src = self.lookup(sha256, size)
        if src is None:
            raise StorageError(f"blob sha256:{sha256} left the local blob cache {self.root} while it was staged "
                               "(removed, or changed by another run or by hand): run the task again")
        try:
            os.link(src, dest)
        except OSError as exc:
            if exc.errno not in _NO_LINK:
                raise
            self.copy(sha256, dest, size=size, mode=0o644)
            return False
        return True

    def copy(self, sha256: str, dest: Path, *, size: int, mode: int) -> None:
        """Copy the entry to the new file ``dest`` with ``mode``, in the kernel where it can (a reflink on file
        systems that share extents): a private file that package code may write.

        Shared: the copy is hashed as it is written (store.copy_hashed, one pass), so what lands
        in ``dest`` is what the digest names even if another pod rewrote the entry meanwhile.
        """
        from airflow_aicenter.storage.store import copy_hashed

        src = self.lookup(sha256, size)
        if src is None:
            raise StorageError(f"blob sha256:{sha256} left the local blob cache {self.root} while it was staged "
                               "(removed, or changed by another run or by hand): run the task again")
        digest = sha256
        fd_in = os.open(src, os.O_RDONLY | os.O_CLOEXEC)
        try:
            flags = (os.O_RDWR if self.shared else os.O_WRONLY) | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC
            fd_out = os.open(dest, flags, 0o600)
            try:
                if self.shared:
                    digest, copied = copy_hashed(fd_in, fd_out)
                else:
                    copied = copy_range(fd_in, fd_out)
                os.fchmod(fd_out, mode)
            finally:
                os.close(fd_out)
        finally:
            os.close(fd_in)
        if copied != size or digest != sha256:
            dest.unlink(missing_ok=True)
            self._drop(src)
            got = f"{copied} bytes, expected {size}" if copied != size else f"its copy hashes to sha256:{digest}"
            raise StorageError(f"blob sha256:{sha256} in the local blob cache {self.root} changed while it was copied "
                               f"({got}; nothing was staged from it): run the task again")

    def add(self, path: Path, sha256: str, size: int) -> bool:
        """Keep a copy of a local file whose digest the caller just verified (a new version's new files); True if added.

        The copy is hashed as it is written (``store.copy_hashed``): only bytes that match
        ``sha256`` become an entry, so a file that changed meanwhile is simply not cached.
        """
        from airflow_aicenter.storage.store import copy_hashed

        if self.lookup(sha256, size) is not None:
            return False
        tmp = self.new_temp(sha256)
        try:
            fd_in = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
            try:
                fd_out = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
                try:
                    digest, got = copy_hashed(fd_in, fd_out)
                finally:
                    os.close(fd_out)
            finally:
                os.close(fd_in)
            if (digest, got) != (sha256, size):
                return False
            self.publish(tmp, sha256, size)
            return True
        finally:
            tmp.unlink(missing_ok=True)

    def trim(self, keep: Collection[str] = ()) -> int:
        """Remove the least recently used entries until the cache is within ``max_bytes``; the bytes removed.

        Never ``keep`` (what the staging that calls it just placed), nor an entry used in the
        last RECENT_S (another run on the node may be placing it now). An entry's links in work
        folders keep their bytes; the next run that needs it fetches it again.
        """
        if self.max_bytes is None:
            return 0
        found: list[tuple[int, str, int]] = []
        try:
            with os.scandir(self.entries) as it:
                for item in it:
                    with contextlib.suppress(FileNotFoundError):
                        st = item.stat(follow_symlinks=False)
                        found.append((st.st_atime_ns, item.name, st.st_size))
        except FileNotFoundError:
            return 0
        total = sum(size for _, _, size in found)
        removed = 0
        recent = time.time_ns() - RECENT_S * 10**9
        for atime, name, size in sorted(found):
            if total <= self.max_bytes:
                break
            if name in keep or atime > recent:
                continue
            with contextlib.suppress(FileNotFoundError):
                (self.entries / name).unlink()
                total -= size
                removed += size
        return removed

    def seal_in_place(self, path: Path) -> os.stat_result | None:
        """Seal a file of a finished run's package folder where it is, to adopt() it once it is hashed; its stat.

        None, and the file left as it is, unless it is a plain file of this user, not executable
        (the seal's mode would lose the executable bit the version records) and linked nowhere
        else. Sealing only makes the file read-only with the sealed time: its content, and the
        mode a version records for it (0644), stay as they were.
        """
        try:
            st = os.lstat(path)
            if not stat.S_ISREG(st.st_mode) or st.st_uid != os.geteuid() or st.st_mode & 0o111 or st.st_nlink != 1:
                return None
            os.chmod(path, SEALED_MODE, follow_symlinks=False)
            os.utime(path, ns=(time.time_ns(), SEALED_MTIME_NS), follow_symlinks=False)
            return os.lstat(path)
        except OSError:
            return None

    def adopt(self, path: Path, sha256: str, size: int, sealed: os.stat_result) -> bool:
        """Make a file sealed by seal_in_place and since hashed to ``sha256`` an entry, by a link; True if it became one.

        Only while nothing touched it since it was sealed (same inode, change time and seal): a
        write during the hash would otherwise enter the cache under the digest of the bytes
        before it. The work folder's name goes with the work folder; the entry keeps the bytes.
        """
        try:
            st = os.lstat(path)
        except OSError:
            return False
        if ((st.st_dev, st.st_ino, st.st_ctime_ns) != (sealed.st_dev, sealed.st_ino, sealed.st_ctime_ns)
                or not self._sealed(st, size) or self.lookup(sha256, size) is not None):
            return False
        try:
            self.prepare()
            os.link(path, self.path(sha256))
        except OSError:  # another run's entry got there first, another file system, links refused: no entry, no harm
            return False
        return True

    def clear(self) -> None:
        """Remove every entry (their links in work folders keep their bytes)."""
        shutil.rmtree(self.root, ignore_errors=True)


#: The runtime's blob cache: a folder (its ``blobs/`` holds the cache), or ``off``. Unset: the local
#: launcher's runs use ``$AICENTER_CACHE/blobs`` (default ``~/.cache/aicenter/blobs``); a pod uses none,
#: because its ``AICENTER_CACHE`` is a volume of that pod alone (a cache there would be written once,
#: read never, and cost a second copy of every file): the connection extra ``blob_cache`` sets it to
#: a folder the node keeps (a hostPath, mounted in ``stage`` alone), a shared cache (module doc).
BLOB_CACHE_ENV = "AICENTER_BLOB_CACHE"
#: Bytes the blob cache may hold (``500M``, ``40G``, a number; ``0``: no limit). Default DEFAULT_MAX_BYTES.
BLOB_CACHE_MAX_ENV = "AICENTER_BLOB_CACHE_MAX"
_UNITS = {"": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}


def parse_size(text: str) -> int | None:
    """``500M``, ``40G``, ``1073741824``: bytes (binary units); ``0``: None (no limit). A clear error otherwise."""
    raw = text.strip().upper().removesuffix("B").removesuffix("I")
    unit = raw[-1:] if raw[-1:] in _UNITS else ""
    number = raw[: len(raw) - len(unit)].strip()
    try:
        value = float(number) * _UNITS[unit]
    except ValueError:
        raise ConfigurationError(
            f"{BLOB_CACHE_MAX_ENV}={text!r} is not a size: write bytes or a number with K, M, G or T (e.g. 40G), "
            "or 0 for no limit") from None
    if value < 0:
        raise ConfigurationError(f"{BLOB_CACHE_MAX_ENV}={text!r} is negative: give a size such as 40G, or 0 for no limit")
    return int(value) or None


def runtime_cache(*, in_pod: bool, environ: Mapping[str, str] | None = None) -> BlobCache | None:
    """The blob cache a run stages through, as ``AICENTER_BLOB_CACHE`` and where it runs say (above)."""
    env = os.environ if environ is None else environ
    chosen = env.get(BLOB_CACHE_ENV, "").strip()
    limit = env.get(BLOB_CACHE_MAX_ENV, "").strip()
    max_bytes = parse_size(limit) if limit else DEFAULT_MAX_BYTES
    if chosen.lower() in ("off", "0", "false", "no", "none"):
        return None
    if chosen:  # in a pod, a node's folder every pod's stage mounts: shared (verified by digest, never linked)
        return BlobCache(Path(chosen), max_bytes=max_bytes, shared=in_pod)
    if in_pod:
        return None
    return BlobCache(max_bytes=max_bytes)
