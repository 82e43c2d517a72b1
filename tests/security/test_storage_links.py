"""Issue 13, finding 5: a file store, a dataset and an artifacts folder are read without following
symbolic links out of their root; a link that leaves it is an error naming the link."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from airflow_aicenter.errors import StorageError
from airflow_aicenter.storage import open_store
from airflow_aicenter.storage.transfer import download_tree, local_files, run, upload_tree


def _dataset(root: Path) -> Path:
    (root / "rows").mkdir(parents=True)
    (root / "rows" / "a.csv").write_text("a\n1\n")
    return root


def test_a_dataset_link_to_a_file_outside_is_an_error_naming_it(tmp_path):
    secret = tmp_path / "outside" / "passwd"
    secret.parent.mkdir()
    secret.write_text("root:x:0:0\n")
    data = _dataset(tmp_path / "data")
    os.symlink(secret, data / "rows" / "users.csv")
    source = open_store(data.as_uri(), create=False)
    with pytest.raises(StorageError, match=r"rows/users\.csv.*symbolic link.*outside"):
        run(download_tree(source, tmp_path / "staged"))
    staged = tmp_path / "staged"
    assert not staged.exists() or "root:x" not in "".join(p.read_text() for p in staged.rglob("*") if p.is_file())


def test_a_dataset_link_to_a_folder_outside_is_an_error_naming_it(tmp_path):
    outside = tmp_path / "etc"
    outside.mkdir()
    (outside / "shadow").write_text("secret")
    data = _dataset(tmp_path / "data")
    os.symlink(outside, data / "more")
    with pytest.raises(StorageError, match=r"'more'.*symbolic link"):
        list(open_store(data.as_uri(), create=False).list(""))


def test_links_inside_the_root_are_read(tmp_path):
    data = _dataset(tmp_path / "data")
    os.symlink(data / "rows" / "a.csv", data / "alias.csv")
    os.symlink(data / "rows", data / "rows-again")
    entries = run(download_tree(open_store(data.as_uri(), create=False), tmp_path / "staged"))
    assert sorted(e.path for e in entries) == ["alias.csv", "rows-again/a.csv", "rows/a.csv"]
    assert (tmp_path / "staged" / "alias.csv").read_text() == "a\n1\n"


def test_a_link_that_loops_is_an_error_naming_it(tmp_path):
    data = _dataset(tmp_path / "data")
    os.symlink(data, data / "rows" / "up")
    with pytest.raises(StorageError, match=r"rows/up.*loops"):
        list(open_store(data.as_uri(), create=False).list(""))


def test_an_artifact_link_leaving_the_folder_is_refused_before_any_upload(store, tmp_path):
    secret = tmp_path / "id_rsa"
    secret.write_text("PRIVATE KEY")
    art = tmp_path / "artifacts"
    art.mkdir()
    (art / "metrics.json").write_text("{}")
    os.symlink(secret, art / "key.txt")
    with pytest.raises(StorageError, match=r"key\.txt.*symbolic link.*outside"):
        run(upload_tree(art, store, "runs/x/artifacts"))
    assert list(store.list("runs/")) == []
    with pytest.raises(StorageError, match=r"key\.txt"):
        local_files(art)


def test_the_file_store_itself_refuses_a_link_out_of_its_root(tmp_path):
    store = open_store((tmp_path / "store").as_uri())
    store.put_bytes("runs/a/outcome.json", b"{}")
    os.symlink("/etc/passwd", tmp_path / "store" / "runs" / "a" / "leak.json")
    with pytest.raises(StorageError, match=r"runs/a/leak\.json.*symbolic link"):
        list(store.list("runs/"))
    with pytest.raises(StorageError, match=r"runs/a/leak\.json.*symbolic link"):
        store.get_bytes("runs/a/leak.json")
