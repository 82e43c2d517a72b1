"""The node's blob cache for pods (connection extra ``blob_cache``), against the test API server.

Two runs of a per-file version on the fake cluster: the second stages every package file from
the node's folder (0 bytes from the store); the hostPath is mounted in ``stage`` alone (the pod
is validated against the schemas by the server); an entry forged in the node's folder (the
right name and seal, other bytes) is refetched, never staged.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path
from typing import Any

import pytest

from airflow_aicenter.errors import ConfigurationError, StorageError
from airflow_aicenter.layout import blob_key
from airflow_aicenter.operators import TrainPipelineOperator
from airflow_aicenter.package.contents import decode
from airflow_aicenter.registry import Registry
from airflow_aicenter.storage.cache import SEALED_MODE, SEALED_MTIME_NS, BlobCache, runtime_cache
from tests.aicenter_helpers import FAST
from tests.conftest import write_files
from tests.operators.conftest import ddp_full_op
from tests.operators.kube_api import FakeKubernetes, make_context
from tests.packages import ECHO_MAIN

WEIGHTS = os.urandom(3 * 2**20)
TRAIN = '''
import hashlib
class Main:
    def __init__(self):
        pass
    def train(self, training_directory):
        self.digest = hashlib.sha256(open("weights.bin", "rb").read()).hexdigest()
    def save(self):
        open("model.txt", "w").write(self.digest)
'''


def use_blob_cache(monkeypatch: pytest.MonkeyPatch, registry: Registry, blob_cache: Any) -> None:
    """The fake cluster's aicenter connection, with the ``blob_cache`` extra."""
    extra = {"storage": registry.store.uri, "launcher": "kubernetes", "image": "aicenter-runtime:test",
             "blob_cache": blob_cache}
    monkeypatch.setenv("AIRFLOW_CONN_AICENTER_DEFAULT", json.dumps({"conn_type": "aicenter", "extra": extra}))


def train_once(kube: FakeKubernetes, dataset: str, try_number: int) -> tuple[dict[str, Any], list[str]]:
    """One training of rows 1.0 in a pod, in a DAG run of its own (``try_number`` picks the day); (the result, stage's log)."""
    seen = {p.key for p in kube.all_pods()}
    op = TrainPipelineOperator(task_id="train", package="rows", version="1.0", dataset=dataset, **FAST)
    result = op.execute(make_context(run_id=f"manual__2026-03-0{try_number}T00:00:00+00:00"))
    [pod] = [p for p in kube.all_pods() if p.key not in seen]
    return result, [line for _, container, line in pod.log if container == "stage"]


def fetched(lines: list[str]) -> str:
    [line] = [line for line in lines if "package staged:" in line]
    found = re.search(r"package staged: (.+?) fetched", line)
    assert found, line
    return found.group(1)


def staged_weights(registry: Registry, version: str) -> str:
    """The digest of weights.bin in ``version`` (a training's package folder, as it was staged)."""
    record = registry.get("rows", version)
    contents = decode(registry.store.get_bytes(blob_key(record.blob.sha256)), where=record.blob.sha256)
    return next(f.sha256 for f in contents.files if f.path == "weights.bin")


def test_a_second_run_on_the_node_fetches_no_package_byte(kube_deployment, kube_api, tmp_path, monkeypatch):
    registry, dataset = kube_deployment
    registry.upload(write_files(tmp_path / "pkg", {"main.py": ECHO_MAIN, "train.py": TRAIN, "requirements.txt": "",
                                                   "weights.bin": WEIGHTS}), "rows")
    node = tmp_path / "node" / "aicenter-blobs"
    use_blob_cache(monkeypatch, registry, {"host_path": str(node)})

    first, first_log = train_once(kube_api, dataset, 1)
    assert fetched(first_log) != "0 B"
    entry = node / "blobs" / "sha256" / hashlib.sha256(WEIGHTS).hexdigest()
    assert entry.read_bytes() == WEIGHTS, "the first run left the file in the node's folder"

    second, second_log = train_once(kube_api, dataset, 2)
    assert fetched(second_log) == "0 B", second_log
    for result in (first, second):
        assert registry.get("rows", result["version"]).blob.kind == "files"
        assert staged_weights(registry, result["version"]) == hashlib.sha256(WEIGHTS).hexdigest()

    # the hostPath: a volume of the pod (the server validated it), mounted in stage alone
    pod = kube_api.all_pods()[-1].obj
    [volume] = [v for v in pod["spec"]["volumes"] if "hostPath" in v]
    assert volume["hostPath"] == {"path": str(node), "type": "DirectoryOrCreate"}
    containers = [*pod["spec"]["initContainers"], *pod["spec"]["containers"]]
    mounted = [c["name"] for c in containers if any(m["name"] == volume["name"] for m in c.get("volumeMounts") or [])]
    assert mounted == ["stage"]
    told = [c["name"] for c in containers if any(e["name"] == "AICENTER_BLOB_CACHE" for e in c.get("env") or [])]
    assert told == ["stage"]


def test_an_entry_forged_in_the_node_folder_is_refetched_not_staged(kube_deployment, kube_api, tmp_path, monkeypatch):
    """Another pod that can write the folder puts other bytes under the blob's name, sealed like ours: refetched."""
    registry, dataset = kube_deployment
    registry.upload(write_files(tmp_path / "pkg", {"main.py": ECHO_MAIN, "train.py": TRAIN, "requirements.txt": "",
                                                   "weights.bin": WEIGHTS}), "rows")
    node = tmp_path / "node-cache"
    use_blob_cache(monkeypatch, registry, {"host_path": str(node)})
    train_once(kube_api, dataset, 1)

    entry = node / "blobs" / "sha256" / hashlib.sha256(WEIGHTS).hexdigest()
    entry.chmod(0o644)
    forged = bytearray(WEIGHTS)
    forged[1000:1016] = b"not the weights!"
    entry.write_bytes(bytes(forged))
    entry.chmod(SEALED_MODE)
    os.utime(entry, ns=(SEALED_MTIME_NS, SEALED_MTIME_NS))

    result, lines = train_once(kube_api, dataset, 2)
    assert fetched(lines) != "0 B", "the forged entry was fetched again from the store"
    assert staged_weights(registry, result["version"]) == hashlib.sha256(WEIGHTS).hexdigest(), "never the forged bytes"
    version_model = registry.get("rows", result["version"])
    assert version_model.blob.kind == "files"
    assert entry.read_bytes() == WEIGHTS, "the node's entry holds the right bytes again"


def test_the_nodes_of_a_job_share_the_node_folder(ddp_deployment, kube_api, tmp_path, monkeypatch):
    """Both nodes of a distributed run on one node fill the folder at once (published create-once); the Job's pod
    template carries the hostPath on stage alone (validated as a Job by the server)."""
    registry, dataset = ddp_deployment
    node = tmp_path / "node-cache"
    use_blob_cache(monkeypatch, registry, {"host_path": str(node), "max_size": "1G"})
    result = ddp_full_op(dataset).execute(make_context())
    assert result["version"] == "1.1"
    [job] = [m for m in kube_api.created if m.get("kind") == "Job"]
    template = job["spec"]["template"]["spec"]
    [volume] = [v for v in template["volumes"] if "hostPath" in v]
    stage = next(c for c in template["initContainers"] if c["name"] == "stage")
    assert {e["name"]: e.get("value") for e in stage["env"]}["AICENTER_BLOB_CACHE_MAX"] == "1G"
    assert [c["name"] for c in [*template["initContainers"], *template["containers"]]
            if any(m["name"] == volume["name"] for m in c.get("volumeMounts") or [])] == ["stage"]
    manifest = registry.get("ddp", "1.0").blob.sha256
    assert (node / "blobs" / "sha256" / manifest).is_file()
    assert not list((node / "blobs" / "tmp").iterdir()), "no fetch left behind"


@pytest.mark.parametrize(("blob_cache", "message"), [
    ({"host_path": "var/cache/aicenter"}, "absolute"),
    ({"host_path": "/var/cache/../aicenter"}, "'..'"),
    ({"host_path": "/"}, "absolute"),
    ({"path": "/var/cache/aicenter"}, "host_path"),
    ("/var/cache/aicenter", "host_path"),
    ({"host_path": "/var/cache/aicenter", "max_size": "lots"}, "max_size"),
])
def test_a_bad_blob_cache_extra_is_a_clear_error(blob_cache, message, kube_deployment, monkeypatch):
    registry, dataset = kube_deployment
    use_blob_cache(monkeypatch, registry, blob_cache)
    op = TrainPipelineOperator(task_id="train", package="rows", dataset=dataset, **FAST)
    with pytest.raises(ConfigurationError, match=re.escape(message)) as raised:
        op.make_launcher("kubernetes").check()
    assert "blob_cache" in str(raised.value)


# -- the shared cache itself, as stage uses it (no cluster) --------------------------------
def forge(entry: Path, data: bytes) -> None:
    """Rewrite a sealed entry in place and seal it again, as a pod that can write the node's folder could."""
    entry.chmod(0o644)
    entry.write_bytes(data)
    entry.chmod(SEALED_MODE)
    os.utime(entry, ns=(SEALED_MTIME_NS, SEALED_MTIME_NS))


def cached(cache: BlobCache, data: bytes) -> str:
    digest = hashlib.sha256(data).hexdigest()
    tmp = cache.new_temp(digest)
    tmp.write_bytes(data)
    cache.publish(tmp, digest, len(data))
    return digest


def test_a_shared_cache_counts_an_entry_only_if_it_hashes_to_its_name(tmp_path):
    cache = BlobCache(tmp_path / "node", shared=True)
    digest = cached(cache, b"weights" * 1000)
    assert cache.lookup(digest, 7000) is not None
    forge(cache.path(digest), b"WEIGHTS" * 1000)
    assert cache.lookup(digest, 7000) is None, "sealed like ours, other bytes: not cached"
    assert not cache.path(digest).exists(), "dropped, so the next fetch publishes the right bytes"


def test_a_shared_cache_copies_never_links_and_refuses_an_entry_rewritten_during_staging(tmp_path):
    data = os.urandom(2**20)
    cache = BlobCache(tmp_path / "node", shared=True)
    digest = cached(cache, data)
    linked = tmp_path / "pkg" / "a.bin"
    linked.parent.mkdir()
    assert cache.link(digest, linked, size=len(data)) is False, "copied"
    assert linked.read_bytes() == data and linked.stat().st_ino != cache.path(digest).stat().st_ino

    assert cache.lookup(digest, len(data)) is not None  # checked, then rewritten before the copy (same inode, seal)
    forged = bytearray(data)
    forged[-5:] = b"evil!"
    forge(cache.path(digest), bytes(forged))
    dest = tmp_path / "pkg" / "b.bin"
    with pytest.raises(StorageError, match=r"changed by another run .*run the task again"):
        cache.copy(digest, dest, size=len(data), mode=0o644)
    assert not dest.exists(), "nothing staged from it"
    assert not cache.path(digest).exists()


def test_only_a_pod_s_cache_is_shared(tmp_path):
    env = {"AICENTER_BLOB_CACHE": str(tmp_path / "node")}
    pod_cache, local_cache = runtime_cache(in_pod=True, environ=env), runtime_cache(in_pod=False, environ=env)
    assert pod_cache is not None and pod_cache.shared
    assert local_cache is not None and not local_cache.shared
    assert runtime_cache(in_pod=True, environ={}) is None
