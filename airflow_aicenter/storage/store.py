"""One object-store interface over obstore, with an S3 and a local-disk backend.

Every byte the product moves goes through here (and ``transfer.py`` for many files at once),
so both backends get the same semantics: create-once puts (If-None-Match on S3, exclusive
create on disk), server-side copy, listing, and typed errors. No Airflow import: the runtime
uses this module inside training pods.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, ClassVar, NoReturn
from urllib.parse import quote, unquote, urlparse

import obstore
import obstore.exceptions as obx
from obstore.store import LocalStore as _ObLocalStore
from obstore.store import S3Store as _ObS3Store

from airflow_aicenter.errors import (
    AlreadyExistsError,
    ConfigurationError,
    NotFoundError,
    StorageError,
)

#: Retries with exponential backoff for transient S3 errors (503 SlowDown, resets, timeouts).
RETRY_CONFIG: dict[str, Any] = {
    "max_retries": 8,
    "retry_timeout": timedelta(minutes=3),
    "backoff": {"init_backoff": timedelta(milliseconds=100), "max_backoff": timedelta(seconds=15), "base": 2},
}


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

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.uri!r})"

    # -- naming --------------------------------------------------------------------------
    def url(self, key: str = "") -> str:
        """The URI of a key (or of the root when ``key`` is empty)."""
        return f"{self.uri}/{key}" if key else self.uri

    def browse_url(self, key: str = "") -> str:
        """A link a person can open for a key (console page or local path)."""
        return self.url(key)

    def child(self, prefix: str) -> Store:
        """A store rooted at ``prefix`` below this one (same credentials)."""
        raise NotImplementedError

    # -- small objects -------------------------------------------------------------------
    def put_bytes(self, key: str, data: bytes, *, create: bool = False) -> None:
        """Write ``data``; with ``create=True`` fail with AlreadyExistsError if the key exists."""
        with self._errors(key):
            obstore.put(self._inner, key, data, mode="create" if create else "overwrite")

    async def put_bytes_async(self, key: str, data: bytes, *, create: bool = False) -> None:
        with self._errors(key):
            await obstore.put_async(self._inner, key, data, mode="create" if create else "overwrite")

    def get_bytes(self, key: str) -> bytes:
        with self._errors(key):
            return bytes(obstore.get(self._inner, key).bytes())

    async def get_bytes_async(self, key: str) -> bytes:
        with self._errors(key):
            result = await obstore.get_async(self._inner, key)
            return bytes(await result.bytes_async())

    def head(self, key: str) -> ObjectInfo | None:
        try:
            with self._errors(key):
                return _info(obstore.head(self._inner, key))
        except NotFoundError:
            return None

    async def head_async(self, key: str) -> ObjectInfo | None:
        try:
            with self._errors(key):
                return _info(await obstore.head_async(self._inner, key))
        except NotFoundError:
            return None

    def exists(self, key: str) -> bool:
        return self.head(key) is not None

    def list(self, prefix: str = "") -> Iterator[ObjectInfo]:
        """Every object under ``prefix`` (recursive), in pages, never all in memory at once."""
        with self._errors(prefix):
            for page in obstore.list(self._inner, prefix or None, chunk_size=1000):
                for meta in page:
                    yield _info(meta)

    def list_dir(self, prefix: str = "") -> tuple[list[str], list[ObjectInfo]]:
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

    def __exit__(self, exc_type: type | None, exc: BaseException | None, tb: Any) -> bool:
        if exc is None or isinstance(exc, (StorageError, ConfigurationError)):
            return False
        where = self.store.url(self.key)
        first = str(exc).splitlines()[0][:300] if str(exc) else type(exc).__name__
        if "<Code>NoSuchBucket</Code>" in str(exc):
            bucket = getattr(self.store, "bucket", "?")
            raise StorageError(
                f"bucket {bucket!r} does not exist (reading or writing {where}); create it, or fix the bucket name in the URI"
            ) from exc
        if isinstance(exc, (FileNotFoundError, obx.NotFoundError)):
            raise NotFoundError(f"{where} does not exist") from exc
        if isinstance(exc, obx.AlreadyExistsError):
            raise AlreadyExistsError(f"{where} already exists") from exc
        if isinstance(exc, (obx.PermissionDeniedError, obx.UnauthenticatedError, PermissionError)):
            raise StorageError(
                f"access to {where} was denied ({first}); check the credentials of the AWS connection "
                "(or the pod's service account) and the bucket policy"
            ) from exc
        if isinstance(exc, (obx.BaseError, OSError)):
            raise StorageError(f"storage request for {where} failed: {first}") from exc
        return False


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
            config=self.options.obstore_config(),
            client_options=self.options.client_options(),
            retry_config=RETRY_CONFIG,
        )
        super().__init__(f"s3://{self.bucket}/{self.prefix}" if self.prefix else f"s3://{self.bucket}", inner)

    def child(self, prefix: str) -> S3Store:
        return S3Store(self.url(prefix.strip("/")), self.options)

    def browse_url(self, key: str = "") -> str:
        full = "/".join(p for p in (self.prefix, key) if p)
        if self.options.endpoint_url:  # MinIO, moto, Ceph: the object's own URL
            return f"{self.options.endpoint_url.rstrip('/')}/{self.bucket}/{quote(full)}"
        region = self.options.region or "us-east-1"
        kind = "object" if key and not key.endswith("/") else "buckets"
        if kind == "object":
            return f"https://{region}.console.aws.amazon.com/s3/object/{self.bucket}?region={region}&prefix={quote(full)}"
        folder = quote(full.rstrip("/"))
        return f"https://{region}.console.aws.amazon.com/s3/buckets/{self.bucket}?region={region}&prefix={folder + '/' if folder else ''}"


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
        super().__init__(self.root.as_uri(), _ObLocalStore(self.root, mkdir=create))

    def child(self, prefix: str) -> LocalStore:
        return LocalStore(str(self.root / prefix.strip("/")))

    def browse_url(self, key: str = "") -> str:
        return self.url(key)


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


def exit_process(code: int) -> NoReturn:
    """End a short-lived process (the runtime, the CLI) without interpreter teardown.

    obstore's Tokio worker threads are never told that Python is finalizing; one that is still
    busy at that moment (cleaning up after a multipart upload, say) can abort the process with
    SIGABRT after all its work succeeded (seen here twice in about 100 benchmark runs: exit
    -6 with the results already printed). Everything the process owes is written before this is called,
    so output is flushed and the process leaves at once with its real exit code.
    """
    import logging
    import sys

    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    os._exit(code)


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
