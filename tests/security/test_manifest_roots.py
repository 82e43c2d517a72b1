"""Issue 18, finding 8: ``allowed_dataset_roots`` holds for every source a manifest names.

A manifest inside an allowed root could name ``file:///etc/hostname``, a file in a folder
outside the root, or a relative path through a link that leaves the root: each was staged
and snapshotted. Every ``file://`` source is now checked against the roots, links resolved,
by the operator before compute and again by the runtime before it reads the file, with the
manifest's line number in the error.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from airflow_aicenter.errors import ConfigurationError, DatasetError
from airflow_aicenter.records import Outcome, RunSpec, read
from airflow_aicenter.registry import Registry
from airflow_aicenter.runtime.manifest import TRAINING, check_manifest, stage_manifest
from airflow_aicenter.storage import open_store
from tests.aicenter_helpers import upload_package
from tests.conftest import write_files
from tests.operators.kube_api import make_context
from tests.packages import COUNTING_TRAIN as TRAIN
from tests.runtime.test_run import run_runtime


def roots_layout(tmp_path: Path) -> tuple[Path, Path]:
    """``allowed/`` (the deployment's root, a manifest folder with one good file) and ``elsewhere/``."""
    allowed = write_files(tmp_path / "allowed", {"m/rows.csv": "x\n1\n"})
    outside = write_files(tmp_path / "elsewhere", {"secret.csv": "password\nhunter2\n"})
    (allowed / "m" / "escape").symlink_to(outside, target_is_directory=True)
    (allowed / "m" / "link.csv").symlink_to(outside / "secret.csv")
    return allowed, outside


def bad_sources(outside: Path) -> dict[str, str]:
    return {
        "an absolute file outside": "file:///etc/hostname",
        "a file in a folder outside": (outside / "secret.csv").as_uri(),
        "a relative path through a folder link": "escape/secret.csv",
        "a relative link to a file outside": "link.csv",
    }


def write_manifest(folder: Path, source: str) -> str:
    lines = [{"source": "rows.csv"}, {"source": source, "usage": "TRAIN"}]
    (folder / "train.manifest").write_text("".join(json.dumps(line) + "\n" for line in lines))
    return (folder / "train.manifest").as_uri()


def test_check_and_stage_refuse_sources_outside_the_roots(tmp_path: Path) -> None:
    allowed, outside = roots_layout(tmp_path)
    for what, source in bad_sources(outside).items():
        uri = write_manifest(allowed / "m", source)
        with pytest.raises(ConfigurationError, match=r"line 2 of manifest .*outside the folders this deployment allows"):
            check_manifest(uri, lambda u: open_store(u, create=False), roots=[str(allowed)])
        with pytest.raises(ConfigurationError, match=r"line 2 of manifest .*allowed_dataset_roots"):
            stage_manifest(uri, TRAINING, tmp_path / "staged" / what, roots=[str(allowed)])
        assert not (tmp_path / "staged" / what / "manifest.jsonl").exists(), what
    uri = write_manifest(allowed / "m", "../../elsewhere/secret.csv")  # `..` out of the manifest's folder
    with pytest.raises(DatasetError, match=r"line 2 of manifest .*leaves the manifest's folder"):
        check_manifest(uri, lambda u: open_store(u, create=False), roots=[str(allowed)])
    uri = write_manifest(allowed / "m", (allowed / "m" / "rows.csv").as_uri())  # inside: fine
    assert check_manifest(uri, lambda u: open_store(u, create=False), roots=[str(allowed)]).files == 1
    entries = stage_manifest(uri, TRAINING, tmp_path / "staged" / "fine", roots=[str(allowed)])
    assert [e.path for e in entries] == ["manifest.jsonl", "rows.csv"]


def test_the_operator_refuses_a_manifest_naming_files_outside_the_roots(tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    uri = (tmp_path / "aicenter").as_uri()
    allowed, outside = roots_layout(tmp_path)
    monkeypatch.setenv("AIRFLOW_CONN_AICENTER_DEFAULT", json.dumps(
        {"conn_type": "aicenter", "extra": {"storage": uri, "allowed_dataset_roots": str(allowed)}}))
    registry = Registry(open_store(uri))
    upload_package(registry, tmp_path, "rows", TRAIN)
    from airflow_aicenter.operators import TrainPipelineOperator

    for source in bad_sources(outside).values():
        manifest = write_manifest(allowed / "m", source)
        with pytest.raises(ConfigurationError, match="line 2 of manifest"):
            TrainPipelineOperator(task_id="train", package="rows", dataset=manifest).execute(make_context())
    assert not any("secret.csv" in info.key or "hostname" in info.key for info in registry.store.list(""))


def test_the_runtime_checks_the_sources_again(tmp_path: Path) -> None:
    """A spec that reaches the runtime (a changed manifest, a link swapped after the check) is checked again."""
    store = open_store((tmp_path / "store").as_uri())
    allowed, outside = roots_layout(tmp_path)
    registry = Registry(store)
    pkg = write_files(tmp_path / "pkg", {"main.py": "class Main:\n    def __init__(self):\n        pass\n"
                                                    "    def predict(self, x):\n        return x\n",
                                        "train.py": "class Main:\n    def __init__(self):\n        pass\n"
                                                    "    def train(self, d):\n        pass\n"
                                                    "    def save(self):\n        pass\n",
                                        "requirements.txt": ""})
    base = registry.upload(pkg, "rows")
    for source in bad_sources(outside).values():
        spec = RunSpec(pipeline="train", storage=store.uri, run_prefix="runs/d/r/t/1", package="rows",
                       version=base.version, blob=base.blob, dataset=write_manifest(allowed / "m", source),
                       save_training_data=True, allowed_dataset_roots=[str(allowed)])
        done = run_runtime(spec, tmp_path)
        assert done.returncode == 1, done.stderr
        outcome = read(store, f"{spec.run_prefix}/outcome.json", Outcome)
        assert outcome.status == "failed" and outcome.phase == "stage_data", outcome
        assert "line 2 of manifest" in (outcome.error or "") and "allowed_dataset_roots" in (outcome.error or "")
        assert not outcome.snapshots
        assert not any("secret" in info.key or "hostname" in info.key for info in store.list(""))
