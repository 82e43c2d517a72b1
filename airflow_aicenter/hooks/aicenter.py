"""AICenterHook: the ``aicenter`` connection turned into a store, a registry and launcher settings.

No connection at all is a valid deployment: the embedded default is a file store under
``$AIRFLOW_HOME/aicenter`` and the local launcher, so a laptop needs no set-up.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

from airflow.sdk import BaseHook

from airflow_aicenter.errors import ConfigurationError
from airflow_aicenter.launchers.base import LAUNCHERS
from airflow_aicenter.registry import Registry
from airflow_aicenter.storage import S3Options, Store, open_store


def airflow_home() -> Path:
    return Path(os.environ.get("AIRFLOW_HOME") or Path.home() / "airflow").expanduser().resolve()


def default_storage_uri() -> str:
    return (airflow_home() / "aicenter").as_uri()


@dataclass(frozen=True)
class Settings:
    """What the ``aicenter`` connection says (or the embedded defaults)."""

    storage: str
    launcher: str = "local"
    aws_conn_id: str | None = None
    image: str | None = None
    namespace: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)


class AICenterHook(BaseHook):
    """Connection ``aicenter`` -> storage URI, AWS credentials (via the amazon provider), launcher."""

    conn_name_attr = "aicenter_conn_id"
    default_conn_name = "aicenter_default"
    conn_type = "aicenter"
    hook_name = "AI Center"

    def __init__(self, aicenter_conn_id: str = default_conn_name) -> None:
        super().__init__()
        self.aicenter_conn_id = aicenter_conn_id
        self._stores: dict[str, Store] = {}

    @cached_property
    def settings(self) -> Settings:
        extra = self._connection_extra()
        if extra is None:
            return Settings(storage=default_storage_uri())
        launcher = extra.get("launcher") or "local"
        if launcher not in LAUNCHERS:
            raise ConfigurationError(
                f"connection {self.aicenter_conn_id!r} has launcher={launcher!r}; use one of {', '.join(LAUNCHERS)}"
            )
        return Settings(
            storage=extra.get("storage") or default_storage_uri(),
            launcher=launcher,
            aws_conn_id=extra.get("aws_conn_id") or None,
            image=extra.get("image") or None,
            namespace=extra.get("namespace") or None,
            extra=extra,
        )

    def _connection_extra(self) -> dict[str, Any] | None:
        from airflow.sdk.exceptions import AirflowNotFoundException

        try:
            conn = self.get_connection(self.aicenter_conn_id)
        except AirflowNotFoundException:
            if self.aicenter_conn_id != self.default_conn_name:
                raise ConfigurationError(
                    f"connection {self.aicenter_conn_id!r} does not exist; create it (type aicenter) or leave "
                    f"aicenter_conn_id at {self.default_conn_name!r} to use the embedded file store"
                ) from None
            return None
        return conn.extra_dejson or {}

    @cached_property
    def s3_options(self) -> S3Options | None:
        """Endpoint, region and credentials from the AWS connection (for an S3 store, or S3 datasets beside a file store)."""
        if not self.settings.aws_conn_id:
            return S3Options.from_env() if self.settings.storage.startswith("s3://") else None
        from airflow.providers.amazon.aws.hooks.base_aws import AwsBaseHook

        aws = AwsBaseHook(aws_conn_id=self.settings.aws_conn_id, client_type="s3")
        try:
            creds = aws.get_credentials()
        except AttributeError as exc:  # botocore found none: AwsBaseHook then calls .get_frozen_credentials() on None
            raise ConfigurationError(
                f"no AWS credentials for the AWS connection {self.settings.aws_conn_id!r} (used for "
                f"{self.settings.storage}): give that connection an access key id (login) and secret access key "
                "(password), or a role_arn or profile_name in its extra, or set AWS_ACCESS_KEY_ID and "
                "AWS_SECRET_ACCESS_KEY where the tasks run"
            ) from exc
        return S3Options(
            endpoint_url=aws.conn_config.get_service_endpoint_url("s3"),
            # The region the connection states; only without one is it resolved as botocore does (environment,
            # config), which builds a client: the pages read the connection per request, a client costs ~0.25 s.
            region=aws.region_name or aws.conn_region_name,
            access_key_id=creds.access_key,
            secret_access_key=creds.secret_key,
            session_token=creds.token,
        )

    def get_store(self, uri: str | None = None) -> Store:
        """The storage root, or any other URI (a dataset, which must exist) with the same credentials.

        Stores are cached per URI for the hook's life: one S3 client per run, not one per call.
        """
        target = uri or self.settings.storage
        if target not in self._stores:
            # AWS credentials are fetched only for an s3:// target: a file store with local data never needs them.
            self._stores[target] = open_store(target, self.s3_options if target.startswith("s3://") else None, create=uri is None)
        return self._stores[target]

    @cached_property
    def registry(self) -> Registry:
        return Registry(self.get_store())

    def get_registry(self) -> Registry:
        return self.registry

    def uses_s3(self, *uris: str | None) -> bool:
        """Whether the store or any of ``uris`` (a run's datasets) is on S3."""
        return any(str(u or "").startswith("s3://") for u in (self.settings.storage, *uris))

    def runtime_env(self, *uris: str | None) -> dict[str, str]:
        """Variables a local child process needs to reach the store and ``uris`` (never written to a spec)."""
        if not self.uses_s3(*uris):
            return {}
        return self.s3_options.to_env() if self.s3_options else {}

    def test_connection(self) -> tuple[bool, str]:
        """The connection form's Test button: the store answers, and it is an AI Center store (or a new, empty one).

        The store is opened read-only (a typo in a file:// URI must not create a folder) and its
        top level listed once. Errors other than ours (credentials, network) are reported by
        Airflow with their own message.
        """
        from airflow_aicenter import layout
        from airflow_aicenter.errors import AICenterError

        uri = self.settings.storage
        try:
            store = open_store(uri, self.s3_options if uri.startswith("s3://") else None, create=False)
            folders, files = store.list_dir("")
        except AICenterError as exc:
            return False, f"{uri}: {exc}"
        kind, shown = layout.classify_top(folders, [i.key for i in files])
        if kind == "store":
            packages = Registry(store).packages()
            return True, f"{store.uri} is an AI Center store with {len(packages)} package(s)"
        if kind == "empty":
            return True, (
                f"{store.uri} is reachable and empty: a new store (`aicenter package upload PATH --name NAME` adds a "
                "package); if you expected packages here, check the URI for a typo"
            )
        return False, (
            f"{store.uri} holds other data ({shown}) but {layout.NOT_A_STORE}, so it is not an AI Center "
            "store; give the prefix the store was created at, or an empty one"
        )
