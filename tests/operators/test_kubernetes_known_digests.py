"""A training in a pod stores its package folder without hashing the files it never touched (issue 25).

In a pod, ``stage`` and ``sync`` are different containers: what stage placed (each file's digest,
verified as it was fetched, by inode with its size, modification and change time) reaches sync
through the agent's state volume, which the user container does not mount. A file package code
rewrote, even with its modification time put back, is hashed again: the version records its
new bytes.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from airflow_aicenter.layout import blob_key
from airflow_aicenter.operators import TrainPipelineOperator
from airflow_aicenter.package.contents import decode
from airflow_aicenter.registry import Registry
from tests.aicenter_helpers import FAST
from tests.conftest import write_files
from tests.operators.kube_api import FakeKubernetes, make_context
from tests.packages import ECHO_MAIN, SAVES_WITHOUT_TOUCHING

WEIGHTS = os.urandom(3 * 2**20)
#: Rewrites weights.bin in place and puts its modification time back: only the change time tells.
REWRITES = '''
import os
class Main:
    def __init__(self):
        pass
    def train(self, training_directory):
        pass
    def save(self):
        st = os.stat("weights.bin")
        os.chmod("weights.bin", 0o644)
        with open("weights.bin", "r+b") as fh:
            fh.write(b"fine-tuned")
        os.utime("weights.bin", ns=(st.st_atime_ns, st.st_mtime_ns))
        os.chmod("weights.bin", st.st_mode & 0o777)
'''


def train(kube: FakeKubernetes, registry: Registry, tmp_path: Path, code: str) -> tuple[dict[str, str], list[str]]:
    """Upload ``code`` with weights.bin, train it in a pod: (the new version's files by path -> digest, sync's log)."""
    registry.upload(write_files(tmp_path / "pkg", {"main.py": ECHO_MAIN, "train.py": code, "requirements.txt": "",
                                                   "weights.bin": WEIGHTS}), "rows")
    op = TrainPipelineOperator(task_id="train", package="rows", version="1.0", dataset=(tmp_path / "data").as_uri(), **FAST)
    result = op.execute(make_context())
    [pod] = kube.all_pods()
    record = registry.get("rows", result["version"])
    assert record.blob.kind == "files"
    contents = decode(registry.store.get_bytes(blob_key(record.blob.sha256)), where=record.blob.sha256)
    return {f.path: f.sha256 for f in contents.files}, [line for _, container, line in pod.log if container == "sync"]


def test_sync_does_not_hash_the_files_stage_placed_and_no_one_touched(kube_deployment, kube_api, tmp_path):
    registry, _ = kube_deployment
    files, sync_log = train(kube_api, registry, tmp_path, SAVES_WITHOUT_TOUCHING)
    assert files["weights.bin"] == hashlib.sha256(WEIGHTS).hexdigest()
    assert files["model.txt"] == hashlib.sha256(b"trained").hexdigest()
    [spared] = [line for line in sync_log if "untouched since staging" in line]
    assert "4 package files (3.0 MB) untouched since staging: not read again" in spared, spared  # weights.bin among them


def test_a_file_rewritten_with_its_mtime_put_back_is_hashed_again(kube_deployment, kube_api, tmp_path):
    registry, _ = kube_deployment
    files, sync_log = train(kube_api, registry, tmp_path, REWRITES)
    rewritten = b"fine-tuned" + WEIGHTS[len(b"fine-tuned"):]
    assert files["weights.bin"] == hashlib.sha256(rewritten).hexdigest(), "the version records the bytes package code left"
    [spared] = [line for line in sync_log if "untouched since staging" in line]
    assert "3 package files (" in spared and " MB)" not in spared, spared  # main.py, train.py, requirements.txt
