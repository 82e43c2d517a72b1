"""A store with one of each kind of damage, for the gc, verify and CLI tests.

Built through the product's own writers (Registry.upload, records.write) and then damaged by
hand, as bit rot, a hand edit or a run's credentials would damage it.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path

from airflow_aicenter import layout
from airflow_aicenter.records import Manifest, ManifestEntry, Outcome, write
from airflow_aicenter.registry import Registry
from airflow_aicenter.runtime.checkpoint import CheckpointFile, CheckpointManifest
from airflow_aicenter.storage import Store
from airflow_aicenter.storage.transfer import put_blob, sha256_file
from tests.conftest import EXAMPLE_PACKAGE

RUN = layout.RunPath("dag", "run1", "train", try_number=1)


@dataclass
class Damaged:
    """What was stored and how it was damaged (keys are store keys, digests sha256 hex)."""

    store: Store
    package_blob: str  # churn:1.0's package zip, intact
    orphan: str  # an old blob nothing names: gc may delete it
    salvaged: str  # named only by a damaged env record whose digest is still readable in its bytes
    damaged_blob: str  # a snapshot file's blob, one byte flipped (same size)
    missing_blob: str  # a snapshot file's blob, deleted
    files: dict[str, bytes] = field(default_factory=dict)  # the snapshot's files by name (a repair source)
    records: dict[str, str] = field(default_factory=dict)  # kind -> key of the damaged record
    checkpoint_object: str = ""  # a checkpoint object's key, deleted


def _blob(store: Store, tmp: Path, data: bytes) -> str:
    path = tmp / hashlib.sha256(data).hexdigest()
    path.write_bytes(data)
    digest = sha256_file(path).sha256
    put_blob(store, path, digest)
    return digest


def damaged_store(store: Store, tmp: Path) -> Damaged:
    """One package (churn 1.0, then an alias), one run with a snapshot and a checkpoint, then one of each damage."""
    tmp.mkdir(parents=True, exist_ok=True)
    registry = Registry(store)
    version = registry.upload(EXAMPLE_PACKAGE, "churn")
    registry.set_alias("churn", "production", "1.0")
    files = {"a.csv": b"x,y\n1,2\n", "b.csv": b"x,y\n3,4\n" * 50, "c.csv": os.urandom(3000)}
    digests = {name: _blob(store, tmp, data) for name, data in files.items()}
    manifest = Manifest(source="file:///data/churn", directory="data_directory",
                        files=[ManifestEntry(path=n, sha256=d, size=len(files[n])) for n, d in digests.items()],
                        file_count=len(files), total_bytes=sum(map(len, files.values())))
    write(store, RUN.key(layout.manifest_name("data_directory")), manifest)
    outcome = Outcome(status="succeeded", pipeline="train", package="churn", version="1.0", start_at=1.0, end_at=2.0,
                      snapshots={"data_directory": store.url(RUN.key(layout.manifest_name("data_directory")))})
    write(store, RUN.key(layout.OUTCOME), outcome)
    checkpoint = b"weights" * 100
    ckpt_digest = hashlib.sha256(checkpoint).hexdigest()
    object_key = layout.checkpoint_object_key(RUN.task.checkpoints, ckpt_digest)
    store.put_bytes(object_key, checkpoint)
    write(store, layout.checkpoint_manifest_key(RUN.task.checkpoints, 1), CheckpointManifest(
        seq=1, try_number=1, files=[CheckpointFile(path="model.pt", sha256=ckpt_digest, size=len(checkpoint), mtime_ns=1)],
        bytes=len(checkpoint)))
    orphan = _blob(store, tmp, os.urandom(5000))
    salvaged = _blob(store, tmp, os.urandom(4000))

    # the damage
    damaged_blob, missing_blob = digests["b.csv"], digests["c.csv"]
    raw = bytearray(files["b.csv"])
    raw[10] ^= 0xFF
    store.put_bytes(layout.blob_key(damaged_blob), bytes(raw))
    store.delete(layout.blob_key(missing_blob))
    store.delete(object_key)
    records = {
        "version": layout.version_key("churn", "1.1"),
        "alias": layout.alias_key("churn", "production", 1),  # the current entry
        "env": layout.env_key("e" * 64),
        "env (digest readable)": layout.env_key("f" * 64),
        "outcome": layout.RunPath("dag", "run2", "train", try_number=1).key(layout.OUTCOME),
        "manifest": layout.RunPath("dag", "run3", "train", try_number=1).key(layout.manifest_name("data_directory")),
        "checkpoint manifest": layout.checkpoint_manifest_key(RUN.task.checkpoints, 2),
        "trigger state": f"{layout.TRIGGERS}{'d' * 64}.json",  # an earlier version's dataset trigger record
    }
    for key in records.values():
        store.put_bytes(key, b"garbage \x00\xff not json")
    # a version record cut short after its digest (bit rot, a half copy): the digest is still readable
    store.put_bytes(records["version"], version.model_dump_json().replace('"1.0"', '"1.1"').encode()[:200])
    store.put_bytes(records["env (digest readable)"],
                    f'{{"key": "{"f" * 64}", "blob": {{"sha256": "{salvaged}", "size": 40'.encode())
    return Damaged(store=store, package_blob=version.blob.sha256, orphan=orphan, salvaged=salvaged,
                   damaged_blob=damaged_blob, missing_blob=missing_blob, files=files, records=records,
                   checkpoint_object=object_key)
