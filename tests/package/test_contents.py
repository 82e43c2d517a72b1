"""The per-file version manifest (package/contents.py): what it lists, its bytes, and what it refuses."""

from __future__ import annotations

import hashlib
import json
import os
import zipfile
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from airflow_aicenter.errors import PackageError
from airflow_aicenter.package import write_zip
from airflow_aicenter.package.contents import (
    FORMAT,
    PackageContents,
    PackageFile,
    contents_of,
    decode,
    encode,
)
from tests.packages import MakePackage

SHA = "a" * 64


def entry(path: str = "main.py", **over: Any) -> dict[str, Any]:
    return {"path": path, "size": 1, "mode": 0o644, "sha256": SHA, **over}


def manifest(*files: dict[str, Any], **over: Any) -> bytes:
    return json.dumps({"format": FORMAT, "files": list(files), **over}).encode()


def test_contents_lists_what_write_zip_packs_with_its_modes(make_package: MakePackage, tmp_path: Path) -> None:
    weights = os.urandom(5000)
    root = make_package(files={"model/weights.bin": weights, "run.sh": "#!/bin/sh\n"})
    (root / "run.sh").chmod(0o700)  # only the executable bit is kept, as in the zip
    (root / "main.py").chmod(0o600)
    (root / "__pycache__").mkdir()
    (root / "__pycache__" / "main.cpython-311.pyc").write_bytes(b"bytecode")
    (root / "model" / "x.pyc").write_bytes(b"bytecode")
    contents = contents_of(root)
    write_zip(root, tmp_path / "p.zip")
    with zipfile.ZipFile(tmp_path / "p.zip") as zf:
        zipped = {i.filename: ((i.external_attr >> 16) & 0o777, zf.read(i)) for i in zf.infolist()}
    assert [f.path for f in contents.files] == sorted(zipped)
    for f in contents.files:
        mode, data = zipped[f.path]
        assert (f.mode, f.size, f.sha256) == (mode, len(data), hashlib.sha256(data).hexdigest())
    assert {f.path: f.mode for f in contents.files}["run.sh"] == 0o755
    assert contents.total_size == sum(len(d) for _, d in zipped.values())
    assert contents.format == FORMAT


def test_encode_is_deterministic_and_round_trips(make_package: MakePackage) -> None:
    root = make_package(files={"b/x.bin": b"1", "a.txt": "2"})
    first = encode(contents_of(root))
    for path in root.rglob("*"):
        os.utime(path, (1_000_000_000, 1_000_000_000))
    assert encode(contents_of(root)) == first  # times are not content: same digest
    again = decode(first, where="blob sha256:x")
    assert again == contents_of(root)
    assert encode(again) == first
    (root / "a.txt").write_text("3")
    assert encode(contents_of(root)) != first


def test_known_digest_skips_hashing(make_package: MakePackage) -> None:
    root = make_package(files={"big.bin": b"x" * 100})
    asked: list[str] = []

    def known(path: Path, st: os.stat_result) -> str | None:
        asked.append(path.name)
        return "b" * 64 if path.name == "big.bin" else None

    contents = contents_of(root, known=known)
    by_path = {f.path: f for f in contents.files}
    assert by_path["big.bin"].sha256 == "b" * 64 and by_path["big.bin"].size == 100
    assert by_path["main.py"].sha256 == hashlib.sha256((root / "main.py").read_bytes()).hexdigest()
    assert sorted(asked) == sorted(by_path)


def test_contents_refuses_links_and_empty_folders(make_package: MakePackage, tmp_path: Path) -> None:
    root = make_package()
    (root / "evil").symlink_to("/etc/passwd")
    with pytest.raises(PackageError, match="evil is a symbolic link"):
        contents_of(root)
    (tmp_path / "empty").mkdir()
    with pytest.raises(PackageError, match="is empty"):
        contents_of(tmp_path / "empty")


@pytest.mark.parametrize(("path", "says"), [
    ("", "empty path"),
    ("/etc/passwd", "is absolute"),
    ("C:/x", "is absolute"),
    ("../x", "'..' part"),
    ("a/../../x", "'..' part"),
    ("a\\..\\x", "backslash"),
    ("a//b", "normal form"),
    ("./a", "normal form"),
    ("a/", "normal form"),
    ("a\x00b", "NUL"),
    ("x" * 300, "longer than"),
])
def test_bad_paths_are_refused(path: str, says: str) -> None:
    with pytest.raises(ValidationError, match=says):
        PackageFile(**entry(path))
    with pytest.raises(PackageError, match=f"manifest blob sha256:m is malformed: files.0.path: .*{says}"):
        decode(manifest(entry(path)), where="blob sha256:m")


@pytest.mark.parametrize(("over", "says"), [
    ({"mode": 0o600}, "0o600 is not one a package file can have"),
    ({"mode": 0o4755}, "is not one a package file can have"),
    ({"size": -1}, "greater than or equal to 0"),
    ({"sha256": "A" * 64}, "64 lowercase hex"),
    ({"sha256": "a" * 63}, "64 lowercase hex"),
    ({"extra": 1}, "Extra inputs are not permitted"),
])
def test_bad_entries_are_refused(over: dict[str, Any], says: str) -> None:
    with pytest.raises(PackageError, match=f"manifest M is malformed: files.0.*{says}"):
        decode(manifest(entry(**over)), where="M")


@pytest.mark.parametrize(("files", "says"), [
    ([entry("b"), entry("a")], "not sorted by path"),
    ([entry("a"), entry("a")], "listed twice"),
    ([entry("a"), entry("a/b")], "'a' is listed as a file and as the folder of 'a/b'"),
    ([], "lists no file"),
])
def test_bad_file_lists_are_refused(files: list[dict[str, Any]], says: str) -> None:
    with pytest.raises(PackageError, match=f"manifest M is malformed: .*{says}"):
        decode(manifest(*files), where="M")


@pytest.mark.parametrize(("data", "says"), [
    (b"not json", "is not JSON"),
    (b"\xff\xfe", "is not JSON"),
    (b"[]", "is not a JSON object"),
    (json.dumps({"files": []}).encode(), "has format 'None'"),
    (json.dumps({"format": "aicenter-package-files/2", "files": []}).encode(), "upgrade airflow-aicenter"),
    (manifest(entry(), extra=1), "Extra inputs"),
    (json.dumps({"format": FORMAT, "files": "x"}).encode(), "files: Input should be a valid list"),
])
def test_bad_manifests_are_named(data: bytes, says: str) -> None:
    with pytest.raises(PackageError, match=says) as err:
        decode(data, where="blob sha256:abc (s3://b/blobs/sha256/abc)")
    assert "blob sha256:abc (s3://b/blobs/sha256/abc)" in str(err.value)
    assert "aicenter package upload" in str(err.value) or "upgrade" in str(err.value)


def test_a_model_validates_when_built_in_code() -> None:
    with pytest.raises(ValidationError, match="not sorted"):
        PackageContents(files=[PackageFile(**entry("b")), PackageFile(**entry("a"))])
