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
from airflow_aicenter.records import Manifest, Outcome, RunRef, Trigger, write
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


def _outcome(store: Store, run_id: str, *, start: float | None = None, end: float | bool | None = True,
             output_tail: list[str] | None = None, **fields: object) -> layout.RunPath:
    """Write a run's outcome.json (succeeded, train, 30 s, score 0.5 unless ``fields`` say otherwise).

    ``output_tail`` is added to the record as the runtime writes it (the last lines of the user's output).
    """
    path = layout.RunPath.parse(run_id)
    start = time.time() - 60 if start is None else start
    values: dict[str, object] = {"status": "succeeded", "pipeline": "train", "package": PACKAGE, "version": "1.0",
                                 "start_at": start, "end_at": start + 30 if end is True else end, "score": 0.5,
                                 "env": {"LR": "0.1"}, **fields}
    outcome = Outcome(**values)  # type: ignore[arg-type]
    data = json.loads(outcome.model_dump_json())
    if output_tail is not None:
        data["output_tail"] = output_tail
    store.put_bytes(path.key(layout.OUTCOME), json.dumps(data, indent=2).encode())
    return path


def _manifest(store: Store, path: layout.RunPath, directory: str, source: str) -> str:
    key = path.key(layout.manifest_name(directory))
    write(store, key, Manifest(source=source, directory=directory, files=[], file_count=7, total_bytes=4242))
    return store.url(key)


def _run_ref(run_id: str, trigger: Trigger | None = None) -> RunRef:
    path = layout.RunPath.parse(run_id)
    return RunRef(dag_id=path.dag_id, run_id=path.run_id, task_id=path.task_id, try_number=path.try_number, trigger=trigger)


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


@dataclass
class EveryKind:
    """Run ids of the store :func:`runs_of_every_kind` builds (all of OURS but ``theirs``)."""

    train: str  # succeeded, resolved 1.4 from "latest", triggered by a person, progress and resources with cost
    failed: str  # failed in user_code, with the last lines of the user's output
    evaluate: str  # succeeded, scored 1.0 (an evaluation record)
    predict: str  # succeeded, with predictions
    running: str  # still running, reporting progress
    theirs: str  # a failed run of THEIRS


OUTPUT_TAIL = ["epoch 1 loss=0.9", "epoch 2 loss=0.7", "Traceback (most recent call last):",
               '  File "train.py", line 12, in train', "ValueError: <b>column 'age' is missing</b>"]


def _results(store: Store, path: layout.RunPath, pipeline: str, inputs: dict[str, str], outputs: dict[str, object],
              start: float) -> None:
    results = {"parameters": {"pipeline": f"{path.dag_id}.{path.task_id}", "inputs": {"package": PACKAGE, "version": "1.4",
                                                                                      **inputs, "gpu": "False"},
                              "env": {"EPOCHS": "3", "API_TOKEN": "***"}},
               "run_summary": {"execution_time": 0.8, "start_at": int(start), "end_at": int(start) + 1,
                               "outputs": {"package": PACKAGE, "version": "1.4", **outputs}}}
    store.put_bytes(path.key(layout.RESULTS), json.dumps(results).encode())


def runs_of_every_kind(store: Store) -> EveryKind:
    """One package (versions 1.0 .. 1.4) and a run of every pipeline and status, written as the product writes them."""
    from airflow_aicenter.records import EvaluationRecord, Progress

    registry = Registry(store)
    first = registry.upload(HERE / "package", PACKAGE, created_by="cli:ops")
    now = time.time()
    person = Trigger(by="ada", run_type="manual", user="ada")
    kinds = EveryKind(train=f"{OURS}/manual__ada/train/1", failed=f"{OURS}/manual__ada/broken/1",
                      evaluate=f"{OURS}/scheduled__e/evaluate/1", predict=f"{OURS}/scheduled__p/predict/1",
                      running=f"{OURS}/manual__live/train/1", theirs=f"{THEIRS}/scheduled__1/broken/1")
    resources = {"wall_seconds": 0.8, "cpu_seconds": 0.6, "peak_memory_bytes": 52_428_800, "gpu_seconds": 0.0,
                 "gpu_utilization": None, "gpu_memory_peak_bytes": None, "bytes_staged": 2048, "bytes_uploaded": 4096}
    cost = {"cpu": 0.01, "gpu": 0.0, "memory": 0.0023, "total": 0.0123, "prices": {"cpu_hour": 0.04, "gib_hour": 0.005}}
    # train: resolved "latest" to 1.3 and made 1.4
    for score in (0.7, 0.75, 0.72):  # 1.1 .. 1.3, scored by the runs that made them
        registry.commit(PACKAGE, parent="1.0", blob=first.blob, pipeline="train", score=score, created_by="cli:ops")
    path = _outcome(store, kinds.train, version="1.3", requested_version="latest", trigger=person, score=None,
                    resources=resources, cost=cost, start=now - 500)
    _results(store, path, "train", {"train_data": "s3://team-a-data/train"}, {"version": "1.4"}, now - 500)
    registry.commit(PACKAGE, parent="1.3", blob=first.blob, pipeline="train", run=_run_ref(kinds.train, person),
                    snapshot=store.url(path.key(layout.manifest_name("data_directory"))), created_by="ada",
                    resources=resources, cost=cost)
    write(store, path.key(layout.PROGRESS), Progress(step=3, total=3, percent=100.0, metrics={"loss": 0.31}, reports=3,
                                                     points=3, started_at=now - 499, updated_at=now - 490, final=True))
    store.put_bytes(path.key(layout.METRICS), "".join(
        json.dumps({"time": now - 499 + i, "step": i + 1, "metrics": {"loss": 0.9 - 0.3 * i, "accuracy": 0.6 + 0.1 * i}}) + "\n"
        for i in range(3)).encode())
    store.put_bytes(path.key(f"{layout.ARTIFACTS}/report.md"), b"# Report\n\nAccuracy **0.88**.\n\n<script>alert(1)</script>\n\n"
                    b"[click](javascript:alert(2)) and [docs](https://example.com/docs)\n")
    store.put_bytes(path.key(f"{layout.ARTIFACTS}/loss.svg"), b'<svg xmlns="http://www.w3.org/2000/svg" width="40" height="20">'
                    b'<script>alert(3)</script><rect width="40" height="20" fill="red"/></svg>')
    # failed, with the last lines of the user's output
    _outcome(store, kinds.failed, status="failed", phase="user_code", error="ValueError: column 'age' is missing",
             score=None, trigger=person, start=now - 400, output_tail=OUTPUT_TAIL)
    # evaluate: scored 1.4 on held-out data
    path = _outcome(store, kinds.evaluate, pipeline="evaluate", version="1.4", requested_version="production",
                    score=0.8, dataset=None, evaluation_dataset="s3://team-a-data/holdout",
                    trigger=Trigger(by="schedule", run_type="scheduled"), start=now - 300)
    _results(store, path, "evaluate", {"evaluation_data": "s3://team-a-data/holdout"}, {"score": 0.8}, now - 300)
    write(store, layout.evaluation_key(PACKAGE, "1.4", "e1"), EvaluationRecord(
        package=PACKAGE, version="1.4", score=0.8, dataset="s3://team-a-data/holdout", run=_run_ref(kinds.evaluate)))
    # predict: two outputs and an error
    path = _outcome(store, kinds.predict, pipeline="predict", version="1.4", score=None, dataset="s3://team-a-data/inbox",
                    predicted=2, failed=1, start=now - 200)
    _results(store, path, "predict", {"inference_data": "s3://team-a-data/inbox"},
             {"predictions_data": store.url(path.key(layout.PREDICTIONS)), "predicted": 2, "failed": 1}, now - 200)
    store.put_bytes(path.key(f"{layout.PREDICTIONS}/batch.jsonl"), b'{"line": 0, "output": {"churn": 0.91}}\n'
                    b'{"line": 1, "output": {"churn": 0.12}}\n{"line": 2, "error": "ValueError: bad input"}\n')
    # running: progress reported so far
    path = _outcome(store, kinds.running, status="running", phase="user_code", score=None, end=None, start=now - 60)
    write(store, path.key(layout.PROGRESS), Progress(step=40, total=100, percent=40.0, eta_seconds=90, metrics={"loss": 0.5},
                                                     reports=4, points=4, started_at=now - 59, updated_at=now - 5))
    store.put_bytes(path.key(layout.METRICS), "".join(
        json.dumps({"time": now - 59 + i, "step": 10 * (i + 1), "metrics": {"loss": 0.9 - 0.1 * i}}) + "\n"
        for i in range(4)).encode())
    # a run of THEIRS
    _outcome(store, kinds.theirs, status="failed", error="team-b-secret failure", start=now - 100,
             output_tail=["team-b-secret output"])
    return kinds
