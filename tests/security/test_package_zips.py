"""Hostile and pathological package zips: bombs made of many small entries, and writing cost.

The per-entry ratio check leaves entries up to ``RATIO_MIN_SIZE`` alone (small text files
compress a lot), so the zip as a whole has a ratio limit too; our own zips must always pass it.
"""

from __future__ import annotations

import io
import os
import zipfile
from pathlib import Path
from typing import Any

import pytest

from airflow_aicenter.errors import ArchiveError
from airflow_aicenter.package import extract_zip, write_zip
from airflow_aicenter.package.archive import MAX_RATIO, RATIO_MIN_SIZE, TOTAL_RATIO_MIN_SIZE
from tests.packages import MAIN, write_package
from tests.security.helpers import BOMB_ENTRIES, small_entry_bomb


@pytest.mark.parametrize("source", ["path", "reader"])
def test_a_bomb_of_many_small_entries_is_refused_before_writing(tmp_path: Path, bomb: Path, source: str) -> None:
    assert bomb.stat().st_size < BOMB_ENTRIES * 1200  # 300 MiB of zeros in about 330 KB
    with zipfile.ZipFile(bomb) as zf:
        total = sum(i.file_size for i in zf.infolist())
        compressed = sum(i.compress_size for i in zf.infolist())
    target: Any = bomb if source == "path" else io.BytesIO(bomb.read_bytes())
    with pytest.raises(ArchiveError) as e:
        extract_zip(target, tmp_path / "x")
    assert str(e.value) == (
        f"the zip expands {total} bytes from {compressed} compressed "
        f"(over {MAX_RATIO}:1 overall, across {BOMB_ENTRIES + 2} entries), "
        "which looks like a zip bomb: refused; if the files are genuine, store the highly compressible ones uncompressed "
        "(`aicenter package upload FOLDER` does) or keep such data in a dataset"
    )
    assert not (tmp_path / "x").exists()
    assert list(tmp_path.iterdir()) == [], "nothing may be written for a refused zip"


def test_a_small_zip_of_compressible_entries_is_not_a_bomb(tmp_path: Path) -> None:
    """Up to TOTAL_RATIO_MIN_SIZE the whole zip may compress as well as it likes: it cannot fill a disk."""
    entries = TOTAL_RATIO_MIN_SIZE // RATIO_MIN_SIZE - 1
    root = extract_zip(small_entry_bomb(tmp_path / "ok.zip", entries=entries), tmp_path / "x")
    assert len(list((root / "zeros").iterdir())) == entries


def test_our_zips_of_many_small_zero_files_always_extract(tmp_path: Path) -> None:
    """Files under RATIO_MIN_SIZE that deflate past MAX_RATIO are stored too, so the overall ratio holds."""
    files: dict[str, str | bytes] = {f"model/shard{i:02d}.bin": bytes(512 << 10) for i in range(48)}
    files["model/notes.txt"] = "a text file that deflates normally\n" * 20
    root = write_package(tmp_path / "pkg", files=files)
    write_zip(root, tmp_path / "p.zip")
    with zipfile.ZipFile(tmp_path / "p.zip") as zf:
        infos = {i.filename: i for i in zf.infolist()}
    assert infos["model/shard00.bin"].compress_type == zipfile.ZIP_STORED
    assert infos["model/notes.txt"].compress_type == zipfile.ZIP_DEFLATED
    assert all(i.file_size <= MAX_RATIO * max(i.compress_size, 1) for i in infos.values())
    out = extract_zip(tmp_path / "p.zip", tmp_path / "x")
    assert (out / "model" / "shard47.bin").read_bytes() == bytes(512 << 10)


def test_write_zip_writes_each_file_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """100 files of 2 MiB of zeros took 6.6 s (28 s on a loaded CI box; 4.5 s now): each over-compressible file restarted the zip
    (quadratic). Now every file is opened for writing into the zip exactly once: a dozen such files show a restart
    in the count of opens (40 took 3 s of the fast tier)."""
    files: dict[str, str | bytes] = {f"model/part{i:03d}.bin": bytes(2 << 20) for i in range(12)}
    files["model/weights.bin"] = os.urandom(3 << 20)  # incompressible: stored from its first MiB
    root = write_package(tmp_path / "pkg", files=files)
    writes: list[str] = []
    original = zipfile.ZipFile.open

    def counting_open(self: zipfile.ZipFile, name: Any, mode: Any = "r", *args: Any, **kwargs: Any) -> Any:
        if mode == "w":
            writes.append(name.filename if isinstance(name, zipfile.ZipInfo) else name)
        return original(self, name, mode, *args, **kwargs)

    monkeypatch.setattr(zipfile.ZipFile, "open", counting_open)
    digest = write_zip(root, tmp_path / "p.zip")
    monkeypatch.undo()
    expected = sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())
    assert sorted(writes) == expected and len(expected) == 16
    assert write_zip(root, tmp_path / "q.zip") == digest  # still deterministic


def test_max_selected_bytes_limits_only_the_selected_entries(tmp_path: Path) -> None:
    big = os.urandom(64 << 10)
    zip_path = tmp_path / "p.zip"
    with zipfile.ZipFile(zip_path, "w") as zf:
        zf.writestr("pkg/main.py", MAIN)
        zf.writestr("pkg/requirements.txt", "")
        zf.writestr("pkg/model.bin", big)  # large, but not selected
    root = extract_zip(zip_path, tmp_path / "x", only=lambda n: n.endswith(".py"), max_selected_bytes=len(MAIN))
    assert sorted(p.name for p in root.iterdir()) == ["main.py"]
    with pytest.raises(ArchiveError) as e:
        extract_zip(zip_path, tmp_path / "y", only=lambda n: not n.endswith(".txt"), max_selected_bytes=len(MAIN))
    assert str(e.value).startswith(f"zip entry 'pkg/model.bin' is {len(big)} bytes, over the limit of {len(MAIN)} bytes")
    assert not (tmp_path / "y").exists()
