"""Stores the UI tests browse: runs of two teams' DAGs, hostile records, and one of each kind of damage.

Built with the product's own writers (registry, records, layout) where a record is meant to be
valid, and with raw bytes where it is meant to be damaged, so the pages meet what a careless
tool or a hostile run could leave in a real store.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

from airflow_aicenter import layout
from airflow_aicenter.records import Manifest, Outcome, RunRef, write
from airflow_aicenter.registry import Registry
from airflow_aicenter.storage import Store

HERE = Path(__file__).resolve().parent
PACKAGE = "uipkg"
#: The readable team's DAG, and the DAG whose runs the test user may not see.
OURS, THEIRS = "team_a", "team_b"
#: Strings only a record of the other team's DAG holds: no page shown to our user may contain them.
SECRETS = ("team-b-secret", "scheduled__1", "scheduled__2", "manual__3", THEIRS)
#: A CSV field larger than the csv module's default limit (128 KiB), inside the preview's first 256 KiB.
BIG_FIELD = 200 * 1024


@dataclass
class TwoTeams:
    """Run ids (``dag/run/task/try``) of the store :func:`two_teams` builds."""

    ours: str  # a run of OURS whose outcome names THEIRS' manifest
    theirs: list[str]
    damaged: dict[str, str] = field(default_factory=dict)  # what is damaged -> the key (see :func:`damage`)


def _outcome(store: Store, run_id: str, **fields: object) -> layout.RunPath:
    path = layout.RunPath.parse(run_id)
    start = time.time() - 60
    outcome = Outcome(status="succeeded", pipeline="train", package=PACKAGE, version="1.0", start_at=start,
                      end_at=start + 30, score=0.5, env={"LR": "0.1"}, **fields)  # type: ignore[arg-type]
    write(store, path.key(layout.OUTCOME), outcome)
    return path


def _manifest(store: Store, path: layout.RunPath, directory: str, source: str) -> str:
    key = path.key(layout.manifest_name(directory))
    write(store, key, Manifest(source=source, directory=directory, files=[], file_count=7, total_bytes=4242))
    return store.url(key)


def _run_ref(run_id: str) -> RunRef:
    path = layout.RunPath.parse(run_id)
    return RunRef(dag_id=path.dag_id, run_id=path.run_id, task_id=path.task_id, try_number=path.try_number)


def two_teams(store: Store) -> TwoTeams:
    """One package with versions made by both teams' runs; three runs of THEIRS (all try 1) and one of OURS (try 2).

    Our run is hostile: its ``test_data_directory`` snapshot names THEIRS' manifest, and another
    snapshot climbs out of its folder with ``..``. Its artifacts hold CSVs a preview must bound.
    """
    registry = Registry(store)
    first = registry.upload(HERE / "package", PACKAGE, created_by="tests")
    theirs = [f"{THEIRS}/scheduled__1/train/1", f"{THEIRS}/scheduled__2/train/1", f"{THEIRS}/manual__3/train/1"]
    for run_id in theirs:
        secret = _manifest(store, layout.RunPath.parse(run_id), "data_directory", "s3://team-b-secret/data")
        _outcome(store, run_id, snapshots={"data_directory": secret}, dataset="s3://team-b-secret/data")
    ours = f"{OURS}/manual__a/train/2"
    path = layout.RunPath.parse(ours)
    own = _manifest(store, path, "data_directory", "s3://team-a-data/train")
    their_manifest = store.url(layout.RunPath.parse(theirs[0]).key(layout.manifest_name("data_directory")))
    climbing = store.url(path.key("../../../../" + theirs[1] + "/" + layout.manifest_name("data_directory")))
    _outcome(store, ours, dataset="s3://team-a-data/train",
             snapshots={"data_directory": own, "test_data_directory": their_manifest, "extra_directory": climbing})
    artifacts = path.key(layout.ARTIFACTS)
    store.put_bytes(f"{artifacts}/ok.csv", b"a,b\n1,2\n3,4\n")
    store.put_bytes(f"{artifacts}/big.csv", b"a,b\n1," + b"x" * BIG_FIELD + b"\n2,3\n")
    store.put_bytes(f"{artifacts}/wide.csv", (",".join(f"c{i}" for i in range(5000)) + "\n").encode())
    store.put_bytes(f"{artifacts}/notes.txt", b"hello from team a")
    # versions made by each team's runs: the package page names only ours
    registry.commit(PACKAGE, parent="1.0", blob=first.blob, pipeline="train", run=_run_ref(ours), score=0.6,
                    snapshot=own, created_by="team-a-bot")
    registry.commit(PACKAGE, parent="1.0", blob=first.blob, pipeline="train", run=_run_ref(theirs[0]), score=0.7,
                    snapshot=their_manifest, created_by="team-b-bot")
    return TwoTeams(ours, theirs)


def _garbage(store: Store, key: str, data: bytes = b"{ this is not a record") -> str:
    store.put_bytes(key, data)
    return key


def damage(store: Store, scratch: Path, teams: TwoTeams) -> dict[str, str]:
    """One of each kind of damage in the store of :func:`two_teams` (``scratch``: an empty folder of the test's).

    Returns what was damaged -> its key (run ids for damaged runs), also kept in ``teams.damaged``.
    """
    registry = Registry(store)
    first = registry.get(PACKAGE, "1.0")
    # a second package whose blob is damaged (same size, bytes flipped), and the first one's blob missing
    copy = scratch / "otherpkg"
    shutil.copytree(HERE / "package", copy)
    (copy / "notes.md").write_text("another package")
    other = registry.upload(copy, "otherpkg", created_by="tests")
    blob = layout.blob_key(other.blob.sha256)
    data = bytearray(store.get_bytes(blob))
    data[len(data) // 2] ^= 0xFF
    store.put_bytes(blob, bytes(data))
    store.delete(layout.blob_key(first.blob.sha256))
    hexname = hashlib.sha256(b"damage").hexdigest()
    blob_ref = {"package": PACKAGE, "blob": {"sha256": first.blob.sha256, "size": 1}}
    damaged = {
        "blob damaged": blob,
        "blob missing": layout.blob_key(first.blob.sha256),
        "version record": _garbage(store, layout.version_key(PACKAGE, "1.9")),
        "version record of another shape": _garbage(store, layout.version_key(PACKAGE, "1.8"), b'["a", "list"]'),
        "version record naming a run outside the layout": _garbage(store, layout.version_key(PACKAGE, "1.7"), json.dumps({
            **blob_ref, "version": "1.7", "pipeline": "train",
            "run": {"dag_id": OURS, "run_id": f"../../{THEIRS}/scheduled__1", "task_id": "train"}}).encode()),
        "version record with another version": _garbage(store, layout.version_key(PACKAGE, "1.6"),
                                                        json.dumps({**blob_ref, "version": "../x"}).encode()),
        "alias": _garbage(store, layout.alias_key(PACKAGE, "staging", 0)),
        "alias history entry": _garbage(store, layout.alias_key(PACKAGE, "production", 1)),
        "evaluation": _garbage(store, layout.evaluation_key(PACKAGE, "1.0", "broken"), b"[]"),
        "env record": _garbage(store, layout.env_key(hexname)),
        "trigger state": _garbage(store, f"{layout.TRIGGERS}{hexname}.json"),  # an earlier version's trigger state
        "snapshot hint": _garbage(store, layout.snapshot_hint_key("s3://team-a-data/train")),
    }
    registry.set_alias(PACKAGE, "production", "1.0", set_by="tests", reason="first")  # entry 0; entry 1 is garbage
    # runs of OURS with damaged records of their own
    bad_outcome = f"{OURS}/manual__bad_outcome/train/1"
    _garbage(store, layout.RunPath.parse(bad_outcome).key(layout.OUTCOME))
    damaged["outcome"] = bad_outcome
    for name, results in (("results_garbage", b"{"), ("results_list", b"[1, 2]"),
                          ("results_shapes", b'{"parameters": [1], "run_summary": "x", "aicenter": {"promotion": 5}}')):
        run_id = f"{OURS}/manual__{name}/train/1"
        store.put_bytes(_outcome(store, run_id).key(layout.RESULTS), results)
        damaged[name] = run_id
    run_id = f"{OURS}/manual__bad_manifest/train/1"
    manifest = _garbage(store, layout.RunPath.parse(run_id).key(layout.manifest_name("data_directory")))
    _outcome(store, run_id, snapshots={"data_directory": store.url(manifest)})
    damaged["manifest"] = run_id
    run_id = f"{OURS}/manual__bad_registration/train/1"
    _garbage(store, _outcome(store, run_id).key(layout.REGISTRATION))
    damaged["registration"] = run_id
    teams.damaged = damaged
    return damaged
