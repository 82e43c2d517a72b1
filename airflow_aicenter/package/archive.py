"""Package zips: deterministic writing and safe, streaming extraction.

Writing is deterministic (sorted entries, fixed timestamps and modes) so the same folder
always gives the same sha256: unchanged content is stored once. Extraction trusts nothing in
the archive: names, links, sizes and compression ratios are checked before anything is
written, actual bytes are counted while streaming, and a failed extraction leaves nothing.
Files are copied in 1 MiB chunks, so multi-GB models never sit in memory.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import re
import shutil
import stat
import tempfile
import zipfile
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from airflow_aicenter.errors import ArchiveError, PackageError, StorageError
from airflow_aicenter.kernel_copy import copy_range
from airflow_aicenter.package.validate import find_package_root, iter_package_files

CHUNK = 1 << 20
ZIP_EPOCH = (1980, 1, 1, 0, 0, 0)
COMPRESS_LEVEL = 1
"""Deflate level: speed matters more than size for multi-GB model files."""
MAX_RATIO = 200
"""Largest expansion ratio accepted for an entry over ``RATIO_MIN_SIZE``, and for the whole zip
once it expands past ``TOTAL_RATIO_MIN_SIZE`` (zip bomb guard)."""
RATIO_MIN_SIZE = 1 << 20
"""Entries up to this size are not ratio-checked one by one: small text files legitimately compress a lot."""
TOTAL_RATIO_MIN_SIZE = 16 << 20
"""A zip that expands to no more than this is not ratio-checked as a whole: it cannot fill a disk.
Past it, many small entries of zeros (each under ``RATIO_MIN_SIZE``) are caught by the overall ratio."""
MAX_TOTAL_BYTES = 16 << 30
"""Default limit on what a zip may expand to: models are large, datasets belong in datasets."""
MAX_NAME_BYTES = 1024
"""Longest entry path accepted (a file system refuses names over 255 bytes, paths over 4096)."""
INCOMPRESSIBLE_SAMPLE = 1 << 20
"""A file over this size whose first MiB deflates by less than 10% is stored, not deflated:
weights and compressed data gain nothing, and deflate crawls through them at ~30 MB/s
(benchmarks/README.md, "memory"). The choice depends on content only: zips stay deterministic."""

COPY_CHUNK = 16 << 20
"""Bytes the zip's own bytes are hashed by at a time (_ZipHasher.upto)."""

_SUPPORTED_COMPRESSION = {zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED, zipfile.ZIP_BZIP2, zipfile.ZIP_LZMA}
_DRIVE_RE = re.compile(r"^[A-Za-z]:")
_REMAKE = "re-create the zip from the package folder (e.g. `aicenter package upload FOLDER`)"


@dataclass(frozen=True)
class ZipDigest:
    """Identity of a written zip: its content address in the blob store."""

    sha256: str
    size: int


def write_zip(root: Path, dest: Path) -> ZipDigest:
    """Zip the package folder ``root`` into ``dest`` deterministically; return its sha256 and size.

    Links are refused: following them could pull files from outside the package into a version.
    A file that would deflate beyond ``MAX_RATIO`` (say, a mostly-zero weight file), of any
    size, is stored uncompressed instead, decided before it is written (``_stored``), so every
    file is written once (linear time) and no entry, nor the zip as a whole, expands beyond
    ``MAX_RATIO``: ``extract_zip`` never mistakes our own zips for bombs. The choice depends only
    on content, so the output stays deterministic.
    ``dest`` appears only once complete (written next to it, then renamed).
    """
    root, dest = Path(root), Path(dest)
    names = list(iter_package_files(root))
    if not names:
        raise PackageError(f"package folder {str(root)!r} is empty: put main.py and requirements.txt in it")
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".tmp")
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "w+b") as raw:
            with zipfile.ZipFile(raw, "w") as zf:
                for rel in names:
                    _add_file(zf, root, rel)
            raw.seek(0)
            sha256 = hashlib.file_digest(raw, "sha256").hexdigest()
        os.replace(tmp, dest)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return ZipDigest(sha256, dest.stat().st_size)


def _add_file(zf: zipfile.ZipFile, root: Path, rel: Path) -> None:
    """Add one regular file, deflated unless ``_stored`` says storing it is better or safer."""
    path = root / rel
    st = path.lstat()
    if stat.S_ISLNK(st.st_mode):
        raise PackageError(
            f"{rel.as_posix()} is a symbolic link; links are not allowed in a package (they could point outside it): "
            f"replace it with a copy of the file or folder it points to"
        )
    if not stat.S_ISREG(st.st_mode):
        raise PackageError(f"{rel.as_posix()} is not a regular file (a device, socket or pipe): remove it from the package")
    info = zipfile.ZipInfo(rel.as_posix(), date_time=ZIP_EPOCH)
    info.create_system = 3  # Unix, so the mode below is read back the same on every platform
    info.compress_type = zipfile.ZIP_STORED if _stored(path, st.st_size) else zipfile.ZIP_DEFLATED
    _set_compress_level(info, COMPRESS_LEVEL)
    info.external_attr = (stat.S_IFREG | (0o755 if st.st_mode & 0o111 else 0o644)) << 16
    info.file_size = st.st_size  # lets zipfile pick zip64 up front for files over 2 GiB
    with path.open("rb") as src, zf.open(info, "w") as out:
        shutil.copyfileobj(src, out, CHUNK)


def _deflater() -> zlib._Compress:
    """The compressor ``zipfile`` uses for our entries: same level and raw stream, so same sizes."""
    return zlib.compressobj(COMPRESS_LEVEL, zlib.DEFLATED, -15)


def _stored(path: Path, size: int) -> bool:
    """Whether to store the file rather than deflate it: it is incompressible, or it would deflate past ``MAX_RATIO``.

    The second question is answered by deflating into a counter (nothing kept) and stopping as
    soon as the output passes ``size / MAX_RATIO``: ordinary data settles it within its first
    few percent, and only data that really is that compressible (zeros) is read through, fast.
    """
    if size > INCOMPRESSIBLE_SAMPLE:
        with path.open("rb") as fh:
            sample = fh.read(INCOMPRESSIBLE_SAMPLE)
        deflate = _deflater()
        if len(deflate.compress(sample) + deflate.flush()) > 0.9 * len(sample):
            return True
    bound = size / MAX_RATIO
    deflate, out = _deflater(), 0
    with path.open("rb") as fh:
        while chunk := fh.read(CHUNK):
            out += len(deflate.compress(chunk))
            if out > bound:
                return False
    return out + len(deflate.flush()) < bound


def _set_compress_level(info: zipfile.ZipInfo, level: int) -> None:
    """``ZipFile.open(info, "w")`` ignores the archive's level; the attribute was renamed in 3.13."""
    if hasattr(info, "compress_level"):
        info.compress_level = level
    else:
        info._compresslevel = level  # type: ignore[attr-defined]


def _too_compressed(info: zipfile.ZipInfo, max_ratio: int) -> bool:
    return info.file_size > RATIO_MIN_SIZE and info.file_size > max_ratio * max(info.compress_size, 1)


class _BytesReader(io.RawIOBase):
    """Adapts a seekable reader whose ``read`` returns a buffer (e.g. obstore's) to plain bytes."""

    def __init__(self, inner: BinaryIO) -> None:
        self._inner = inner

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def seek(self, offset: int, whence: int = 0) -> int:
        return self._inner.seek(offset, whence)

    def tell(self) -> int:
        return self._inner.tell()

    def readinto(self, buffer: bytearray | memoryview) -> int:  # type: ignore[override]
        data = memoryview(self._inner.read(len(buffer))).cast("B")
        buffer[: len(data)] = data
        return len(data)


def _check_name(name: str) -> tuple[str, ...]:
    """Refuse names that could escape ``dest``; return the normalised path parts."""
    if not name:  # zipfile cuts a name at its first NUL, so "\x00evil" arrives empty
        raise ArchiveError(f"a zip entry has an empty name (or one starting with a NUL character): {_REMAKE}")
    if "\x00" in name:
        raise ArchiveError(f"zip entry {name!r} has a NUL character in its name: {_REMAKE}")
    if name.startswith("/") or _DRIVE_RE.match(name):
        raise ArchiveError(f"zip entry {name!r} has an absolute path: entries must be relative to the package root; {_REMAKE}")
    if "\\" in name:
        raise ArchiveError(
            f"zip entry {name!r} uses backslashes (a Windows path), which could escape the package folder: "
            f"re-create the zip with a tool that writes '/' separators (e.g. `python -m zipfile -c`)"
        )
    parts = tuple(p for p in name.split("/") if p not in ("", "."))
    if ".." in parts:
        raise ArchiveError(f"zip entry {name!r} has a '..' component, which would write outside the package folder: {_REMAKE}")
    if len(name.encode("utf-8", "surrogateescape")) > MAX_NAME_BYTES or any(
        len(p.encode("utf-8", "surrogateescape")) > 255 for p in parts
    ):
        raise ArchiveError(
            f"zip entry {name[:60]!r}... has a path longer than {MAX_NAME_BYTES} bytes or a file/folder name longer than "
            f"255 bytes, which file systems refuse: shorten it; {_REMAKE}"
        )
    return parts


def _check_entries(infos: list[zipfile.ZipInfo], *, max_entries: int, max_total_bytes: int, max_ratio: int) -> None:
    """Everything that can be refused from the central directory alone, before writing a byte."""
    if not infos:
        raise ArchiveError("the zip is empty: zip the package folder (main.py, requirements.txt, ...)")
    if len(infos) > max_entries:
        raise ArchiveError(
            f"the zip has {len(infos)} entries, more than the limit of {max_entries}: remove generated files or pack many small "
            "files into one")
    seen: set[tuple[str, ...]] = set()
    total = compressed = 0
    for info in infos:
        name = info.filename
        parts = _check_name(name)
        if stat.S_ISLNK(info.external_attr >> 16):
            raise ArchiveError(
                f"zip entry {name!r} is a symbolic link; links are not allowed in a package (they could point outside it): "
                f"replace it with the file it points to and re-create the zip"
            )
        if info.is_dir():
            continue
        if not parts:
            raise ArchiveError(f"zip entry {name!r} has an empty path: {_REMAKE}")
        if parts in seen:
            raise ArchiveError(f"zip entry {name!r} appears more than once; it is ambiguous which one is meant: {_REMAKE}")
        seen.add(parts)
        if info.flag_bits & 0x1:
            raise ArchiveError(
                f"zip entry {name!r} is encrypted: packages cannot be password-protected; re-create the zip without a password")
        if info.compress_type not in _SUPPORTED_COMPRESSION:
            raise ArchiveError(
                f"zip entry {name!r} uses compression method {info.compress_type}, which is not supported: re-create the zip "
                "with deflate (the default)")
        if _too_compressed(info, max_ratio):
            raise ArchiveError(
                f"zip entry {name!r} expands {info.file_size} bytes from {info.compress_size} (over {max_ratio}:1), "
                f"which looks like a zip bomb: refused; if the file is genuine, store it uncompressed or compress it yourself"
            )
        total += info.file_size
        compressed += info.compress_size
        if total > max_total_bytes:
            raise ArchiveError(
                f"the zip expands to more than {max_total_bytes} bytes (limit reached at entry {name!r}): "
                f"keep large data in datasets, not in the package"
            )
    if total > TOTAL_RATIO_MIN_SIZE and total > max_ratio * max(compressed, 1):
        raise ArchiveError(
            f"the zip expands {total} bytes from {compressed} compressed (over {max_ratio}:1 overall, across "
            f"{len(infos)} entries), which looks like a zip bomb: refused; if the files are genuine, store the "
            f"highly compressible ones uncompressed (`aicenter package upload FOLDER` does) or keep such data in a dataset"
        )


@contextlib.contextmanager
def publishing(dest: Path) -> Iterator[Path]:
    """A private folder beside ``dest`` to build it in, put in place whole when the block succeeds.

    The folder is renamed onto ``dest`` (an empty folder there, such as a pod's mount point, is
    replaced) and made an ordinary 0755 folder; on any failure it is removed. So a package folder
    is never seen half-written: the one way a zip extraction and a per-file staging publish theirs.
    """
    dest.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=dest.parent, prefix=f".{dest.name}.partial-"))
    try:
        yield staging
        staging.chmod(0o755)  # mkdtemp makes it private; the package folder is an ordinary one
        if dest.exists():
            dest.rmdir()
        os.replace(staging, dest)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def extract_zip(
    zip_path: Path | BinaryIO,
    dest: Path,
    *,
    max_entries: int = 20_000,
    max_total_bytes: int = MAX_TOTAL_BYTES,
    max_ratio: int = MAX_RATIO,
    only: Callable[[str], bool] | None = None,
    max_selected_bytes: int | None = None,
    expect_sha256: str | None = None,
) -> Path:
    """Safely extract a package zip (a path, or a seekable binary reader) into ``dest``; return the package root.

    ``only``, given an entry name, selects which files to write (all entries are still
    checked), so validation can fetch just the contract files of a multi-GB zip;
    ``max_selected_bytes`` refuses a selected file larger than that from the central directory,
    before it is fetched (a 2 GB ``main.py`` in a trained version is not downloaded to be refused).
    ``expect_sha256`` (a path only) verifies the whole zip against that digest in the same pass
    as the extraction: stored entries are hashed from the copies just written (so what is
    verified is what lands in ``dest``; their CRC is then redundant), every other byte from the
    zip; ``dest`` appears only if the digest matches. It lets a blob be extracted straight from
    the store with one read of its bytes (transfer.blob_to_read).
    ``dest`` must not exist or be empty; on failure it is left as it was.
    """
    dest = Path(dest)
    label = str(zip_path) if isinstance(zip_path, (str, os.PathLike)) else "the package zip"
    if isinstance(zip_path, (str, os.PathLike)):
        if not Path(zip_path).is_file():
            raise ArchiveError(f"{label} does not exist or is not a file: check the path")
        source: str | BinaryIO = os.fspath(zip_path)
    else:
        source = io.BufferedReader(_BytesReader(zip_path), buffer_size=256 * 1024)
    if dest.exists() and (not dest.is_dir() or any(dest.iterdir())):
        raise FileExistsError(f"extraction target {dest} already exists and is not an empty folder")
    try:
        zf = zipfile.ZipFile(source)
    except (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError, ValueError, OSError) as e:
        raise ArchiveError(f"{label} is not a zip file or is corrupt ({e}): {_REMAKE}, or upload it again") from e
    with publishing(dest) as staging, zf:
        infos = zf.infolist()
        _check_entries(infos, max_entries=max_entries, max_total_bytes=max_total_bytes, max_ratio=max_ratio)
        if max_selected_bytes is not None:
            _check_selected(infos, only, max_selected_bytes)
        budget = [max_total_bytes]
        with contextlib.ExitStack() as stack:
            raw = None  # the zip itself, for stored entries copied in the kernel
            if isinstance(source, str):
                raw = os.open(source, os.O_RDONLY | os.O_CLOEXEC)
                stack.callback(os.close, raw)
            hasher = None
            if expect_sha256 is not None:
                if raw is None or only is not None:
                    raise ValueError("expect_sha256 needs a zip on disk, extracted whole")
                hasher = _ZipHasher(raw)
                infos = sorted(infos, key=lambda i: i.header_offset)  # the digest runs through the file in order
            for info in infos:
                if info.is_dir() or (only is not None and not only(info.filename)):
                    continue
                _extract_one(zf, info, staging, budget, raw, hasher)
            if hasher is not None and expect_sha256 is not None:
                hasher.check(expect_sha256, label)
    return find_package_root(dest)


def _check_selected(infos: list[zipfile.ZipInfo], only: Callable[[str], bool] | None, limit: int) -> None:
    for info in infos:
        if not info.is_dir() and (only is None or only(info.filename)) and info.file_size > limit:
            name = info.filename.rsplit("/", 1)[-1]
            raise ArchiveError(
                f"zip entry {info.filename!r} is {info.file_size} bytes, over the limit of {limit} bytes for a contract file "
                f"(it is parsed in the Airflow worker before the run): keep {name} small and large data in other files "
                f"of the package"
            )


def _extract_one(
    zf: zipfile.ZipFile, info: zipfile.ZipInfo, staging: Path, budget: list[int], raw: int | None = None,
    hasher: _ZipHasher | None = None,
) -> None:
    name = info.filename
    target = staging.joinpath(*_check_name(name))
    base = staging.resolve()
    if os.path.commonpath([base, target.parent.resolve()]) != str(base):  # defence in depth
        raise ArchiveError(f"zip entry {name!r} would be written outside the package folder: {_REMAKE}")
    written = 0
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        if raw is not None and (start := _stored_data_start(raw, info)) is not None:
            budget[0] -= info.file_size
            if budget[0] < 0:
                raise ArchiveError(
                    f"the zip expands to more than its size limit (reached in entry {name!r}): keep large data in datasets, "
                    "not in the package")
            if hasher is not None and start >= hasher.pos:  # entries that overlap an earlier one keep their CRC check
                hasher.upto(start)
            else:
                hasher = None
            _copy_stored(raw, start, info, target, hasher)
            if (info.external_attr >> 16) & 0o111:
                target.chmod(0o755)
            return
        with zf.open(info) as src, open(target, "xb") as out:
            while chunk := src.read(CHUNK):
                written += len(chunk)
                budget[0] -= len(chunk)
                if written > info.file_size:
                    raise ArchiveError(
                        f"zip entry {name!r} holds more data than its header declares ({info.file_size} bytes): the zip is "
                        f"corrupt or malicious; {_REMAKE}")
                if budget[0] < 0:
                    raise ArchiveError(
                        f"the zip expands to more than its size limit (reached in entry {name!r}): keep large data in datasets, "
                        "not in the package")
                out.write(chunk)
    except (zipfile.BadZipFile, zlib.error, EOFError) as e:
        raise ArchiveError(
            f"zip entry {name!r} is corrupt ({e}): the zip was damaged (e.g. in transfer); {_REMAKE}, or upload it again") from e
    except NotImplementedError as e:
        raise ArchiveError(f"zip entry {name!r} cannot be read ({e}): re-create the zip with deflate compression") from e
    except (FileExistsError, NotADirectoryError, IsADirectoryError) as e:
        raise ArchiveError(
            f"zip entry {name!r} clashes with another entry (a file and a folder of the same name): {_REMAKE}") from e
    if written != info.file_size:
        raise ArchiveError(
            f"zip entry {name!r} holds {written} bytes but its header declares {info.file_size}: the zip is corrupt; {_REMAKE}")
    if (info.external_attr >> 16) & 0o111:
        target.chmod(0o755)


def _stored_data_start(raw: int, info: zipfile.ZipInfo) -> int | None:
    """Where a stored (uncompressed) entry's bytes start in the zip, from its local header; None: let zipfile read it.

    The checks zipfile makes when it opens an entry are made here too: the local header is
    one, and names the entry the central directory names. Anything else (compressed,
    encrypted, sizes that disagree) goes through zipfile, which reads or refuses it by name.
    """
    if info.compress_type != zipfile.ZIP_STORED or info.flag_bits & 0x1 or info.compress_size != info.file_size:
        return None
    header = os.pread(raw, 30, info.header_offset)
    if len(header) != 30 or header[:4] != b"PK\x03\x04":
        raise ArchiveError(f"zip entry {info.filename!r} has no local header where the central directory says: the zip is "
                           f"corrupt; {_REMAKE}")
    name_len = int.from_bytes(header[26:28], "little")
    extra_len = int.from_bytes(header[28:30], "little")
    encoding = "utf-8" if info.flag_bits & 0x800 else "cp437"
    if os.pread(raw, name_len, info.header_offset + 30) != info.orig_filename.encode(encoding):
        raise ArchiveError(f"zip entry {info.filename!r} is named otherwise in its local header: the zip is corrupt or "
                           f"malicious; {_REMAKE}")
    start = info.header_offset + 30 + name_len + extra_len
    if start + info.file_size > os.fstat(raw).st_size:
        raise ArchiveError(f"zip entry {info.filename!r} runs past the end of the zip: the zip is truncated; {_REMAKE}")
    return start


class _ZipHasher:
    """The sha256 of a zip, taken in file order while it is extracted: copied entries from their copies, the rest from the zip."""

    def __init__(self, raw: int) -> None:
        self.raw = raw
        self.pos = 0
        self.digest = hashlib.sha256()

    def upto(self, end: int) -> None:
        """Hash the zip's own bytes from where the digest stands to ``end``."""
        while self.pos < end:
            chunk = os.pread(self.raw, min(COPY_CHUNK, end - self.pos), self.pos)
            if not chunk:
                break
            self.digest.update(chunk)
            self.pos += len(chunk)

    def copied(self, data: memoryview) -> None:
        """Hash the next bytes of the zip from the copy of them just written."""
        self.digest.update(data)
        self.pos += len(data)

    def check(self, expected: str, label: str) -> None:
        self.upto(os.fstat(self.raw).st_size)
        if (actual := self.digest.hexdigest()) != expected:
            raise StorageError(
                f"{label} is corrupt: its content hashes to sha256:{actual}, expected sha256:{expected}; the blob was "
                "changed or damaged in the store: `aicenter verify --repair SOURCE` rewrites it from a folder or zip that "
                "holds the original content; then run the task again"
            )


def _copy_stored(raw: int, start: int, info: zipfile.ZipInfo, target: Path, hasher: _ZipHasher | None = None) -> None:
    """Copy a stored entry to a new file with kernel_copy.copy_range and check its CRC from the copy.

    The bytes never pass through Python buffers (a 2 GB weights file: about 1 CPU s instead of
    3 through zipfile; where the kernel refuses the copy, through one buffer); the CRC, or the
    zip's digest (``hasher``), is still taken over every byte written, read back from the copy.
    """
    crc = 0

    def check(view: memoryview) -> None:
        nonlocal crc
        if hasher is not None:
            hasher.copied(view)
        else:
            crc = zlib.crc32(view, crc)

    out = os.open(target, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
    try:
        copied = copy_range(raw, out, src_offset=start, length=info.file_size, consume=check)
    finally:
        os.close(out)
    if copied != info.file_size:
        raise ArchiveError(f"zip entry {info.filename!r} ended after {copied} of {info.file_size} bytes: the zip is "
                           f"truncated; {_REMAKE}")
    if hasher is None and crc != info.CRC:
        raise ArchiveError(f"zip entry {info.filename!r} is corrupt (Bad CRC-32 for file {info.filename!r}): the zip "
                           f"was damaged (e.g. in transfer); {_REMAKE}, or upload it again")


def open_package(path: Path, workdir: Path) -> Path:
    """The package root of a folder, or of a zip extracted into ``workdir``."""
    path = Path(path)
    if path.is_dir():
        return find_package_root(path)
    if not path.exists():
        raise PackageError(f"package path {str(path)!r} does not exist: pass a package folder or a .zip of one")
    if path.suffix.lower() == ".zip" or zipfile.is_zipfile(path):
        return extract_zip(path, workdir)
    raise PackageError(f"package path {str(path)!r} is neither a folder nor a .zip file: pass the package folder or a zip of it")
