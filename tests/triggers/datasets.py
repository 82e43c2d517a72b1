"""The datasets the trigger tests change, and the asset state store a triggerer hands a watcher's trigger."""

from __future__ import annotations

import asyncio
import json
import os
from pathlib import Path
from typing import Any


class AssetState:
    """One asset's state store as the triggerer hands it to an ``AssetWatcher``'s trigger (Airflow's
    ``AssetStateStoreAccessors``): JSON values by key, kept in Airflow's database across trigger
    instances. A stand-in for that database, in memory; values are stored as JSON text, as there."""

    def __init__(self) -> None:
        self.values: dict[str, str] = {}

    async def aget(self, key: str, default: Any = None) -> Any:
        await asyncio.sleep(0)
        return json.loads(self.values[key]) if key in self.values else default

    async def aset(self, key: str, value: Any) -> None:
        if value is None:
            raise ValueError("Cannot set value as None")
        await asyncio.sleep(0)
        self.values[key] = json.dumps(value)

    def get(self, key: str) -> Any:
        return json.loads(self.values[key]) if key in self.values else None


class Dataset:
    """A dataset to change: a local folder, or a prefix in a moto bucket; and the state store of the asset watching it."""

    def __init__(self, uri: str, s3: Any = None, bucket: str = "", prefix: str = "", root: Path | None = None) -> None:
        self.uri, self.s3, self.bucket, self.prefix, self.root = uri, s3, bucket, prefix, root
        self.store_uri = ""  # the aicenter store the connection names
        self.state = AssetState()  # the watched asset's, in Airflow's database: it outlives triggerer restarts

    def put(self, name: str, data: bytes) -> None:
        if self.s3 is not None:
            self.s3.put_object(Bucket=self.bucket, Key=f"{self.prefix}/{name}", Body=data)
            return
        assert self.root is not None
        path = self.root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)

    def recreate(self, name: str, data: bytes) -> None:
        """Write ``name`` anew with ``data``, with no moment in which it is missing: uploaded again over itself on S3;
        on disk a new file (new inode) with the old one's mtime, renamed over it (as ``rsync -t`` or ``cp -p`` leave it)."""
        if self.s3 is not None:
            self.put(name, data)
            return
        assert self.root is not None
        old = self.root / name
        fresh = self.root.parent / f".{name}.new"
        fresh.write_bytes(data)
        os.utime(fresh, ns=(old.stat().st_atime_ns, old.stat().st_mtime_ns))
        os.replace(fresh, old)

    def delete(self, name: str) -> None:
        if self.s3 is not None:
            self.s3.delete_object(Bucket=self.bucket, Key=f"{self.prefix}/{name}")
        else:
            assert self.root is not None
            (self.root / name).unlink()
