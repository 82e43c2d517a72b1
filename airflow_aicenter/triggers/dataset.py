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

Restarts: the last fingerprint acted on is kept in the aicenter store under
``triggers/<sha256 of the trigger's arguments>.json`` and compared with on start, so a
restarted triggerer does not announce a change again. The key is the trigger's arguments, the
identity Airflow itself uses to run one trigger for identical watchers: two watchers Airflow
runs as one share the record, two that differ (another poll interval) never take each other's
events. The record is written right after the event is handed to the triggerer: a triggerer
killed in between announces that change once more rather than never.

Everything that blocks (the connection, listing, the record) runs in a worker thread, off the
triggerer's event loop.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from airflow.triggers.base import BaseEventTrigger, TriggerEvent

from airflow_aicenter.errors import ConfigurationError, DatasetError, NotFoundError
from airflow_aicenter.layout import trigger_state_key
from airflow_aicenter.storage import Store


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
        """Where the last fingerprint acted on is kept in the aicenter store (see the module docstring)."""
        _, kwargs = self.serialize()
        return trigger_state_key(json.dumps(kwargs, sort_keys=True))

    # -- blocking parts, run in a thread ---------------------------------------------------
    def _open(self) -> tuple[Store, Store]:
        """(dataset, aicenter store) through the connection, as the operators open them."""
        from airflow_aicenter.hooks.aicenter import AICenterHook

        hook = AICenterHook(self.aicenter_conn_id)
        try:
            dataset = hook.get_store(self.dataset)
        except NotFoundError:
            raise DatasetError(self._missing()) from None
        return dataset, hook.get_store()

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

    def _read_state(self, store: Store) -> str | None:
        try:
            state = json.loads(store.get_bytes(self.state_key))
        except NotFoundError:
            return None
        except ValueError:  # unreadable (hand-edited): start over from the current listing
            self.log.warning("unreadable trigger state %s: recording the current listing anew", store.url(self.state_key))
            return None
        fingerprint = state.get("fingerprint") if isinstance(state, dict) else None
        return fingerprint if isinstance(fingerprint, str) else None

    def _write_state(self, store: Store, listing: Listing, *, announced: bool) -> None:
        state = {
            "dataset": self.dataset, "fingerprint": listing.fingerprint, "files": listing.files, "bytes": listing.bytes,
            "announced": announced, "at": datetime.now(UTC).isoformat(),
        }
        store.put_bytes(self.state_key, json.dumps(state, indent=2).encode())

    # -- the trigger -------------------------------------------------------------------------
    async def run(self) -> AsyncIterator[TriggerEvent]:
        dataset, store = await asyncio.to_thread(self._open)
        known = await asyncio.to_thread(self._read_state, store)
        first = True
        while True:
            listing = await asyncio.to_thread(self._list, dataset)
            if first and known is None and listing.files == 0 and dataset.scheme == "s3":
                raise DatasetError(self._missing())  # S3 has no folders: an empty prefix is one that does not exist
            first = False
            if known is None:
                self.log.info("watching %s: %d files, %d bytes (fingerprint %s)", self.dataset, listing.files, listing.bytes,
                              listing.fingerprint[:12])
                await asyncio.to_thread(self._write_state, store, listing, announced=False)
            elif listing.fingerprint != known and listing.files == 0:
                self.log.info("%s was emptied: recorded, not announced (nothing to train on)", self.dataset)
                await asyncio.to_thread(self._write_state, store, listing, announced=False)
            elif listing.fingerprint != known:
                self.log.info("%s changed: %d files, %d bytes (fingerprint %s)", self.dataset, listing.files, listing.bytes,
                              listing.fingerprint[:12])
                yield TriggerEvent({"dataset": self.dataset, "files": listing.files, "bytes": listing.bytes,
                                    "fingerprint": listing.fingerprint})
                await asyncio.to_thread(self._write_state, store, listing, announced=True)
            known = listing.fingerprint
            await asyncio.sleep(self.poll_interval)
            # opened anew for every poll: temporary credentials from the AWS connection expire, a watch runs for months
            dataset, store = await asyncio.to_thread(self._open)
