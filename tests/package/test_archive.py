from __future__ import annotations

import hashlib
import io
import os
import stat
import struct
import subprocess
import sys
import warnings
import zipfile
from pathlib import Path
from typing import Any

import pytest

from airflow_aicenter.errors import ArchiveError, PackageError
from airflow_aicenter.package import extract_zip, is_contract_file, open_package, validate_package, write_zip
from tests.packages import MAIN, TRAIN, MakePackage, make_zip


def aicenter_zip(path: Path, root: str = "churn") -> Path:
    """Like AI Center's: one root folder with directory entries."""
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr(f"{root}/", b"")
        zf.writestr(f"{root}/main.py", MAIN)
        zf.writestr(f"{root}/train.py", TRAIN)
        zf.writestr(f"{root}/requirements.txt", "")
        zf.writestr(f"{root}/model/", b"")
        zf.writestr(f"{root}/model/weights.bin", os.urandom(2048))
    return path


def extract_error(zip_path: Path, dest: Path, **limits: Any) -> str:
    with pytest.raises(ArchiveError) as e:
        extract_zip(zip_path, dest, **limits)
    assert not dest.exists(), "a failed extraction must leave no destination"
    assert not [p for p in dest.parent.iterdir() if ".partial-" in p.name], "a failed extraction must leave no partial files"
    return str(e.value)


def patch_central(path: Path, offset: int, fmt: str, value: int) -> None:
    """Overwrite a field of the first central directory header (the header zipfile trusts)."""
    data = bytearray(path.read_bytes())
    at = data.index(b"PK\x01\x02") + offset
    struct.pack_into(fmt, data, at, value)
    path.write_bytes(bytes(data))


# -- writing -----------------------------------------------------------------------------


def test_write_zip_is_deterministic(make_package: MakePackage, tmp_path: Path) -> None:
    root = make_package(files={"model/weights.bin": os.urandom(4096), "run.sh": "#!/bin/sh\n"})
    first = write_zip(root, tmp_path / "a.zip")
    assert first == write_zip(root, tmp_path / "b.zip")
    for path in root.rglob("*"):
        os.utime(path, (1_000_000_000, 1_000_000_000))
    (root / "__pycache__").mkdir()
    (root / "__pycache__" / "main.cpython-311.pyc").write_bytes(b"bytecode")
    assert write_zip(root, tmp_path / "c.zip") == first
    assert first.sha256 == hashlib.sha256((tmp_path / "a.zip").read_bytes()).hexdigest()
    assert first.size == (tmp_path / "a.zip").stat().st_size
    (root / "requirements.txt").write_text("numpy\n")
    assert write_zip(root, tmp_path / "d.zip").sha256 != first.sha256


def test_write_zip_entries(make_package: MakePackage, tmp_path: Path) -> None:
    root = make_package(files={"b/x.txt": "x", "a-b.txt": "y", "run.sh": "#!/bin/sh\n",
        "__pycache__/m.pyc": b"\0", "old.pyc": b"\0"})
    (root / "run.sh").chmod(0o744)
    write_zip(root, tmp_path / "p.zip")
    with zipfile.ZipFile(tmp_path / "p.zip") as zf:
        infos = zf.infolist()
    names = [i.filename for i in infos]
    assert names == ["a-b.txt", "b/x.txt", "main.py", "requirements.txt", "run.sh", "train.py"]
    assert all(i.date_time == (1980, 1, 1, 0, 0, 0) and i.compress_type == zipfile.ZIP_DEFLATED for i in infos)
    modes = {i.filename: stat.S_IMODE(i.external_attr >> 16) for i in infos}
    assert modes["run.sh"] == 0o755 and modes["main.py"] == 0o644


def test_write_zip_refuses_a_file_link(make_package: MakePackage, tmp_path: Path) -> None:
    (tmp_path / "secret").write_text("x")
    root = make_package()
    os.symlink(tmp_path / "secret", root / "model.pkl")
    with pytest.raises(PackageError) as e:
        write_zip(root, tmp_path / "out" / "p.zip")
    assert "model.pkl is a symbolic link; links are not allowed in a package" in str(e.value)
    assert "replace it with a copy" in str(e.value)
    assert list((tmp_path / "out").iterdir()) == []


def test_write_zip_refuses_a_folder_link(make_package: MakePackage, tmp_path: Path) -> None:
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "big.csv").write_text("x")
    root = make_package()
    os.symlink(tmp_path / "data", root / "data")
    with pytest.raises(PackageError, match="data is a symbolic link; links are not allowed"):
        write_zip(root, tmp_path / "p.zip")


def test_write_zip_refuses_an_empty_folder(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(PackageError, match="is empty"):
        write_zip(tmp_path / "empty", tmp_path / "p.zip")


def test_highly_compressible_files_are_stored_so_our_zips_extract(make_package: MakePackage, tmp_path: Path) -> None:
    root = make_package(files={"model/sparse.bin": bytes(8 << 20), "model/small.bin": bytes(1000)})
    digest = write_zip(root, tmp_path / "p.zip")
    with zipfile.ZipFile(tmp_path / "p.zip") as zf:
        assert zf.getinfo("model/sparse.bin").compress_type == zipfile.ZIP_STORED
        assert zf.getinfo("model/small.bin").compress_type == zipfile.ZIP_DEFLATED
    assert write_zip(root, tmp_path / "q.zip") == digest
    out = extract_zip(tmp_path / "p.zip", tmp_path / "x")
    assert (out / "model" / "sparse.bin").read_bytes() == bytes(8 << 20)


def test_round_trip_keeps_content_and_exec_bit(make_package: MakePackage, tmp_path: Path) -> None:
    weights = os.urandom(3 << 20)
    root = make_package(files={"model/weights.bin": weights, "run.sh": "#!/bin/sh\n"})
    (root / "run.sh").chmod(0o755)
    write_zip(root, tmp_path / "p.zip")
    out = extract_zip(tmp_path / "p.zip", tmp_path / "x" / "pkg")
    assert out == tmp_path / "x" / "pkg"
    assert (out / "model" / "weights.bin").read_bytes() == weights
    assert (out / "run.sh").stat().st_mode & 0o111
    assert not (out / "main.py").stat().st_mode & 0o111
    assert [p.relative_to(out).as_posix() for p in sorted(out.rglob("*")) if p.is_file()] == [
        "main.py", "model/weights.bin", "requirements.txt", "run.sh", "train.py"]
    assert validate_package(out, "full").has_train


def test_streaming_memory_stays_bounded(tmp_path: Path) -> None:
    """Zip and extract a 64 MiB model in a fresh process; its peak RSS must stay far below the file size."""
    script = f"""
import os, resource, sys
from pathlib import Path
from airflow_aicenter.package import extract_zip, write_zip
root = Path({str(tmp_path)!r}) / "pkg"
(root / "model").mkdir(parents=True)
(root / "main.py").write_text("class Main:\\n    def __init__(self): pass\\n    def predict(self, input): pass\\n")
(root / "requirements.txt").write_text("")
block = os.urandom(1 << 20)
with open(root / "model" / "weights.bin", "wb") as f:
    for _ in range(64):
        f.write(block)
del block
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
write_zip(root, Path({str(tmp_path)!r}) / "p.zip")
extract_zip(Path({str(tmp_path)!r}) / "p.zip", Path({str(tmp_path)!r}) / "x")
print(base, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
"""
    out = subprocess.run([sys.executable, "-c", script], check=True, capture_output=True, text=True).stdout.split()
    base_kib, peak_kib = map(int, out)
    assert (tmp_path / "x" / "model" / "weights.bin").stat().st_size == 64 << 20
    assert peak_kib - base_kib < 24 * 1024, f"peak RSS grew by {(peak_kib - base_kib) // 1024} MiB"


# -- reading: valid zips -----------------------------------------------------------------


def test_aicenter_style_zip_with_one_root_folder(tmp_path: Path) -> None:
    root = extract_zip(aicenter_zip(tmp_path / "churn.zip"), tmp_path / "x")
    assert root == tmp_path / "x" / "churn"
    assert validate_package(root, "full").root == root
    assert (root / "model" / "weights.bin").stat().st_size == 2048


def test_extract_from_a_reader_only_contract_files(tmp_path: Path) -> None:
    data = aicenter_zip(tmp_path / "churn.zip").read_bytes()
    root = extract_zip(io.BytesIO(data), tmp_path / "x", only=is_contract_file)
    assert sorted(p.name for p in root.rglob("*")) == ["main.py", "requirements.txt", "train.py"]
    validate_package(root, "full")


def test_extract_from_an_obstore_reader(tmp_path: Path) -> None:
    obstore = pytest.importorskip("obstore")
    from obstore.store import MemoryStore

    store = MemoryStore()
    obstore.put(store, "blob", aicenter_zip(tmp_path / "churn.zip").read_bytes())
    root = extract_zip(obstore.open_reader(store, "blob"), tmp_path / "x", only=is_contract_file)
    assert (root / "main.py").read_text() == MAIN


def test_empty_existing_destination_is_used(tmp_path: Path) -> None:
    (tmp_path / "x").mkdir()
    assert extract_zip(aicenter_zip(tmp_path / "c.zip"), tmp_path / "x") == tmp_path / "x" / "churn"


def test_non_empty_destination_is_refused(tmp_path: Path) -> None:
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "keep").write_text("x")
    with pytest.raises(FileExistsError):
        extract_zip(aicenter_zip(tmp_path / "c.zip"), tmp_path / "x")
    assert (tmp_path / "x" / "keep").exists()


def test_open_package_folder_and_zip(make_package: MakePackage, tmp_path: Path) -> None:
    folder = make_package()
    assert open_package(folder, tmp_path / "w1") == folder
    assert not (tmp_path / "w1").exists()
    assert open_package(aicenter_zip(tmp_path / "c.zip"), tmp_path / "w2") == tmp_path / "w2" / "churn"


def test_open_package_missing_path(tmp_path: Path) -> None:
    with pytest.raises(PackageError, match=r"does not exist: pass a package folder or a \.zip"):
        open_package(tmp_path / "nope", tmp_path / "w")


def test_open_package_other_file(tmp_path: Path) -> None:
    (tmp_path / "model.tar").write_bytes(b"not a zip")
    with pytest.raises(PackageError, match=r"neither a folder nor a \.zip file"):
        open_package(tmp_path / "model.tar", tmp_path / "w")


def test_open_package_corrupt_zip(tmp_path: Path) -> None:
    (tmp_path / "p.zip").write_bytes(b"not a zip")
    with pytest.raises(ArchiveError, match="is not a zip file or is corrupt"):
        open_package(tmp_path / "p.zip", tmp_path / "w")


# -- reading: bad zips -------------------------------------------------------------------


def test_missing_zip(tmp_path: Path) -> None:
    assert "does not exist or is not a file" in extract_error(tmp_path / "nope.zip", tmp_path / "x")


def test_parent_traversal(tmp_path: Path) -> None:
    z = make_zip(tmp_path / "p.zip", {"pkg/main.py": MAIN, "../evil": "x"})
    message = extract_error(z, tmp_path / "x")
    assert "zip entry '../evil' has a '..' component, which would write outside the package folder" in message
    assert "re-create the zip from the package folder" in message
    assert not (tmp_path / "evil").exists()


def test_nested_traversal(tmp_path: Path) -> None:
    z = make_zip(tmp_path / "p.zip", {"pkg/../../evil": "x"})
    assert "'pkg/../../evil' has a '..' component" in extract_error(z, tmp_path / "x")


@pytest.mark.parametrize("name", ["/abs", "/etc/cron.d/x", "C:/Windows/x", "c:evil"])
def test_absolute_paths(tmp_path: Path, name: str) -> None:
    z = make_zip(tmp_path / "p.zip", {name: "x"})
    message = extract_error(z, tmp_path / "x")
    assert f"zip entry {name!r} has an absolute path: entries must be relative to the package root" in message


def test_backslash_paths(tmp_path: Path) -> None:
    z = make_zip(tmp_path / "p.zip", {"pkg\\..\\..\\evil": "x"})
    message = extract_error(z, tmp_path / "x")
    assert "uses backslashes (a Windows path)" in message and "writes '/' separators" in message


def test_symlink_entry(tmp_path: Path) -> None:
    with zipfile.ZipFile(tmp_path / "p.zip", "w") as zf:
        zf.writestr("pkg/main.py", MAIN)
        link = zipfile.ZipInfo("pkg/model.pkl")
        link.create_system = 3
        link.external_attr = 0o120777 << 16
        zf.writestr(link, "/etc/passwd")
    message = extract_error(tmp_path / "p.zip", tmp_path / "x")
    assert "zip entry 'pkg/model.pkl' is a symbolic link; links are not allowed in a package" in message
    assert "replace it with the file it points to" in message


def test_zip_bomb(tmp_path: Path) -> None:
    with zipfile.ZipFile(tmp_path / "p.zip", "w", zipfile.ZIP_DEFLATED, compresslevel=9) as zf:
        zf.writestr("pkg/main.py", MAIN)
        zf.writestr("pkg/zeros.bin", bytes(50 << 20))
    assert (tmp_path / "p.zip").stat().st_size < 1 << 20
    message = extract_error(tmp_path / "p.zip", tmp_path / "x")
    assert "zip entry 'pkg/zeros.bin' expands 52428800 bytes from" in message
    assert "over 200:1), which looks like a zip bomb" in message and "store it uncompressed" in message


def test_small_highly_compressible_files_are_fine(tmp_path: Path) -> None:
    z = make_zip(tmp_path / "p.zip", {"pkg/main.py": MAIN, "pkg/requirements.txt": "", "pkg/zeros.csv": bytes(1 << 20)})
    assert (extract_zip(z, tmp_path / "x") / "zeros.csv").stat().st_size == 1 << 20


def test_too_many_entries_default_limit(tmp_path: Path) -> None:
    with zipfile.ZipFile(tmp_path / "p.zip", "w", zipfile.ZIP_STORED) as zf:
        for i in range(20_001):
            zf.writestr(f"pkg/f{i}", b"")
    message = extract_error(tmp_path / "p.zip", tmp_path / "x")
    assert "the zip has 20001 entries, more than the limit of 20000" in message
    assert "remove generated files" in message


def test_too_many_entries_custom_limit(tmp_path: Path) -> None:
    z = make_zip(tmp_path / "p.zip", {f"pkg/f{i}": b"" for i in range(11)})
    assert "11 entries, more than the limit of 10" in extract_error(z, tmp_path / "x", max_entries=10)
    assert extract_zip(z, tmp_path / "y", max_entries=11) == tmp_path / "y"


def test_declared_total_size_limit(tmp_path: Path) -> None:
    z = make_zip(tmp_path / "p.zip", {"pkg/a.bin": os.urandom(600), "pkg/b.bin": os.urandom(600)})
    message = extract_error(z, tmp_path / "x", max_total_bytes=1000)
    assert "the zip expands to more than 1000 bytes (limit reached at entry 'pkg/b.bin')" in message
    assert "keep large data in datasets" in message


def test_header_that_understates_the_size(tmp_path: Path) -> None:
    z = make_zip(tmp_path / "p.zip", {"pkg/a.bin": os.urandom(5000)}, compression=zipfile.ZIP_STORED)
    patch_central(z, 24, "<I", 100)  # uncompressed size
    message = extract_error(z, tmp_path / "x")
    assert "zip entry 'pkg/a.bin'" in message and "corrupt" in message


def test_truncated_zip(tmp_path: Path) -> None:
    data = aicenter_zip(tmp_path / "c.zip").read_bytes()
    (tmp_path / "p.zip").write_bytes(data[: len(data) // 2])
    message = extract_error(tmp_path / "p.zip", tmp_path / "x")
    assert "is not a zip file or is corrupt" in message and "upload it again" in message


def test_not_a_zip(tmp_path: Path) -> None:
    (tmp_path / "p.zip").write_text("print('hello')\n")
    assert "p.zip is not a zip file or is corrupt (File is not a zip file)" in extract_error(tmp_path / "p.zip", tmp_path / "x")


def test_crc_mismatch(tmp_path: Path) -> None:
    payload = b"A" * 100 + b"B" * 100
    z = make_zip(tmp_path / "p.zip", {"pkg/main.py": MAIN, "pkg/model.bin": payload}, compression=zipfile.ZIP_STORED)
    data = bytearray(z.read_bytes())
    data[data.index(payload) + 150] ^= 0xFF
    z.write_bytes(bytes(data))
    message = extract_error(z, tmp_path / "x")
    assert "zip entry 'pkg/model.bin' is corrupt (Bad CRC-32" in message
    assert "the zip was damaged (e.g. in transfer)" in message


def test_corrupt_deflate_stream(tmp_path: Path) -> None:
    z = make_zip(tmp_path / "p.zip", {"pkg/model.bin": os.urandom(100) * 50})
    data = bytearray(z.read_bytes())
    start = data.index(b"pkg/model.bin") + len("pkg/model.bin")
    for i in range(start + 5, start + 40):
        data[i] ^= 0x5A
    z.write_bytes(bytes(data))
    assert "zip entry 'pkg/model.bin' is corrupt" in extract_error(z, tmp_path / "x")


def test_encrypted_entry(tmp_path: Path) -> None:
    z = make_zip(tmp_path / "p.zip", {"pkg/main.py": MAIN})
    patch_central(z, 8, "<H", 0x1)  # general purpose flags: encrypted
    message = extract_error(z, tmp_path / "x")
    assert "zip entry 'pkg/main.py' is encrypted: packages cannot be password-protected" in message


def test_unsupported_compression(tmp_path: Path) -> None:
    z = make_zip(tmp_path / "p.zip", {"pkg/main.py": MAIN})
    patch_central(z, 10, "<H", 99)
    assert "uses compression method 99, which is not supported" in extract_error(z, tmp_path / "x")


def test_duplicate_names(tmp_path: Path) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        z = make_zip(tmp_path / "p.zip", {"pkg/main.py": MAIN})
        with zipfile.ZipFile(z, "a") as zf:
            zf.writestr("pkg/./main.py", "import os\n")
    message = extract_error(z, tmp_path / "x")
    assert "zip entry 'pkg/./main.py' appears more than once" in message


def test_file_and_folder_with_the_same_name(tmp_path: Path) -> None:
    z = make_zip(tmp_path / "p.zip", {"pkg/model": "x", "pkg/model/weights": "y"})
    assert "zip entry 'pkg/model/weights' clashes with another entry" in extract_error(z, tmp_path / "x")


def test_empty_zip(tmp_path: Path) -> None:
    zipfile.ZipFile(tmp_path / "p.zip", "w").close()
    assert extract_error(tmp_path / "p.zip", tmp_path / "x").startswith("the zip is empty: zip the package folder")


def test_failure_midway_removes_extracted_files(tmp_path: Path) -> None:
    """Entries before the corrupt one were written to the staging folder; none must remain."""
    payload = b"C" * 300
    z = make_zip(tmp_path / "p.zip", {"pkg/main.py": MAIN,
        "pkg/requirements.txt": "", "pkg/z.bin": payload}, compression=zipfile.ZIP_STORED)
    data = bytearray(z.read_bytes())
    data[data.index(payload)] ^= 0xFF
    z.write_bytes(bytes(data))
    extract_error(z, tmp_path / "x")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p.zip"]
