"""Empty files are content: ``_SUCCESS`` markers and ``__init__.py`` files survive every copy.

Mutation testing found that a snapshot manifest dropping empty files passed every test. Here a
real runtime run (both stores) stages a dataset with empty files, the package sees them, the
snapshot manifest lists them, and the new package version keeps the empty files ``save()`` left.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from airflow_aicenter.records import Manifest, Outcome, RunRef, RunSpec, read
from airflow_aicenter.registry import Registry
from airflow_aicenter.storage import Store
from airflow_aicenter.storage.transfer import read_package_contents, run, upload_tree
from tests.conftest import write_files
from tests.packages import MAIN, write_package
from tests.resilience.support import run_runtime

EMPTY_SHA256 = hashlib.sha256(b"").hexdigest()

#: Fails the run unless the staged data has its empty files; save() leaves empty files in the package.
TRAIN = '''
import os

class Main:
    def __init__(self):
        pass
    def train(self, training_directory):
        for rel in ("_SUCCESS", "part/__init__.py", "part/rows.csv"):
            if not os.path.isfile(os.path.join(training_directory, rel)):
                raise SystemExit(f"{rel} was not staged")
    def save(self):
        os.makedirs("model", exist_ok=True)
        open("model/__init__.py", "w").close()
        open("model/_SUCCESS", "w").close()
        with open("model/weights.txt", "w") as fh:
            fh.write("trained")
'''


def test_empty_files_survive_staging_snapshot_and_the_new_version(
    deployment: tuple[Store, dict[str, str]], tmp_path: Path,
) -> None:
    store, env = deployment
    registry = Registry(store)
    base = registry.upload(write_package(tmp_path / "pkg", main=MAIN, train=TRAIN, files={"lib/__init__.py": ""}), "empty")
    data = write_files(tmp_path / "data", {"_SUCCESS": "", "part/__init__.py": "", "part/rows.csv": "x\n1\n"})
    run(upload_tree(data, store, "datasets/empty"))
    ref = RunRef(dag_id="d", run_id="r", task_id="train")
    spec = RunSpec(pipeline="train", storage=store.uri, run_prefix=ref.prefix, package="empty", version="1.0",
                   blob=base.blob, dataset=store.url("datasets/empty"), save_training_data=True)
    done = run_runtime(spec, tmp_path, env)
    assert done.returncode == 0, done.stderr[-3000:]

    manifest = read(store, ref.key("data_directory.manifest.json"), Manifest)
    sizes = {entry.path: (entry.size, entry.sha256) for entry in manifest.files}
    assert sorted(sizes) == ["_SUCCESS", "part/__init__.py", "part/rows.csv"]
    assert sizes["_SUCCESS"] == (0, EMPTY_SHA256) and sizes["part/__init__.py"] == (0, EMPTY_SHA256)
    assert manifest.file_count == 3

    outcome = read(store, ref.key("outcome.json"), Outcome)
    assert outcome.blob is not None
    infos = {f.path: f.size for f in read_package_contents(store, outcome.blob)[0].files}  # a per-file version
    assert infos["lib/__init__.py"] == 0 and infos["model/__init__.py"] == 0 and infos["model/_SUCCESS"] == 0
    assert infos["model/weights.txt"] == len("trained")
