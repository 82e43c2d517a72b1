"""kernel_copy.copy_range: the one copier of the file store, the blob cache and zip extraction.

Real files; the pipeline (a helper thread copies chunk k+1 while the caller hashes chunk k) is
made to run on small files by lowering its thresholds.
"""

from __future__ import annotations

import errno
import hashlib
import os
import threading
import time
import zlib

import pytest

from airflow_aicenter import kernel_copy
from airflow_aicenter.kernel_copy import CopyStopped, copy_range

CHUNK = 65536


@pytest.fixture
def small_chunks(monkeypatch):
    """Chunks of 64 KiB, the pipeline from 2 chunks on: many chunks and the helper thread on a 1 MB file."""
    monkeypatch.setattr(kernel_copy, "COPY_CHUNK", CHUNK)
    monkeypatch.setattr(kernel_copy, "PIPELINE_MIN", 2 * CHUNK)


def _open_pair(tmp_path, data: bytes) -> tuple[int, int]:
    (tmp_path / "src").write_bytes(data)
    src = os.open(tmp_path / "src", os.O_RDONLY)
    dst = os.open(tmp_path / "dst", os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
    return src, dst


@pytest.mark.parametrize("size", [0, 1, CHUNK - 1, CHUNK, 2 * CHUNK + 1, 16 * CHUNK + 7])
@pytest.mark.parametrize("offset", [0, 4097], ids=["from-start", "unaligned-range"])
def test_every_size_is_copied_and_consumed_exactly(tmp_path, small_chunks, size, offset):
    data = os.urandom(offset + size + 100)
    src, dst = _open_pair(tmp_path, data)
    digest = hashlib.sha256()
    try:
        n = copy_range(src, dst, src_offset=offset, length=size, consume=digest.update)
    finally:
        os.close(src)
        os.close(dst)
    want = data[offset:offset + size]
    assert n == size
    assert (tmp_path / "dst").read_bytes() == want
    assert digest.hexdigest() == hashlib.sha256(want).hexdigest()


def test_a_range_past_the_end_copies_what_is_there(tmp_path, small_chunks):
    """A truncated zip entry: fewer bytes come back than asked (the caller names it truncated)."""
    data = os.urandom(5 * CHUNK)
    src, dst = _open_pair(tmp_path, data)
    crc = [0]
    try:
        n = copy_range(src, dst, src_offset=CHUNK, length=10 * CHUNK,
                       consume=lambda v: crc.__setitem__(0, zlib.crc32(v, crc[0])))
    finally:
        os.close(src)
        os.close(dst)
    assert n == 4 * CHUNK and crc[0] == zlib.crc32(data[CHUNK:])


def test_the_copy_runs_ahead_of_the_check_in_another_thread(tmp_path, small_chunks, monkeypatch):
    """Chunk k+1 is copied while chunk k is consumed: the copies are made by a helper thread, ahead of the consumer."""
    data = os.urandom(12 * CHUNK)
    src, dst = _open_pair(tmp_path, data)
    real = os.copy_file_range
    copied_by: set[str] = set()
    copies = []

    def copy(*args):
        copied_by.add(threading.current_thread().name)
        n = real(*args)
        copies.append(n)
        return n

    ahead = []
    consumed = [0]

    def consume(view: memoryview) -> None:
        ahead.append(sum(copies) - consumed[0])  # bytes copied but not yet consumed, when this piece is
        consumed[0] += len(view)
        time.sleep(0.002)

    monkeypatch.setattr(os, "copy_file_range", copy)
    try:
        assert copy_range(src, dst, consume=consume) == len(data)
    finally:
        os.close(src)
        os.close(dst)
    assert copied_by == {"kernel-copy"}
    assert max(ahead) > CHUNK, "the copy ran more than the chunk being checked ahead"
    assert max(ahead) <= (kernel_copy.AHEAD + 2) * CHUNK, "and never far: page cache, not memory"
    assert (tmp_path / "dst").read_bytes() == data


@pytest.mark.parametrize("pipelined", [True, False])
def test_a_kernel_refusal_midway_finishes_through_a_buffer(tmp_path, monkeypatch, pipelined):
    monkeypatch.setattr(kernel_copy, "COPY_CHUNK", CHUNK)
    monkeypatch.setattr(kernel_copy, "PIPELINE_MIN", 2 * CHUNK if pipelined else 2**40)
    data = os.urandom(7 * CHUNK + 3)
    src, dst = _open_pair(tmp_path, data)
    real = os.copy_file_range
    calls = []

    def refuse_after_two(*args):
        calls.append(args)
        if len(calls) > 2:
            raise OSError(errno.EXDEV, "Invalid cross-device link")
        return real(*args)

    monkeypatch.setattr(os, "copy_file_range", refuse_after_two)
    digest = hashlib.sha256()
    try:
        assert copy_range(src, dst, consume=digest.update) == len(data)
    finally:
        os.close(src)
        os.close(dst)
    assert digest.hexdigest() == hashlib.sha256(data).hexdigest()
    assert (tmp_path / "dst").read_bytes() == data


def test_a_copy_error_in_the_helper_is_raised_and_nothing_copies_after(tmp_path, small_chunks, monkeypatch):
    data = os.urandom(10 * CHUNK)
    src, dst = _open_pair(tmp_path, data)
    real = os.copy_file_range
    calls = []

    def fail_third(*args):
        calls.append(args)
        if len(calls) == 3:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(*args)

    monkeypatch.setattr(os, "copy_file_range", fail_third)
    try:
        with pytest.raises(OSError, match="No space left"):
            copy_range(src, dst, consume=hashlib.sha256().update)
    finally:
        os.close(src)
        os.close(dst)
    assert len(calls) == 3
    assert threading.active_count() == 1 or "kernel-copy" not in {t.name for t in threading.enumerate()}


def test_a_failing_check_stops_the_helper_before_returning(tmp_path, small_chunks, monkeypatch):
    """The consumer fails at chunk 2 (a disk error reading the copy back): the helper is stopped, no write follows."""
    data = os.urandom(40 * CHUNK)
    src, dst = _open_pair(tmp_path, data)
    seen = []

    def consume(view: memoryview) -> None:
        seen.append(len(view))
        if len(seen) == 2:
            raise OSError(errno.EIO, "Input/output error")

    try:
        with pytest.raises(OSError, match="Input/output"):
            copy_range(src, dst, consume=consume)
        size = os.fstat(dst).st_size
        time.sleep(0.05)
        assert os.fstat(dst).st_size == size < len(data)  # the helper ran at most a few chunks ahead, then stopped
    finally:
        os.close(src)
        os.close(dst)
    assert "kernel-copy" not in {t.name for t in threading.enumerate()}


@pytest.mark.parametrize("pipelined", [True, False])
def test_stop_ends_the_copy_between_chunks(tmp_path, monkeypatch, pipelined):
    monkeypatch.setattr(kernel_copy, "COPY_CHUNK", CHUNK)
    monkeypatch.setattr(kernel_copy, "PIPELINE_MIN", 2 * CHUNK if pipelined else 2**40)
    data = os.urandom(40 * CHUNK)
    src, dst = _open_pair(tmp_path, data)
    stop = threading.Event()

    def consume(view: memoryview) -> None:
        stop.set()

    try:
        with pytest.raises(CopyStopped):
            copy_range(src, dst, consume=consume, stop=stop)
    finally:
        os.close(src)
        os.close(dst)
    assert (tmp_path / "dst").stat().st_size < len(data)
