"""A "real S3 link" on loopback: an HTTP/1.1 proxy that caps each connection's throughput and adds
first-byte latency, in front of a local S3 server (rclone serve s3 or moto).

    python benchmarks/shaped_link.py --upstream 127.0.0.1:PORT [--rate-mb 80] [--latency-ms 20] [--folder DIR]

Prints ``port N`` once it listens. On real S3 one connection moves roughly 50-100 MB/s and every
request waits tens of milliseconds for its first byte; on loopback a connection moves GB/s with
no wait, which hides both what concurrent ranged GETs win on large objects and what keeping many
small requests in flight wins. Per client connection the proxy:

- paces the body bytes of each direction to ``--rate-mb`` MB/s (a token bucket per direction);
- holds every response for ``--latency-ms`` before its first byte;
- keeps one upstream connection for it (HTTP/1.1 keep-alive on both sides, ``Expect:
  100-continue`` answered by the proxy itself).

``--folder``: rclone serve s3 ignores ``Range`` (it answers 200 with the whole object), so with
the folder rclone serves, the proxy answers a ranged GET itself from the same file (206, the
same bytes, the ETag the client pinned with If-Match, else one made of size and mtime), under the
same cap and latency. No authentication is checked on that path: it is a benchmark fixture, on
127.0.0.1 only. Every tool in a run goes through the same proxy, so each gets the same link.
"""

from __future__ import annotations

import argparse
import asyncio
import email.utils
import time
from pathlib import Path
from urllib.parse import unquote, urlsplit

#: Bytes moved per paced step: large enough that the proxy's own CPU is not the limit.
PIECE = 2**20


class Pace:
    """A token bucket of one direction of one connection: ``rate`` bytes per second on average.

    Up to BURST seconds of sending missed (a late wake-up on a busy machine) may be caught up,
    so the average holds at the cap instead of drifting below it with every oversleep.
    """

    BURST = 0.05

    def __init__(self, rate: float) -> None:
        self.rate = rate
        self.t = 0.0

    async def take(self, n: int) -> None:
        if not self.rate:
            return
        now = time.monotonic()
        self.t = max(self.t, now - self.BURST) + n / self.rate
        if self.t - now > 0.001:
            await asyncio.sleep(self.t - now)


class Link:
    def __init__(self, upstream: tuple[str, int], rate: float, latency: float, folder: Path | None) -> None:
        self.upstream, self.rate, self.latency, self.folder = upstream, rate, latency, folder

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None = None
        down, upload = Pace(self.rate), Pace(self.rate)
        try:
            while True:
                try:
                    head = await reader.readuntil(b"\r\n\r\n")
                except (asyncio.IncompleteReadError, ConnectionError):
                    return
                method, target, headers, lines = parse_head(head)
                if headers.get("expect", "").lower() == "100-continue":
                    writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
                    lines = [line for line in lines if not line.lower().startswith(b"expect:")]
                local = self.local_file(method, target, headers)
                if local is not None:
                    await self.serve_range(writer, local, headers, down)
                    continue
                if up is None:
                    up = await asyncio.open_connection(*self.upstream)
                up_reader, up_writer = up
                up_writer.write(b"\r\n".join(lines) + b"\r\n\r\n")
                await relay_body(reader, up_writer, headers, upload)
                await up_writer.drain()
                resp_head = await up_reader.readuntil(b"\r\n\r\n")
                status = int(resp_head.split(b" ", 2)[1])
                _, _, resp_headers, _ = parse_head(resp_head, response=True)
                await asyncio.sleep(self.latency)
                writer.write(resp_head)
                if method != "HEAD" and status not in (204, 304) and status >= 200:
                    await relay_body(up_reader, writer, resp_headers, down, until_close=True)
                await writer.drain()
                if "close" in (headers.get("connection", "").lower(), resp_headers.get("connection", "").lower()):
                    return
        except (ConnectionError, asyncio.IncompleteReadError):
            return
        finally:
            for w in (writer, up[1] if up else None):
                if w is not None:
                    w.close()

    def local_file(self, method: str, target: str, headers: dict[str, str]) -> Path | None:
        if self.folder is None or method != "GET" or "range" not in headers:
            return None
        path = self.folder / unquote(urlsplit(target).path).lstrip("/")
        return path if path.is_file() and path.resolve().is_relative_to(self.folder) else None

    async def serve_range(self, writer: asyncio.StreamWriter, path: Path, headers: dict[str, str], pace: Pace) -> None:
        st = path.stat()
        first, _, last = headers["range"].removeprefix("bytes=").partition("-")
        start, end = int(first), min(int(last) if last else st.st_size - 1, st.st_size - 1)
        etag = headers.get("if-match") or f'"{st.st_size:x}-{st.st_mtime_ns:x}"'
        head = (
            f"HTTP/1.1 206 Partial Content\r\nContent-Length: {end - start + 1}\r\n"
            f"Content-Range: bytes {start}-{end}/{st.st_size}\r\nAccept-Ranges: bytes\r\nETag: {etag}\r\n"
            f"Last-Modified: {email.utils.formatdate(st.st_mtime, usegmt=True)}\r\n"
            "Content-Type: application/octet-stream\r\n\r\n"
        )
        await asyncio.sleep(self.latency)
        writer.write(head.encode())
        await writer.drain()
        loop = asyncio.get_running_loop()
        with open(path, "rb") as fh:  # sendfile: the bytes never pass through Python
            pos = start
            while pos <= end:
                n = min(PIECE, end + 1 - pos)
                await pace.take(n)
                await loop.sendfile(writer.transport, fh, pos, n)
                pos += n


def parse_head(head: bytes, *, response: bool = False) -> tuple[str, str, dict[str, str], list[bytes]]:
    lines = head.rstrip(b"\r\n").split(b"\r\n")
    first = lines[0].decode("latin-1").split(" ", 2)
    headers: dict[str, str] = {}
    for line in lines[1:]:
        name, _, value = line.decode("latin-1").partition(":")
        headers[name.strip().lower()] = value.strip()
    if response:
        return "", "", headers, lines
    return first[0], first[1], headers, lines


async def relay_body(src: asyncio.StreamReader, dst: asyncio.StreamWriter, headers: dict[str, str], pace: Pace,
                     *, until_close: bool = False) -> None:
    """Copy one message body (Content-Length, chunked, or to the end for a response without either)."""
    if headers.get("transfer-encoding", "").lower() == "chunked":
        while True:
            size_line = await src.readuntil(b"\r\n")
            size = int(size_line.split(b";")[0], 16)
            dst.write(size_line)
            await copy(src, dst, size + 2, pace)  # the chunk and its CRLF
            if size == 0:
                return
    elif "content-length" in headers:
        await copy(src, dst, int(headers["content-length"]), pace)
    elif until_close:
        while piece := await src.read(PIECE):
            await pace.take(len(piece))
            dst.write(piece)
            await dst.drain()


async def copy(src: asyncio.StreamReader, dst: asyncio.StreamWriter, n: int, pace: Pace) -> None:
    while n > 0:
        piece = await src.read(min(PIECE, n))
        if not piece:
            raise ConnectionError("peer closed mid-body")
        await pace.take(len(piece))
        dst.write(piece)
        await dst.drain()
        n -= len(piece)


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--upstream", required=True, help="host:port of the S3 server")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--rate-mb", type=float, default=80.0, help="MB/s per connection and direction (0: no cap)")
    parser.add_argument("--latency-ms", type=float, default=20.0, help="wait before each response's first byte")
    parser.add_argument("--folder", type=Path, help="the folder rclone serves: ranged GETs are answered from it")
    args = parser.parse_args()
    host, _, port = args.upstream.rpartition(":")
    link = Link((host or "127.0.0.1", int(port)), args.rate_mb * 1e6, args.latency_ms / 1000,
                args.folder.resolve() if args.folder else None)
    server = await asyncio.start_server(link.serve, "127.0.0.1", args.port, limit=2**20, backlog=1024)
    print(f"port {server.sockets[0].getsockname()[1]}", flush=True)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    asyncio.run(main())
