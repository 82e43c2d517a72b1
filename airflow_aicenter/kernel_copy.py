"""The one copier of file bytes between two open files: in the kernel, each chunk read back from the copy.

Three callers copy whole files or ranges of them: the file store's reads and puts
(storage/store.py ``copy_hashed``: a blob staged into a cache or a work folder, a file stored as
a blob), the blob cache's copies into package folders (storage/cache.py), and the extraction of
a zip's stored entries (package/archive.py). Each used to write its own ``copy_file_range``
loop; this is the one, imported by both ``storage/`` and ``package/`` (it imports neither, nor
anything but the standard library).

How: ``copy_file_range`` moves each chunk in the kernel (a reflink on file systems that share
extents, an in-kernel copy elsewhere: the bytes never pass through Python). A caller that checks
the bytes (a sha256, a zip CRC) gets each chunk read back from the *destination*, so what is
verified is what was written: through one small buffer (READ_BUFFER) that stays in the CPU's
cache, not through a mapping of the file: hashing 1.5 GB read that way took 1.05 CPU-s, through
read-only mappings 1.41 (the page faults of a mapping cost more than the copy into a cached
buffer). Where the kernel refuses (another file system on an old kernel, a file system without
it) the rest goes through one buffer: read once, checked, written.

Pipelined: checking costs more than copying (sha256 about 1.1 GB/s a core here, the kernel copy
about 3 GB/s), so for a file of PIPELINE_MIN or more a helper thread copies chunk k+1 while the
caller checks chunk k (both release the GIL), at most AHEAD chunks ahead: a 1.5 GB file is then
bound by its hash alone instead of by the hash plus the copy.
"""

from __future__ import annotations

import errno
import os
import queue
import threading
from collections.abc import Callable

#: Bytes one copy_file_range call moves: the copy runs this far ahead of the check, a chunk at a time.
COPY_CHUNK = 16 * 2**20
#: From this many bytes on, the copy runs a chunk ahead of the check in a helper thread (smaller: one thread).
PIPELINE_MIN = 2 * COPY_CHUNK
#: Chunks the copy may run ahead of the check: they wait in the page cache, not in memory of ours.
AHEAD = 4
#: Bytes of the copy read back at a time for the check: small enough to stay in a core's cache.
READ_BUFFER = 256 * 2**10
#: copy_file_range is refused for this pair of files: the rest goes through a buffer.
NO_KERNEL_COPY = frozenset({errno.EXDEV, errno.ENOSYS, errno.EOPNOTSUPP, errno.EINVAL})


class CopyStopped(Exception):
    """copy_range was asked to stop between two chunks (the transfer it serves was cancelled or failed)."""


Consumer = Callable[[memoryview], object]


def copy_range(
    src: int, dst: int, *, src_offset: int = 0, length: int | None = None, consume: Consumer | None = None,
    stop: threading.Event | None = None,
) -> int:
    """Copy ``length`` bytes (None: to the end) of the open file ``src`` from ``src_offset`` to ``dst`` from its start.

    Returns the bytes copied: fewer than ``length`` only where ``src`` ended first (the caller
    decides whether that is truncation). ``consume`` is called with every copied chunk in order,
    read back from ``dst`` (then ``dst`` must be open read-write) in pieces of READ_BUFFER or,
    past a refused kernel copy, as the buffer written; a view valid during the call only. A set ``stop``
    ends the copy between two chunks with CopyStopped. Reads until end of file when ``length``
    is None, so a file that shrank or grew meanwhile is consumed as it was copied.
    """
    if consume is not None:
        size = os.fstat(src).st_size - src_offset if length is None else length
        if size >= PIPELINE_MIN:
            return _pipelined(src, dst, src_offset, length, consume, stop)
    pos = 0
    buf = None
    while True:
        if stop is not None and stop.is_set():
            raise CopyStopped
        want = COPY_CHUNK if length is None else min(COPY_CHUNK, length - pos)
        if want <= 0:
            return pos
        n = _kernel_copy(src, dst, want, src_offset + pos, pos)
        if n is None:
            return _buffered(src, dst, src_offset, pos, length, consume, stop)
        if not n:
            return pos
        if consume is not None:
            buf = buf if buf is not None else memoryview(bytearray(min(READ_BUFFER, n)))
            read_back(dst, pos, n, consume, buf)
        pos += n


def _kernel_copy(src: int, dst: int, count: int, src_at: int, dst_at: int) -> int | None:
    """One copy_file_range call: the bytes moved, or None where the kernel refuses this pair of files."""
    try:
        return os.copy_file_range(src, dst, count, src_at, dst_at)
    except OSError as exc:
        if exc.errno not in NO_KERNEL_COPY:
            raise
        return None


def read_back(dst: int, pos: int, n: int, consume: Consumer, buf: memoryview | None = None) -> None:
    """Hand ``consume`` bytes [pos, pos + n) of ``dst``, just written, read back through ``buf`` (READ_BUFFER).

    Also how a ranged download hashes its parts from the file they were written to (storage/transfer.py).
    """
    if buf is None:
        buf = memoryview(bytearray(READ_BUFFER))
    end = pos + n
    while pos < end:
        got = os.preadv(dst, [buf[:min(len(buf), end - pos)]], pos)
        if not got:
            raise OSError(errno.EIO, f"the copy ended at byte {pos}, before the {n} bytes just copied to it (truncated "
                                     "meanwhile?)")
        with buf[:got] as piece:
            consume(piece)
        pos += got


def _buffered(
    src: int, dst: int, src_offset: int, pos: int, length: int | None, consume: Consumer | None,
    stop: threading.Event | None,
) -> int:
    """The rest of the copy from ``pos`` through one buffer (the kernel refused): read once, consumed, written."""
    buf = bytearray(COPY_CHUNK)
    with memoryview(buf) as view:
        while True:
            if stop is not None and stop.is_set():
                raise CopyStopped
            want = COPY_CHUNK if length is None else min(COPY_CHUNK, length - pos)
            if want <= 0:
                return pos
            n = os.preadv(src, [view[:want]], src_offset + pos)
            if not n:
                return pos
            with view[:n] as chunk:
                if consume is not None:
                    consume(chunk)
                written = 0
                while written < n:
                    written += os.pwrite(dst, chunk[written:], pos + written)
            pos += n


def _pipelined(
    src: int, dst: int, src_offset: int, length: int | None, consume: Consumer, stop: threading.Event | None,
) -> int:
    """copy_range for a large file: a helper thread copies ahead while this one consumes, chunk by chunk, in order.

    The helper posts each (position, bytes) it copied (0 bytes: the end), or where the kernel
    refused (None bytes), or its error; this thread consumes in order and finishes a refused copy
    through a buffer. Whatever ends the copy early (an error on either side, ``stop``) stops the
    helper before this returns or raises, so nothing writes to ``dst`` after that.
    """
    done: queue.Queue[tuple[int, int | None] | Exception] = queue.Queue(maxsize=AHEAD)
    quit_ = threading.Event()

    def post(item: tuple[int, int | None] | Exception) -> bool:
        while not quit_.is_set():
            try:
                done.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def copier() -> None:
        pos = 0
        try:
            while not quit_.is_set():
                if stop is not None and stop.is_set():
                    post(CopyStopped())
                    return
                want = COPY_CHUNK if length is None else min(COPY_CHUNK, length - pos)
                n = _kernel_copy(src, dst, want, src_offset + pos, pos) if want > 0 else 0
                if not post((pos, n)) or not n:
                    return
                pos += n
        except Exception as exc:  # noqa: BLE001 - handed to the consuming thread, which raises it
            post(exc)

    buf = memoryview(bytearray(READ_BUFFER))
    helper = threading.Thread(target=copier, name="kernel-copy", daemon=True)
    helper.start()
    try:
        while True:
            try:
                item = done.get(timeout=1.0)
            except queue.Empty:
                if helper.is_alive() or not done.empty():
                    continue
                raise RuntimeError("the kernel copy's helper thread ended without a result") from None
            if isinstance(item, Exception):
                raise item
            pos, n = item
            if n is None:
                return _buffered(src, dst, src_offset, pos, length, consume, stop)
            if not n:
                return pos
            read_back(dst, pos, n, consume, buf)
    finally:
        quit_.set()
        helper.join()
