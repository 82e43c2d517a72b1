"""Manifest datasets (ModelArts JSON Lines): usage routing, staged layout, errors with line numbers, on both stores."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from airflow_aicenter.errors import DatasetError
from airflow_aicenter.records import Manifest, Outcome, RunSpec, read
from airflow_aicenter.registry import Registry
from airflow_aicenter.runtime.manifest import (
    EVALUATION,
    INFERENCE,
    TRAINING,
    OpenStore,
    check_manifest,
    is_manifest_uri,
    stage_inference,
    stage_manifest,
)
from airflow_aicenter.runtime.snapshot import take_snapshot
from airflow_aicenter.storage import S3Store, Store, open_store
from tests.conftest import RuntimeSpawner, write_files
from tests.packages import MAIN
from tests.runtime.helpers import put


def opener(store: Store) -> OpenStore:
    """Opens source folders the way the runtime does: existing ones only, with the store's S3 options."""
    if isinstance(store, S3Store):
        return lambda uri: open_store(uri, store.options, create=False)
    return lambda uri: open_store(uri, create=False)


def outside_local(store: Store, key: str) -> str:
    """Where a source outside the manifest's folder is staged: <bucket>/<key>, or the path without its '/'."""
    url = store.url(key)
    return url.removeprefix("s3://") if url.startswith("s3://") else url.removeprefix("file:///")


def test_training_lines_are_staged_with_a_rewritten_manifest(dataset: tuple[Store, str], tmp_path: Path) -> None:
    store, uri = dataset
    entries = stage_manifest(uri, TRAINING, tmp_path / "data", opener(store))
    c_local = outside_local(store, "other/c.jpg")
    assert sorted(e.path for e in entries) == sorted(["images/a.jpg", "images/b.jpg", c_local, "manifest.jsonl"])
    assert (tmp_path / "data" / c_local).read_text() == "CCC"
    staged = [json.loads(line) for line in (tmp_path / "data" / "manifest.jsonl").read_text().splitlines()]
    assert [(s["id"], s["source"]) for s in staged] == [("1", "images/a.jpg"), ("2", "images/b.jpg"), ("3", c_local)]
    assert staged[0]["annotation"] == [{"name": "cat", "type": "label"}] and staged[2]["usage"] == "train"
    for line in staged:  # every rewritten source is a file beside the manifest
        assert (tmp_path / "data" / line["source"]).is_file()
    assert sorted(p.relative_to(tmp_path / "data").as_posix() for p in (tmp_path / "data").rglob("*") if p.is_file()) == \
        sorted(e.path for e in entries)


def test_evaluation_and_inference_lines_go_to_their_own_folders(dataset: tuple[Store, str], tmp_path: Path) -> None:
    store, uri = dataset
    evaluation = stage_manifest(uri, EVALUATION, tmp_path / "test", opener(store))
    assert [e.path for e in evaluation] == ["e.jpg", "images/d.jpg", "manifest.jsonl"]
    assert [json.loads(x)["id"] for x in (tmp_path / "test" / "manifest.jsonl").read_text().splitlines()] == ["4", "5"]
    inference = stage_inference(uri, tmp_path / "inbox", opener(store))
    assert [(e.path, e.size) for e in inference] == [("f.jpg", 6)]
    assert sorted(p.name for p in (tmp_path / "inbox").iterdir()) == ["f.jpg"]  # no manifest.jsonl among inputs


def test_check_manifest_summarises_before_compute(dataset: tuple[Store, str]) -> None:
    store, uri = dataset
    summary = check_manifest(uri, opener(store))
    assert (summary.lines, summary.files, summary.bytes) == (6, 6, 1 + 2 + 3 + 4 + 5 + 6)
    assert summary.usages == {"TRAIN": 2, "": 1, "EVAL": 1, "TEST": 1, "INFERENCE": 1}
    assert summary.count(TRAINING) == 3 and summary.count(EVALUATION) == 2
    folder = uri.rsplit("/", 1)[0]
    assert summary.folders == sorted([folder, f"{folder}/images", store.url("other")])


def test_a_snapshot_records_the_manifest_and_every_staged_file(dataset: tuple[Store, str], tmp_path: Path) -> None:
    store, uri = dataset
    entries = stage_manifest(uri, TRAINING, tmp_path / "data", opener(store))
    take_snapshot(store, tmp_path / "data", entries, source=uri, directory="data_directory", key="snap.json", log=print)
    manifest = read(store, "snap.json", Manifest)
    assert manifest.source == uri and len(manifest.files) == 4
    assert "manifest.jsonl" in {f.path for f in manifest.files}


@pytest.mark.parametrize("line, problem", [
    ("{not json", "line 2 of manifest .*: not JSON"),
    ('["images/a.jpg"]', "line 2 of manifest .*: a JSON list, not an object"),
    ('{"usage": "TRAIN"}', 'line 2 of manifest .*: no "source"'),
    ('{"source": ""}', 'line 2 of manifest .*: no "source"'),
    ('{"source": "images/a.jpg", "usage": "VALIDATION"}', "line 2 .*usage 'VALIDATION' is not one of TRAIN, EVAL, TEST"),
    ('{"source": "images/missing.jpg"}', "line 2 .*source .*images/missing.jpg does not exist"),
    ('{"source": "../../etc/passwd"}', "line 2 .*leaves the manifest's folder"),
    ('{"source": "http://example.com/a.jpg"}', "line 2 .*is not supported; use an s3:// or file:// URI"),
    ('{"source": "manifest.jsonl"}', "line 2 .*would be staged as manifest.jsonl"),
])
def test_a_bad_line_is_an_error_naming_its_number(store: Store, tmp_path: Path, line: str, problem: str) -> None:
    put(store, {"m/images/a.jpg": "A", "m/data.jsonl": '{"source": "images/a.jpg"}\n' + line + "\n"})
    uri = store.url("m/data.jsonl")
    with pytest.raises(DatasetError, match=problem):
        check_manifest(uri, opener(store))
    with pytest.raises(DatasetError, match=problem):  # and staging says the same
        stage_manifest(uri, TRAINING, tmp_path / "data", opener(store))


def test_two_sources_staged_at_one_path_are_refused(store: Store) -> None:
    clash = outside_local(store, "x/a.jpg")  # a relative path equal to where an outside source is staged
    put(store, {"m/data.jsonl": json.dumps({"source": clash}) + "\n" + json.dumps({"source": store.url("x/a.jpg")}) + "\n"})
    with pytest.raises(DatasetError, match=f"line 2 .*would be staged at '{clash}', where line 1 puts"):
        check_manifest(store.url("m/data.jsonl"), opener(store))


def test_check_manifest_requires_lines_for_the_step(dataset: tuple[Store, str], store: Store) -> None:
    _, uri = dataset
    assert check_manifest(uri, opener(store), require=INFERENCE).count(INFERENCE) == 1
    put(store, {"m/a.jpg": "A", "m/eval-only.jsonl": '{"source": "a.jpg", "usage": "EVAL"}\n'})
    with pytest.raises(DatasetError, match=r"eval-only\.jsonl has no TRAIN or unmarked lines; mark the samples"):
        check_manifest(store.url("m/eval-only.jsonl"), opener(store), require=TRAINING)


def test_missing_or_empty_manifests_and_steps_without_lines(store: Store, tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match=r"manifest .*nope\.jsonl does not exist"):
        check_manifest(store.url("m/nope.jsonl"), opener(store))
    put(store, {"m/empty.jsonl": "\n\n", "m/a.jpg": "A", "m/only-train.jsonl": '{"source": "a.jpg"}\n'})
    with pytest.raises(DatasetError, match="has no sample lines"):
        check_manifest(store.url("m/empty.jsonl"), opener(store))
    with pytest.raises(DatasetError, match="has no EVAL or TEST lines"):
        stage_manifest(store.url("m/only-train.jsonl"), EVALUATION, tmp_path / "t", opener(store))


def test_sources_on_s3_from_a_manifest_on_a_file_store(s3_server, tmp_path: Path) -> None:
    bucket = s3_server.create_bucket()
    s3 = open_store(f"s3://{bucket}", s3_server.options)
    s3.put_bytes("raw/x.bin", b"xyz")
    local = tmp_path / "ds"
    local.mkdir()
    (local / "y.bin").write_bytes(b"yy")
    (local / "data.jsonl").write_text(f'{{"source": "s3://{bucket}/raw/x.bin"}}\n{{"source": "y.bin", "usage": "TRAIN"}}\n')

    def open_any(uri: str) -> Store:
        return open_store(uri, s3_server.options, create=False)

    entries = stage_manifest((local / "data.jsonl").as_uri(), TRAINING, tmp_path / "data", open_any)
    assert [e.path for e in entries] == [f"{bucket}/raw/x.bin", "manifest.jsonl", "y.bin"]
    assert (tmp_path / "data" / bucket / "raw" / "x.bin").read_bytes() == b"xyz"


def test_manifest_uris_are_recognised() -> None:
    assert is_manifest_uri("s3://b/d/train.manifest") and is_manifest_uri("file:///d/x.jsonl")
    assert not is_manifest_uri("s3://b/datasets/churn/") and not is_manifest_uri(None)


# -- end to end: the runtime as the launchers start it -----------------------------------------
RECORDING_FULL = '''
import json, os, shutil

def _files(folder):
    return sorted(os.path.relpath(os.path.join(r, f), folder) for r, _, fs in os.walk(folder) for f in fs)

def _record(name, value):
    with open(os.path.join(os.environ["artifacts_directory"], name + ".json"), "w") as fh:
        json.dump(value, fh)

class Main:
    def __init__(self):
        pass
    def process_data(self, input_directory):
        _record("process_data", _files(input_directory))
        shutil.copytree(input_directory, os.environ["training_data_directory"], dirs_exist_ok=True)
    def train(self, training_directory):
        _record("train", _files(training_directory))
        with open(os.path.join(training_directory, "manifest.jsonl")) as fh:
            for line in fh:  # every staged source is readable beside the manifest
                open(os.path.join(training_directory, json.loads(line)["source"])).read()
    def evaluate(self, evaluation_directory):
        _record("evaluate", _files(evaluation_directory))
        return 0.5
    def save(self):
        open("model.txt", "w").write("m")
'''


def run_runtime(store: Store, tmp_path: Path, env: dict[str, str], **fields: Any) -> tuple[Outcome, str, int]:
    registry = Registry(store)
    pkg = write_files(tmp_path / "pkg", {"main.py": MAIN, "train.py": RECORDING_FULL, "requirements.txt": ""})
    base = registry.upload(pkg, "man")
    spec = RunSpec(storage=store.uri, run_prefix="runs/d/r/t/1", package="man", version=base.version, blob=base.blob,
                   **fields)
    done = RuntimeSpawner(tmp_path / "runtime-specs").run(spec, env)
    return read(store, "runs/d/r/t/1/outcome.json", Outcome), done.stderr, done.returncode


def recorded(store: Store, name: str) -> list[str]:
    return json.loads(store.get_bytes(f"runs/d/r/t/1/artifacts/{name}.json"))


def test_a_full_run_on_a_manifest_routes_lines_by_usage(dataset: tuple[Store, str], tmp_path: Path, request) -> None:
    store, uri = dataset
    env = request.getfixturevalue("s3_env").env() if store.uri.startswith("s3://") else {}
    outcome, err, code = run_runtime(store, tmp_path, env, pipeline="full", dataset=uri, save_training_data=True,
                                     save_test_data=True)
    assert code == 0 and outcome.status == "succeeded", err
    c_local = outside_local(store, "other/c.jpg")
    assert recorded(store, "process_data") == sorted(["images/a.jpg", "images/b.jpg", c_local, "manifest.jsonl"])
    assert recorded(store, "evaluate") == ["e.jpg", "images/d.jpg", "manifest.jsonl"]  # EVAL + TEST lines
    assert outcome.score == 0.5
    training = read(store, "runs/d/r/t/1/data_directory.manifest.json", Manifest)
    assert training.source == uri and "manifest.jsonl" in {f.path for f in training.files} and len(training.files) == 4
    evaluation = read(store, "runs/d/r/t/1/test_data_directory.manifest.json", Manifest)
    assert sorted(f.path for f in evaluation.files) == ["e.jpg", "images/d.jpg", "manifest.jsonl"]


def test_an_evaluation_run_on_a_manifest_uses_its_eval_and_test_lines(dataset: tuple[Store, str], tmp_path: Path,
                                                                     request) -> None:
    store, uri = dataset
    env = request.getfixturevalue("s3_env").env() if store.uri.startswith("s3://") else {}
    outcome, err, code = run_runtime(store, tmp_path, env, pipeline="evaluate", evaluation_dataset=uri)
    assert code == 0 and outcome.status == "succeeded", err
    assert recorded(store, "evaluate") == ["e.jpg", "images/d.jpg", "manifest.jsonl"]


def test_a_bad_manifest_line_fails_the_run_before_user_code(store: Store, tmp_path: Path, request) -> None:
    env = request.getfixturevalue("s3_env").env() if store.uri.startswith("s3://") else {}
    put(store, {"m/a.jpg": "A", "m/data.jsonl": '{"source": "a.jpg"}\n{"source": "b.jpg"}\n'})
    outcome, err, code = run_runtime(store, tmp_path, env, pipeline="train", dataset=store.url("m/data.jsonl"))
    assert code == 1 and outcome.status == "failed" and outcome.phase == "stage_data", err
    assert outcome.error is not None and outcome.error.startswith("line 2 of manifest")
    assert "b.jpg does not exist" in outcome.error


SIZES = '''
class Main:
    def __init__(self):
        pass
    def predict(self, input):
        return {"size": len(input)}
'''


def test_batch_prediction_on_a_manifest_reads_only_its_inference_lines(dataset: tuple[Store, str], tmp_path: Path,
                                                                       request, spawn_runtime: RuntimeSpawner) -> None:
    store, uri = dataset
    env = request.getfixturevalue("s3_env").env() if store.uri.startswith("s3://") else {}
    base = Registry(store).upload(write_files(tmp_path / "serving", {"main.py": SIZES, "requirements.txt": ""}), "sizes")
    spec = RunSpec(pipeline="predict", storage=store.uri, run_prefix="runs/d/r/p/1", package="sizes", version=base.version,
                   blob=base.blob, dataset=uri, input_type="file")
    done = spawn_runtime.run(spec, env)
    assert done.returncode == 0, done.stderr
    outcome = read(store, "runs/d/r/p/1/outcome.json", Outcome)
    assert (outcome.predicted, outcome.failed) == (1, 0)  # f.jpg alone: no training, evaluation or manifest file
    assert [i.key.rsplit("/", 1)[-1] for i in store.list("runs/d/r/p/1/predictions/")] == ["f.jpg.json"]


def test_many_sources_in_one_folder_are_checked_by_listing(store: Store) -> None:
    sources = {f"m/img/{i}.jpg": "x" * i for i in range(40)}
    lines = [json.dumps({"source": f"img/{i}.jpg"}) for i in range(40)] + [json.dumps({"source": "img/gone.jpg"})]
    put(store, {**sources, "m/img/unrelated.txt": "u", "m/data.jsonl": "\n".join(lines)})
    heads: list[str] = []

    class Counting:
        """The real store, with its HEADs counted."""

        def __init__(self, inner: Store) -> None:
            self.inner = inner

        async def head_async(self, key: str) -> Any:
            heads.append(key)
            return await self.inner.head_async(key)

        def __getattr__(self, name: str) -> Any:
            return getattr(self.inner, name)

    def counting(uri: str) -> Store:
        return Counting(opener(store)(uri))  # type: ignore[return-value]

    with pytest.raises(DatasetError, match=r"line 41 of manifest .*img/gone\.jpg does not exist"):
        check_manifest(store.url("m/data.jsonl"), counting)
    assert heads == ["img/gone.jpg"]  # the 40 others were seen in one listing
    put(store, {"m/img/gone.jpg": "back"})
    heads.clear()
    summary = check_manifest(store.url("m/data.jsonl"), counting)
    assert (summary.files, summary.bytes, heads) == (41, sum(range(40)) + 4, [])
