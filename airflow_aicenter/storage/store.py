"""One object-store interface over obstore, with an S3 and a local-disk backend.

Every byte the product moves goes through here (and ``transfer.py`` for many files at once),
so both backends get the same semantics: create-once puts (If-None-Match on S3, exclusive
create on disk), server-side copy, listing, and typed errors. No Airflow import: the runtime
uses this module inside training pods.
"""

from __future__ import annotations

import builtins
import contextlib
import errno
import hashlib
import os
import re
import secrets
import stat
import threading
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, cast
from urllib.parse import unquote, urlparse

import obstore
import obstore.exceptions as obx
from obstore.store import LocalStore as _ObLocalStore
from obstore.store import S3Store as _ObS3Store

if TYPE_CHECKING:
    from obstore.store import ClientConfig, RetryConfig, S3Config

from airflow_aicenter.errors import (
    AccessDeniedError,
    AlreadyExistsError,
    ConfigurationError,
    NotFoundError,
    StorageError,
)
from airflow_aicenter.kernel_copy import copy_range

#: Retries with exponential backoff and jitter for transient S3 errors (503 SlowDown, resets,
#: timeouts), inside obstore, for every request. The budget is time, not a count: 8 retries from
#: 100 ms were spent in 1.3 s on a busy machine (issue 11), so a server overloaded for a few
#: seconds failed the run. obstore draws each wait from [init, previous * base] (capped), so with
#: base 2 the waits only grow by init/2 a step; base 3 grows them about 1.5x a step: from 200 ms
#: to the 10 s cap, 15 retries span about a minute, and retry_timeout stops them at 60 s from
#: the first attempt. transfer.py adds one level above this: a transfer whose request still fails
#: lowers its concurrency and tries that file again (AdaptiveLimit).
RETRY_CONFIG: dict[str, Any] = {
    "max_retries": 15,
    "retry_timeout": timedelta(seconds=60),
    "backoff": {"init_backoff": timedelta(milliseconds=200), "max_backoff": timedelta(seconds=10), "base": 3},
}

#: obstore's local backend writes ``<key>#<n>`` and renames it into place; it refuses such keys
#: and hides such files from its listing. Nothing of ours may be named like that.
_TEMP_SUFFIX = re.compile(r"#\d+$")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def unstorable(name: str) -> str | None:
    """Why ``name`` (a relative key) cannot be a key on every store, or None when it can.

    The same rules on both backends, so a run that works on a file store works on S3: no control
    characters (a newline included), valid UTF-8 (a name read from disk with undecodable bytes
    carries surrogates), no empty, ``.`` or ``..`` segment, and no segment ending in ``#<digits>``.
    """
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        return "its name is not valid UTF-8"
    if _CONTROL.search(name):
        return "its name contains a control character (a newline, a tab or another non-printing character)"
    for part in name.split("/"):
        if part in ("", ".", ".."):
            return "its path has an empty, '.' or '..' segment"
        if _TEMP_SUFFIX.search(part):
            return "its name ends in '#' and digits, which the file store uses for its temporary files"
    return None


@dataclass(frozen=True)
class ObjectInfo:
    key: str
    size: int
    last_modified: datetime | None = None
    etag: str | None = None


@dataclass(frozen=True)
class S3Options:
    """Where and how to reach S3. Credentials stay out of reprs so they never reach a log."""

    endpoint_url: str | None = None
    region: str | None = None
    access_key_id: str | None = field(default=None, repr=False)
    secret_access_key: str | None = field(default=None, repr=False)
    session_token: str | None = field(default=None, repr=False)

    #: Environment variables the runtime reads (the AWS SDK's own names).
    ENV: ClassVar[dict[str, str]] = {
        "endpoint_url": "AWS_ENDPOINT_URL",
        "region": "AWS_REGION",
        "access_key_id": "AWS_ACCESS_KEY_ID",
        "secret_access_key": "AWS_SECRET_ACCESS_KEY",
        "session_token": "AWS_SESSION_TOKEN",
    }

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> S3Options:
        env = os.environ if environ is None else environ
        values = {attr: env.get(var) or None for attr, var in cls.ENV.items()}
        values["endpoint_url"] = env.get("AWS_ENDPOINT_URL_S3") or values["endpoint_url"]
        values["region"] = values["region"] or env.get("AWS_DEFAULT_REGION") or None
        return cls(**values)

    def to_env(self) -> dict[str, str]:
        """The variables that let a child process (or pod) rebuild these options."""
        return {var: getattr(self, attr) for attr, var in self.ENV.items() if getattr(self, attr)}

    def obstore_config(self) -> dict[str, Any]:
        config: dict[str, Any] = {"region": self.region or "us-east-1"}
        if self.endpoint_url:
            config["endpoint"] = self.endpoint_url
            # Custom endpoints (MinIO, moto, rclone, Ceph) rarely do virtual-hosted buckets.
            config["virtual_hosted_style_request"] = False
        for attr in ("access_key_id", "secret_access_key", "session_token"):
            if getattr(self, attr):
                config[attr] = getattr(self, attr)
        return config

    def client_options(self) -> dict[str, Any]:
        options: dict[str, Any] = {"connect_timeout": "10s", "timeout": "120s"}
        if self.endpoint_url and self.endpoint_url.startswith("http://"):
            options["allow_http"] = True
        return options


class Store:
    """A storage root (``s3://bucket/prefix`` or ``file:///abs/path``) and keys under it."""

    scheme: ClassVar[str]

    def __init__(self, uri: str, inner: Any) -> None:
        self.uri = uri.rstrip("/")
        self._inner = inner
        #: False once the server answered a ranged GET with the whole object (rclone serve s3):
        #: transfer.py then reads large objects as one stream.
        self.ranged_reads = True

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.uri!r})"

    # -- naming --------------------------------------------------------------------------
    def url(self, key: str = "") -> str:
        """The URI of a key (or of the root when ``key`` is empty)."""
        return f"{self.uri}/{key}" if key else self.uri

    # -- small objects -------------------------------------------------------------------
    def put_bytes(self, key: str, data: bytes, *, create: bool = False) -> None:
        """Write ``data``; with ``create=True`` fail with AlreadyExistsError if the key exists."""
        with self._errors(key):
            obstore.put(self._inner, key, data, mode="create" if create else "overwrite")

    def get_bytes(self, key: str) -> bytes:
        self.check_readable(key)
        with self._errors(key):
            return bytes(obstore.get(self._inner, key).bytes())

    def head(self, key: str) -> ObjectInfo | None:
        self.check_readable(key)
        try:
            with self._errors(key):
                return _info(obstore.head(self._inner, key))
        except NotFoundError:
            return None

    async def head_async(self, key: str) -> ObjectInfo | None:
        self.check_readable(key)
        try:
            with self._errors(key):
                return _info(await obstore.head_async(self._inner, key))
        except NotFoundError:
            return None

    def check_readable(self, key: str) -> None:
        """Refuse a read that would leave the store's root (the file store's links); S3 has none."""

    def exists(self, key: str) -> bool:
        return self.head(key) is not None

    def list(self, prefix: str = "") -> Iterator[ObjectInfo]:
        """Every object under ``prefix`` (recursive), in pages, never all in memory at once.

        On S3 a zero-byte folder marker (``name/``, made by the S3 console) comes back as an
        object named ``name`` that cannot be read: ``transfer.download_tree`` skips those.
        """
        with self._errors(prefix):
            for page in obstore.list(self._inner, prefix or None, chunk_size=1000):
                for meta in page:
                    yield _info(meta)

    def list_dir(self, prefix: str = "") -> tuple[builtins.list[str], builtins.list[ObjectInfo]]:
        """One level under ``prefix``: (sub-prefixes, objects)."""
        with self._errors(prefix):
            result = obstore.list_with_delimiter(self._inner, prefix or None)
        return [p.rstrip("/") for p in result["common_prefixes"]], [_info(m) for m in result["objects"]]

    def copy(self, src: str, dst: str, *, overwrite: bool = True) -> None:
        """Server-side copy (no bytes through this process)."""
        with self._errors(src):
            obstore.copy(self._inner, src, dst, overwrite=overwrite)

    def delete(self, key: str) -> None:
        with self._errors(key):
            obstore.delete(self._inner, key)

    # -- internals -----------------------------------------------------------------------
    @property
    def inner(self) -> Any:
        """The obstore store, for ``transfer.py``."""
        return self._inner

    def _errors(self, key: str) -> _ErrorMap:
        return _ErrorMap(self, key)


class _ErrorMap:
    """Translate obstore's exceptions into ours, naming the URI and what to check."""

    def __init__(self, store: Store, key: str) -> None:
        self.store, self.key = store, key

    def __enter__(self) -> None:
        return None

    def __exit__(self, exc_type: type | None, exc: BaseException | None, tb: Any) -> None:
        if exc is None or isinstance(exc, (StorageError, ConfigurationError)):
            return
        where = self.store.url(self.key)
        first = str(exc).splitlines()[0][:300] if str(exc) else type(exc).__name__
        if "<Code>NoSuchBucket</Code>" in str(exc):
            bucket = getattr(self.store, "bucket", "?")
            raise StorageError(
                f"bucket {bucket!r} does not exist (reading or writing {where}); create it, or fix the bucket name in the URI"
            ) from exc
        if isinstance(exc, (FileNotFoundError, obx.NotFoundError)):
            raise NotFoundError(f"{where} does not exist") from exc
        if isinstance(exc, (obx.AlreadyExistsError, FileExistsError)):
            raise AlreadyExistsError(f"{where} already exists") from exc
        # obstore reports a refused listing as a generic error carrying the status line.
        if isinstance(exc, (obx.PermissionDeniedError, obx.UnauthenticatedError, PermissionError)) or (
            isinstance(exc, obx.BaseError) and "403 Forbidden" in str(exc)
        ):
            raise AccessDeniedError(
                f"access to {where} was denied ({first}); check the credentials of the AWS connection "
                "(or the pod's service account) and the bucket policy"
            ) from exc
        if isinstance(exc, (obx.BaseError, OSError)):
            raise StorageError(f"storage request for {where} failed: {first}") from exc


def _info(meta: Mapping[str, Any]) -> ObjectInfo:
    return ObjectInfo(key=meta["path"], size=meta["size"], last_modified=meta.get("last_modified"), etag=meta.get("e_tag"))


class S3Store(Store):
    scheme = "s3"

    def __init__(self, uri: str, options: S3Options | None = None) -> None:
        parsed = urlparse(uri)
        if parsed.scheme != "s3" or not parsed.netloc:
            raise ConfigurationError(f"{uri!r} is not an S3 URI; write it as s3://bucket/prefix")
        self.bucket = parsed.netloc
        self.prefix = parsed.path.strip("/")
        self.options = options or S3Options.from_env()
        inner = _ObS3Store(
            self.bucket,
            prefix=self.prefix or None,
            config=cast("S3Config", self.options.obstore_config()),
            client_options=cast("ClientConfig", self.options.client_options()),
            retry_config=cast("RetryConfig", RETRY_CONFIG),
        )
        super().__init__(f"s3://{self.bucket}/{self.prefix}" if self.prefix else f"s3://{self.bucket}", inner)


class LocalStore(Store):
    scheme = "file"

    def __init__(self, uri: str, *, create: bool = True) -> None:
        """``create=False`` opens an existing folder only (a dataset): a typo must not make one."""
        self.root = local_path(uri)
        if self.root.exists() and not self.root.is_dir():
            raise ConfigurationError(f"{self.root.as_uri()} is a file, not a folder; give the folder that holds it")
        if create:
            self.root.mkdir(parents=True, exist_ok=True)
        elif not self.root.is_dir():
            raise NotFoundError(f"{self.root.as_uri()} does not exist")
        self._real_root = os.path.realpath(self.root)
        super().__init__(self.root.as_uri(), _ObLocalStore(self.root, mkdir=create))

    def list(self, prefix: str = "") -> Iterator[ObjectInfo]:
        """Every file under ``prefix``, walked here rather than by obstore, for two reasons.

        obstore follows symbolic links anywhere (a dataset link to /etc/passwd was snapshotted
        into the store) and hides files named ``*#<digits>`` (a dataset file so named was
        skipped silently, and the temporaries of a killed upload were invisible to gc). Here a
        link that stays inside the root is read, one that leaves it is an error naming it, and
        every file is listed.
        """
        sub = prefix.strip("/")
        if not (self.root / sub).is_dir():
            return
        for key, st in walk_files(self.root, sub, label=self.uri):
            yield ObjectInfo(key=key, size=st.st_size, last_modified=datetime.fromtimestamp(st.st_mtime, UTC))

    def get_bytes(self, key: str) -> bytes:
        """A small file's bytes with one read, not through obstore (records, small dataset files)."""
        fd, size = self.open_read(key)
        with self._errors(key):
            try:
                parts = []
                while chunk := os.read(fd, max(size + 1, 65536)):
                    parts.append(chunk)
                return parts[0] if len(parts) == 1 else b"".join(parts)
            finally:
                os.close(fd)

    def head(self, key: str) -> ObjectInfo | None:
        """A file's metadata from one ``os.stat``, not an obstore HEAD.

        The re-snapshot check asks this for every vouched-for blob: through obstore each call
        cost a trip through its runtime (2,000 blobs: 0.4-0.6 s); a stat costs microseconds. A
        folder is not an object (None), as for obstore; the etag is obstore's ("inode-mtime-size").
        """
        self.check_readable(key)
        try:
            with self._errors(key):
                st = os.stat(self.root / key)
        except NotFoundError:
            return None
        except StorageError as exc:
            if isinstance(exc.__cause__, NotADirectoryError):  # a path through a file: not there
                return None
            raise
        if not stat.S_ISREG(st.st_mode):
            return None
        return ObjectInfo(
            key=key, size=st.st_size, last_modified=datetime.fromtimestamp(st.st_mtime, UTC),
            etag=f'"{st.st_ino:x}-{st.st_mtime_ns // 1000:x}-{st.st_size:x}"',
        )

    async def head_async(self, key: str) -> ObjectInfo | None:
        """head(): a stat does not block long enough to be worth a thread."""
        return self.head(key)

    def read_into(self, key: str, dest: Path, *, stop: threading.Event | None = None) -> tuple[str, int]:
        """Copy the file ``key`` to ``dest`` (created or truncated) and return (sha256 hex, size) of the copy.

        The store's local read path (transfer.download_file uses it for every file-store read):
        plain file I/O at the disk's speed instead of obstore's reads (1 GiB took 5-9 s through
        obstore). The bytes move in the kernel (``copy_file_range``: a reflink on file systems
        that share extents, an in-kernel copy elsewhere) and the digest is taken from the copy,
        read back from the page cache just written, so what is verified is what the caller
        gets, in one pass (kernel_copy). ``dest`` is always a new file: never a hard link to the blob,
        because user code may write the staged file (the package folder of a training becomes
        the next version) and must not change the store through it. A set ``stop`` ends the
        copy between two chunks (kernel_copy.CopyStopped): the staging it serves failed elsewhere.
        """
        self.check_readable(key)
        with self._errors(key):
            src = os.open(self.root / key, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)  # NONBLOCK: a FIFO swapped in never hangs
            try:
                mode = os.fstat(src).st_mode
                if stat.S_ISDIR(mode):
                    raise FileNotFoundError(errno.ENOENT, "is a folder, not a file", str(self.root / key))
                if not stat.S_ISREG(mode):
                    raise StorageError(f"{key!r} in {self.uri} is not a regular file; remove it")
                dst = os.open(dest, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
                try:
                    return copy_hashed(src, dst, stop=stop)
                finally:
                    os.close(dst)
            finally:
                os.close(src)

    def put_file(
        self, key: str, path: Path, *, create: bool = False, check: Callable[[str], None] | None = None,
        stop: threading.Event | None = None,
    ) -> tuple[str, int]:
        """Store the local file ``path`` as ``key`` with plain file I/O; (sha256 hex, size) of what was stored.

        The digest is taken (and is not "") only where ``check`` asks for it.

        The file store's own write path (transfer.upload_file uses it for every file-store put):
        through obstore the first upload of 1 GiB took about 15 s, a copy in the kernel takes
        about one. The same rules as obstore's writes here, and a step more durable: the bytes go
        to a temporary ``<key>#<n>`` beside the key (copy_file_range, hashed from the copy:
        copy_hashed), which ``check`` (given the digest) may refuse, then are fsynced, and only then
        become the key, by a link (``create``: AlreadyExistsError if the key exists, whatever
        the size) or a rename (overwrite: readers see the old file or the new one, never a mix);
        the folder is fsynced after. A process killed mid-copy leaves no object, only a
        ``#<n>`` temporary that ``aicenter gc`` removes; a failed, refused or stopped (``stop``
        set: the upload was cancelled) put leaves nothing.
        """
        if reason := unstorable(key):
            raise StorageError(f"cannot store {self.url(key)}: {reason}")
        self.check_readable(key)
        target = self.root / key
        with self._errors(key):
            target.parent.mkdir(parents=True, exist_ok=True)
            folder = os.open(target.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            try:
                src = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
                try:
                    if not stat.S_ISREG(os.fstat(src).st_mode):
                        raise StorageError(f"{path} is not a regular file; only files can be stored")
                    tmp, dst = _new_temporary(target)
                    try:
                        try:
                            hexdigest, size = copy_hashed(src, dst, stop=stop, hashed=check is not None)
                            if check is not None:
                                check(hexdigest)
                            os.fsync(dst)
                        finally:
                            os.close(dst)
                        if create:
                            os.link(tmp, target)  # FileExistsError: the key is there (AlreadyExistsError)
                            os.unlink(tmp)
                        else:
                            os.replace(tmp, target)
                    except BaseException:
                        with contextlib.suppress(FileNotFoundError):
                            os.unlink(tmp)
                        raise
                finally:
                    os.close(src)
                os.fsync(folder)
            finally:
                os.close(folder)
        return hexdigest, size

    def open_read(self, key: str) -> tuple[int, int]:
        """Open the file ``key`` read-only: (descriptor, size); the caller closes it.

        For reading a blob in place (extracting a package zip, transfer.extract_blob) with no
        copy: what is read through the descriptor is one inode, even if the blob is replaced
        meanwhile (every writer renames a new file into place).
        """
        self.check_readable(key)
        with self._errors(key):
            fd = os.open(self.root / key, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
            try:
                st = os.fstat(fd)
                if stat.S_ISDIR(st.st_mode):
                    raise FileNotFoundError(errno.ENOENT, "is a folder, not a file", str(self.root / key))
                if not stat.S_ISREG(st.st_mode):
                    raise StorageError(f"{key!r} in {self.uri} is not a regular file; remove it")
                return fd, st.st_size
            except BaseException:
                os.close(fd)
                raise

    def delete(self, key: str) -> None:
        """obstore refuses keys ending in ``#<digits>``: such a leftover temporary is unlinked here."""
        if _TEMP_SUFFIX.search(key):
            self.check_readable(key)
            with self._errors(key):
                os.unlink(self.root / key)
            return
        super().delete(key)

    def check_readable(self, key: str) -> None:
        # The kernel resolves the path once (O_PATH opens nothing, a FIFO included): realpath's lstat of every
        # component cost 5x a stat, paid on every HEAD of a re-snapshot's blobs.
        mode = None
        try:
            if not _O_PATH:
                raise OSError(errno.ENOSYS, "no O_PATH here")
            fd = os.open(self.root / key, _O_PATH | os.O_CLOEXEC)
        except OSError:
            real = os.path.realpath(self.root / key)  # not there (or a dangling link): name where it leads
        else:
            try:
                real = os.readlink(f"/proc/self/fd/{fd}")
                mode = os.fstat(fd).st_mode
            except OSError:
                real = os.path.realpath(self.root / key)
            finally:
                os.close(fd)
        if not _inside(real, self._real_root):
            raise StorageError(link_error(key, real, self.uri))
        try:
            mode = os.stat(real).st_mode if mode is None else mode
        except OSError:
            return  # not there: the read itself says so
        if stat.S_ISFIFO(mode) or stat.S_ISSOCK(mode) or stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
            # opening a FIFO blocks until someone writes to it: one such key would hang its reader for good
            raise StorageError(f"{key!r} in {self.uri} is not a regular file (a FIFO, socket or device); remove it")


def copy_hashed(src: int, dst: int, *, stop: threading.Event | None = None, hashed: bool = True) -> tuple[str, int]:
    """Copy the open file ``src`` from its start to the open file ``dst`` (read-write); (sha256 of the copy, size).

    One pass through kernel_copy.copy_range: each chunk copied in the kernel, then hashed as
    read back from ``dst`` (the page cache just written, through a buffer the CPU keeps cached),
    the next chunk copied while this one is hashed. Reads until end of file, so a file that
    shrank or grew while it was copied hashes to what was copied. A set ``stop`` ends the copy
    between two chunks with kernel_copy.CopyStopped. ``hashed=False`` only copies (the digest is then ""):
    hashing costs more CPU than the copy itself (1 GiB: about 0.9 s).
    """
    if not hashed:
        return "", copy_range(src, dst, stop=stop)
    digest = hashlib.sha256()
    size = copy_range(src, dst, consume=digest.update, stop=stop)
    return digest.hexdigest(), size


_O_PATH: int = getattr(os, "O_PATH", 0)


def _new_temporary(target: Path) -> tuple[Path, int]:
    """A new ``<target>#<n>`` (obstore's temporary names: listed, and removed by gc once old) opened read-write."""
    while True:
        tmp = target.with_name(f"{target.name}#{secrets.randbelow(2**31)}")
        try:
            return tmp, os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o666)
        except FileExistsError:
            continue


def _inside(real: str, root: str) -> bool:
    return real == root or real.startswith(root.rstrip("/") + "/")


def link_error(rel: str, target: str, root: str) -> str:
    return (
        f"{rel!r} is a symbolic link to {target}, outside {root}; links are only followed inside their folder: "
        "copy the file into the folder instead of linking to it, or give the folder the link points to"
    )


def walk_files(root: Path, sub: str = "", *, label: str | None = None) -> Iterator[tuple[str, os.stat_result]]:
    """(path relative to ``root``, stat) of every regular file below ``root/sub``, sorted per folder.

    A symbolic link is followed only when its target stays inside ``root``: one that leaves it,
    dangles, or loops back to a folder being walked is a StorageError naming it (``label``
    names the root in the message). The walk never reads a byte outside ``root``.

    Other processes write and delete while a walk runs (a writer renames its temporary into
    place, gc removes a run): a file or folder gone by the time the walk looks at it is left
    out, as an S3 listing would, rather than failing the whole walk.
    """
    real_root = os.path.realpath(root)
    where = label or str(root)
    start = root / sub if sub else root

    def walk(folder: str, rel: str, chain: frozenset[str]) -> Iterator[tuple[str, os.stat_result]]:
        try:
            with os.scandir(folder) as it:
                entries = sorted(it, key=lambda e: e.name)
        except FileNotFoundError:
            return  # removed since its parent was read
        for entry in entries:
            name = f"{rel}{entry.name}"
            if entry.is_symlink():
                real = os.path.realpath(entry.path)
                if not _inside(real, real_root):
                    raise StorageError(link_error(name, real, where))
                try:
                    st = os.stat(real)
                except OSError:
                    if not os.path.lexists(entry.path):
                        continue  # the link itself was removed meanwhile
                    raise StorageError(f"{name!r} in {where} is a broken symbolic link (to {real}); remove it") from None
                if stat.S_ISDIR(st.st_mode):
                    if real in chain:
                        raise StorageError(f"{name!r} in {where} is a symbolic link that loops back to {real}; remove it")
                    yield from walk(real, name + "/", chain | {real})
                elif stat.S_ISREG(st.st_mode):
                    yield name, st
            elif entry.is_dir(follow_symlinks=False):
                yield from walk(entry.path, name + "/", chain | {os.path.realpath(entry.path)})
            elif entry.is_file(follow_symlinks=False):
                try:
                    file_stat = entry.stat(follow_symlinks=False)
                except FileNotFoundError:
                    continue  # renamed or deleted since the folder was read
                yield name, file_stat

    yield from walk(str(start), f"{sub}/" if sub else "", frozenset({os.path.realpath(start)}))


def local_path(uri: str) -> Path:
    """``file:///abs/path`` or ``/abs/path`` -> Path; anything relative is refused."""
    parsed = urlparse(uri)
    if parsed.scheme == "file":
        if parsed.netloc not in ("", "localhost"):
            raise ConfigurationError(f"{uri!r} names a host; write a local store as file:///absolute/path")
        path = Path(unquote(parsed.path))
    elif parsed.scheme == "":
        path = Path(uri).expanduser()
    else:
        raise ConfigurationError(f"{uri!r} is not a file URI")
    if not path.is_absolute():
        raise ConfigurationError(f"{uri!r} is relative; give an absolute path such as file:///data/aicenter")
    return path


def open_store(uri: str, s3: S3Options | None = None, *, create: bool = True) -> Store:
    """The store for a URI: ``s3://bucket/prefix``, ``file:///abs/path`` or an absolute path.

    ``create=False`` is for reading what must already be there (datasets): a missing local
    folder is a NotFoundError instead of a new empty folder.
    """
    if not isinstance(uri, str) or not uri.strip():
        raise ConfigurationError("storage URI is empty; use s3://bucket/prefix or file:///absolute/path")
    scheme = urlparse(uri).scheme
    if scheme == "s3":
        return S3Store(uri, s3)
    if scheme in ("file", ""):
        return LocalStore(uri, create=create)
    raise ConfigurationError(
        f"storage URI {uri!r} has scheme {scheme!r}, which is not supported; use s3://bucket/prefix or file:///absolute/path"
    )
