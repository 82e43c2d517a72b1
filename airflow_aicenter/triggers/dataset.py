"""DatasetChangedTrigger: an ``AssetWatcher`` trigger that fires when a dataset's listing changes.

``schedule=[Asset(uri, watchers=[AssetWatcher(name="new-data", trigger=DatasetChangedTrigger(dataset=uri))])]``
retrains when new data lands, on a file or an S3 dataset.

What is compared (cheap, and never the content): one paginated listing per poll, each object as
``key, size, identity``. On S3 the identity is the ETag, which S3 derives from the content: a
file deleted and uploaded again with the same bytes lists the same, so it is no change. On a
file store it is the modification time (to the microsecond), so a file
re-created with the same listing (same size and mtime: ``cp -p``, ``rsync -t``, a restored
backup) is no change, while a rewrite with a new mtime is, even if the bytes happen to be the
same: telling those apart would mean reading every file, and one extra retraining is the
safe error, a missed change is not. The fingerprint is the sha256 of the sorted listing.

When it fires: once per change of the fingerprint, with payload ``dataset``, ``files``,
``bytes``, ``fingerprint``. The first start only records the listing it finds (data that was
already there is not news; an existing empty folder is a fine start); an emptied dataset is
recorded but not announced (there is nothing to train on), so the next data to land fires even
if it lists like data seen before.

Restarts: the last fingerprint acted on is kept in Airflow's asset state store (Airflow 3.3,
AIP-103), on the asset the watcher belongs to, under ``aicenter.dataset_changed.<sha256 of the
trigger's arguments>``, and compared with on start, so a restarted triggerer does not announce a
change again, and does announce, once, a change made while it was down. The key is the trigger's
arguments, the identity Airflow itself uses to run one trigger for identical watchers: two
watchers Airflow runs as one share the record, two that differ (another poll interval) never take
each other's events. The record is written right after the event is handed to the triggerer: a
triggerer killed in between announces that change once more rather than never.

Why there and not in the aicenter store: runs write the store (their run folder, blobs and
environments; a file store's whole folder; with ``aws_secret_name`` the store's own keys), so a
record there could be forged: "the current listing was announced" written by a run silences the
next start for the change at hand. The asset state store lives in Airflow's metadata database and
is written by the triggerer and by Airflow tasks through the execution API with a task's own token
(DAG code, which a deployment trusts already; Airflow 3.3 lets any task write any asset's state);
a run's package code has neither the database nor such a token: a pod gets storage credentials
only, and the local launcher hands the runtime none of the worker's Airflow settings. Records a
trigger of an earlier version left under ``triggers/`` in the aicenter store are never read.

Without an asset state store (the trigger run outside an ``AssetWatcher``, or one trigger shared
by watchers of several assets, which Airflow does for identical arguments on different assets)
the last fingerprint is kept in memory, with a warning: a restart then starts from the listing it
finds, never announcing a change twice, but missing one made while it was down.

Everything that blocks (the connection, the listing) runs in a worker thread, off the triggerer's
event loop; the state store is used through its async methods.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Protocol, cast

from airflow.triggers.base import BaseEventTrigger, TriggerEvent

from airflow_aicenter.errors import ConfigurationError, DatasetError, NotFoundError
from airflow_aicenter.layout import is_digest
from airflow_aicenter.storage import Store

#: The asset state store key prefix of a DatasetChangedTrigger's record (the rest: sha256 of its arguments).
STATE_PREFIX = "aicenter.dataset_changed."


@dataclass(frozen=True)
class Listing:
    """What one poll saw: the counts and the fingerprint of ``key, size, identity`` for every object."""

    files: int
    bytes: int
    fingerprint: str


def listing_of(store: Store) -> Listing:
    """One paginated listing of ``store`` (the dataset), reduced to its fingerprint; no content is read."""
    entries: list[tuple[str, int, str]] = []
    total = 0
    for info in store.list():
        if store.scheme == "s3" and info.etag:
            identity = info.etag.strip('"')
        else:
            identity = _mtime(info.last_modified)
        entries.append((info.key, info.size, identity))
        total += info.size
    digest = hashlib.sha256()
    for key, size, identity in sorted(entries):
        digest.update(f"{key}\0{size}\0{identity}\n".encode())
    return Listing(files=len(entries), bytes=total, fingerprint=digest.hexdigest())


def _mtime(value: datetime | None) -> str:
    if value is None:
        return "-"
    moment = value if value.tzinfo else value.replace(tzinfo=UTC)
    return moment.isoformat()


class DatasetChangedTrigger(BaseEventTrigger):
    """Fire once per change of a dataset's listing (keys, sizes, ETags/mtimes); see the module docstring."""

    def __init__(self, dataset: str, poll_interval: float = 60, aicenter_conn_id: str = "aicenter_default") -> None:
        super().__init__()
        if not isinstance(dataset, str) or not dataset.startswith(("s3://", "file://", "/")):
            raise ConfigurationError(
                f"DatasetChangedTrigger(dataset={dataset!r}): give the dataset as s3://bucket/prefix or file:///absolute/path"
            )
        if not isinstance(poll_interval, (int, float)) or isinstance(poll_interval, bool) or poll_interval <= 0:
            raise ConfigurationError(
                f"DatasetChangedTrigger(poll_interval={poll_interval!r}): give the seconds between listings, above 0 (default 60)"
            )
        self.dataset = dataset
        self.poll_interval = poll_interval
        self.aicenter_conn_id = aicenter_conn_id

    def serialize(self) -> tuple[str, dict[str, Any]]:
        return (
            f"{type(self).__module__}.{type(self).__qualname__}",
            {"dataset": self.dataset, "poll_interval": self.poll_interval, "aicenter_conn_id": self.aicenter_conn_id},
        )

    @property
    def state_key(self) -> str:
        """The key of the last fingerprint acted on, in the watched asset's state store (see the module docstring)."""
        _, kwargs = self.serialize()
        return f"{STATE_PREFIX}{hashlib.sha256(json.dumps(kwargs, sort_keys=True).encode()).hexdigest()}"

    # -- blocking parts, run in a thread ---------------------------------------------------
    def _open(self) -> Store:
        """The dataset, through the connection, as the operators open it."""
        from airflow_aicenter.hooks.aicenter import AICenterHook

        try:
            return AICenterHook(self.aicenter_conn_id).get_store(self.dataset)
        except NotFoundError:
            raise DatasetError(self._missing()) from None

    def _missing(self) -> str:
        return (
            f"dataset {self.dataset} does not exist, so DatasetChangedTrigger cannot watch it: fix the URI, or create the "
            "dataset first (on S3, a prefix exists once it holds an object: put a placeholder such as "
            f"{self.dataset.rstrip('/')}/.keep)"
        )

    def _list(self, dataset: Store) -> Listing:
        try:
            return listing_of(dataset)
        except NotFoundError:  # a local folder removed while watched
            raise DatasetError(self._missing()) from None

    # -- the state: Airflow's asset state store ----------------------------------------------
    def _state_store(self) -> StateStore:
        """The watched asset's state store, as the triggerer hands it to an asset watcher's trigger; else memory."""
        store = getattr(self, "asset_state_store", None)
        if store is not None:
            return cast(StateStore, store)
        self.log.warning(
            "DatasetChangedTrigger(dataset=%s) runs without an asset state store (not as an AssetWatcher's trigger in "
            "Airflow 3.3+): what was announced is kept in memory only, so a restart will not announce a change made "
            "while it was down", self.dataset)
        return _MemoryState()

    async def _read_state(self, state: StateStore) -> tuple[StateStore, str | None]:
        """(the state store to use from now on, the last fingerprint acted on or None)."""
        try:
            value = await state.aget(self.state_key, None)
        except ValueError as exc:  # the trigger serves several assets: Airflow cannot tell whose state to use
            self.log.warning(
                "DatasetChangedTrigger(dataset=%s) has no single asset state store (%s): what was announced is kept "
                "in memory only, so a restart will not announce a change made while it was down; give each asset's "
                "watcher its own arguments (another poll_interval) so that each has its own trigger",
                self.dataset, exc)
            return _MemoryState(), None
        fingerprint = value.get("fingerprint") if isinstance(value, dict) else None
        if value is not None and not (isinstance(fingerprint, str) and is_digest(fingerprint)):
            self.log.warning("unreadable state %s of DatasetChangedTrigger(dataset=%s): recording the current listing "
                             "anew", self.state_key, self.dataset)
            return state, None
        return state, fingerprint

    async def _write_state(self, state: StateStore, listing: Listing, *, announced: bool) -> None:
        await state.aset(self.state_key, {
            "dataset": self.dataset, "fingerprint": listing.fingerprint, "files": listing.files, "bytes": listing.bytes,
            "announced": announced, "at": datetime.now(UTC).isoformat(),
        })

    # -- the trigger -------------------------------------------------------------------------
    async def run(self) -> AsyncIterator[TriggerEvent]:
        dataset = await asyncio.to_thread(self._open)
        state, known = await self._read_state(self._state_store())
        first = True
        while True:
            listing = await asyncio.to_thread(self._list, dataset)
            if first and known is None and listing.files == 0 and dataset.scheme == "s3":
                raise DatasetError(self._missing())  # S3 has no folders: an empty prefix is one that does not exist
            first = False
            if known is None:
                self.log.info("watching %s: %d files, %d bytes (fingerprint %s)", self.dataset, listing.files, listing.bytes,
                              listing.fingerprint[:12])
                await self._write_state(state, listing, announced=False)
            elif listing.fingerprint != known and listing.files == 0:
                self.log.info("%s was emptied: recorded, not announced (nothing to train on)", self.dataset)
                await self._write_state(state, listing, announced=False)
            elif listing.fingerprint != known:
                self.log.info("%s changed: %d files, %d bytes (fingerprint %s)", self.dataset, listing.files, listing.bytes,
                              listing.fingerprint[:12])
                yield TriggerEvent({"dataset": self.dataset, "files": listing.files, "bytes": listing.bytes,
                                    "fingerprint": listing.fingerprint})
                await self._write_state(state, listing, announced=True)
            known = listing.fingerprint
            await asyncio.sleep(self.poll_interval)
            # opened anew for every poll: temporary credentials from the AWS connection expire, a watch runs for months
            dataset = await asyncio.to_thread(self._open)


class StateStore(Protocol):
    """What the trigger uses of Airflow's asset state store (``AssetStateStoreAccessors``: JSON values by key)."""

    async def aget(self, key: str, default: Any = None) -> Any: ...

    async def aset(self, key: str, value: Any) -> None: ...


class _MemoryState:
    """The fallback without an asset state store: this trigger instance's memory (see the module docstring)."""

    def __init__(self) -> None:
        self._values: dict[str, Any] = {}

    async def aget(self, key: str, default: Any = None) -> Any:
        return self._values.get(key, default)

    async def aset(self, key: str, value: Any) -> None:
        self._values[key] = value
