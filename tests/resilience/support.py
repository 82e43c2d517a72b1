"""Helpers of the resilience tests: store invariants, runtime runs, a fault-injecting S3 proxy."""

from __future__ import annotations

import hashlib
import http.client
import random
import socket
import struct
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from airflow_aicenter.layout import BLOBS
from airflow_aicenter.package import Version
from airflow_aicenter.records import RunRef, RunSpec, VersionRecord, read
from airflow_aicenter.registry import Registry
from airflow_aicenter.storage import S3Options, Store, open_store
from airflow_aicenter.storage.transfer import run, upload_tree
from tests.conftest import RuntimeSpawner, write_files
from tests.packages import ECHO_MAIN

MAIN = ECHO_MAIN

# save() writes a model of MODEL_MB random megabytes (big enough that a timed kill lands
# inside the zip or its upload) and a few artifacts.
TRAIN = '''
import os

class Main:
    def __init__(self):
        pass
    def train(self, training_directory):
        self.n = len(os.listdir(training_directory))
    def save(self):
        with open("model.bin", "wb") as fh:
            for _ in range(int(os.environ.get("MODEL_MB", "1"))):
                fh.write(os.urandom(1 << 20))
        art = os.environ["artifacts_directory"]
        for i in range(5):
            with open(os.path.join(art, f"a{i}.txt"), "w") as fh:
                fh.write("artifact %d %d" % (i, self.n))
'''


def check_store(store: Store) -> list[str]:
    """The invariants a crash must never break; returns the versions of every package, sorted.

    - every blob's content hashes to its name: no partial or corrupt blob is visible;
    - every version record names a blob that exists with the recorded size;
    - version records parse (a record is whole or absent).
    """
    for info in store.list(BLOBS):
        digest = info.key[len(BLOBS):]
        data = store.get_bytes(info.key)
        assert hashlib.sha256(data).hexdigest() == digest, f"blob {info.key} is partial or corrupt ({len(data)} bytes)"
    versions = []
    for info in store.list("packages/"):
        if "/versions/" in info.key and info.key.endswith(".json"):
            record = read(store, info.key, VersionRecord)
            blob = store.head(BLOBS + record.blob.sha256)
            assert blob is not None, f"version {record.package}:{record.version} names a missing blob"
            assert blob.size == record.blob.size, f"version {record.package}:{record.version} blob size differs"
            versions.append(f"{record.package}:{record.version}")
    return sorted(versions, key=lambda v: (v.split(":")[0], Version.parse(v.split(":")[1])))


@dataclass
class Setup:
    store: Store
    registry: Registry
    base: VersionRecord
    dataset: str
    env: dict[str, str]

    def spec(self, try_number: int, *, task_id: str = "train", save_training_data: bool = True) -> tuple[RunRef, RunSpec]:
        ref = RunRef(dag_id="resilience", run_id="r1", task_id=task_id, try_number=try_number)
        ref.uri = self.store.url(ref.prefix)
        spec = RunSpec(
            pipeline="train", storage=self.store.uri, run_prefix=ref.prefix, package=self.base.package,
            version=self.base.version, blob=self.base.blob, dataset=self.dataset, save_training_data=save_training_data,
        )
        return ref, spec


def setup_package(store: Store, tmp_path: Path, env: dict[str, str], *, name: str = "res", files: int = 40) -> Setup:
    registry = Registry(store)
    pkg = write_files(tmp_path / "pkg", {"main.py": MAIN, "train.py": TRAIN, "requirements.txt": ""})
    base = registry.upload(pkg, name)
    data = write_files(tmp_path / "data", {f"part-{i:03d}.csv": f"x,y\n{i},{i * i}\n" * 50 for i in range(files)})
    run(upload_tree(data, store, "datasets/res"))
    return Setup(store, registry, base, store.url("datasets/res"), env)


def run_runtime(spec: RunSpec, tmp_path: Path, env: dict[str, str], timeout: int = 120) -> subprocess.CompletedProcess[str]:
    """The runtime as ``spawn_runtime`` runs it, with a work folder of its own under ``tmp_path``."""
    child_env = {**env, "AICENTER_WORKDIR": str(tmp_path / f"work-{spec.run_prefix.replace('/', '_')}")}
    return RuntimeSpawner(tmp_path / "runtime-specs").run(spec, child_env, timeout=timeout)


# -- a fault-injecting HTTP proxy --------------------------------------------------------
S3_SLOWDOWN = (b'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>SlowDown</Code>'
               b"<Message>Please reduce your request rate.</Message><RequestId>fault</RequestId></Error>")

S3_ACCESS_DENIED = (b'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>AccessDenied</Code>'
                    b"<Message>Access Denied</Message><RequestId>fault</RequestId></Error>")

#: Fault kinds: what the proxy does instead of (or after) forwarding one request.
#: slowdown: 503 SlowDown, nothing forwarded; reset: TCP RST before forwarding; hang: no
#: answer until the client times out; reset_after: forwarded (the server acted on it), then
#: RST instead of the answer; truncate: forwarded, then half the body and a close; denied: 403
#: AccessDenied, nothing forwarded (a bucket policy refusing that request, e.g. an overwrite
#: under create-only run credentials, which moto does not enforce).
FAULTS = ("slowdown", "reset", "hang", "reset_after", "truncate", "denied")


@dataclass
class FaultPlan:
    """Which requests get which fault: ``rules`` are (predicate, fault, how many times)."""

    rules: list[tuple[Callable[[str, str], bool], str, int]] = field(default_factory=list)
    rate: float = 0.0  # plus: each request gets a random fault (of ``random_faults``) with this probability
    random_faults: tuple[str, ...] = ("slowdown", "reset")
    seed: int = 0
    max_faults: int = 1000  # a bound: after this many, everything passes
    hang_seconds: float = 5.0

    def __post_init__(self) -> None:
        self._rng = random.Random(self.seed)
        self._left = [n for _, _, n in self.rules]
        self._lock = threading.Lock()
        self.injected: list[tuple[str, str, str]] = []

    def decide(self, method: str, path: str) -> str | None:
        with self._lock:
            if len(self.injected) >= self.max_faults:
                return None
            fault = None
            for i, (pred, kind, _) in enumerate(self.rules):
                if self._left[i] > 0 and pred(method, path):
                    self._left[i] -= 1
                    fault = kind
                    break
            if fault is None and self.rate and self._rng.random() < self.rate:
                fault = self._rng.choice(self.random_faults)
            if fault is not None:
                self.injected.append((fault, method, path))
            return fault


class FaultProxy:
    """A loopback HTTP/1.1 proxy in front of an S3 endpoint that injects the faults of a plan.

    Runs in a daemon thread on 127.0.0.1 (a free port); every request is bounded (a hang
    lasts ``plan.hang_seconds`` at most, and at most ``max_requests`` are served).
    """

    def __init__(self, upstream_port: int, plan: FaultPlan | None = None, max_requests: int = 200_000) -> None:
        self.upstream_port = upstream_port
        self.plan = plan or FaultPlan()
        self.requests = 0
        self.max_requests = max_requests
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: object) -> None:
                pass

            def handle_one_request(self) -> None:  # every method, one code path
                try:
                    self.raw_requestline = self.rfile.readline(65537)
                    if not self.raw_requestline or not self.parse_request():
                        self.close_connection = True
                        return
                    proxy.serve(self)
                except (ConnectionError, TimeoutError, OSError):
                    self.close_connection = True

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self._thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self._local = threading.local()

    def __enter__(self) -> FaultProxy:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()

    # -- one request ----------------------------------------------------------------------
    def serve(self, h: BaseHTTPRequestHandler) -> None:
        self.requests += 1
        length = int(h.headers.get("Content-Length") or 0)
        body = h.rfile.read(length) if length else b""
        if self.requests > self.max_requests:
            return self._reply(h, 503, S3_SLOWDOWN)
        fault = self.plan.decide(h.command, h.path)
        if fault == "slowdown":
            return self._reply(h, 503, S3_SLOWDOWN)
        if fault == "denied":
            return self._reply(h, 403, S3_ACCESS_DENIED)
        if fault == "reset":
            return self._reset(h)
        if fault == "hang":
            time.sleep(self.plan.hang_seconds)
            return self._reset(h)
        status, headers, data = self._forward(h, body)
        if fault == "reset_after":
            return self._reset(h)
        if fault == "truncate" and len(data) > 1:
            h.send_response(status)
            for k, v in headers:
                h.send_header(k, v)
            h.send_header("Content-Length", str(len(data)))
            h.send_header("Connection", "close")
            h.end_headers()
            h.wfile.write(data[: len(data) // 2])
            h.wfile.flush()
            h.close_connection = True
            return self._reset(h)
        h.send_response(status)
        for k, v in headers:
            h.send_header(k, v)
        if h.command != "HEAD":
            h.send_header("Content-Length", str(len(data)))
        h.end_headers()
        if h.command != "HEAD":
            h.wfile.write(data)

    def _forward(self, h: BaseHTTPRequestHandler, body: bytes) -> tuple[int, list[tuple[str, str]], bytes]:
        conn = getattr(self._local, "conn", None)
        for attempt in range(2):  # a pooled upstream connection may have gone stale
            if conn is None:
                conn = http.client.HTTPConnection("127.0.0.1", self.upstream_port, timeout=60)
                self._local.conn = conn
            try:
                conn.putrequest(h.command, h.path, skip_host=True, skip_accept_encoding=True)
                for k, v in h.headers.items():
                    if k.lower() not in ("content-length", "connection", "transfer-encoding"):
                        conn.putheader(k, v)
                conn.putheader("Content-Length", str(len(body)))
                conn.endheaders(body)
                resp = conn.getresponse()
                data = resp.read()
                drop = ("connection", "transfer-encoding", "server", "date")
                if h.command != "HEAD":  # a HEAD's Content-Length is the object's size: keep it
                    drop += ("content-length",)
                headers = [(k, v) for k, v in resp.getheaders() if k.lower() not in drop]
                return resp.status, headers, data
            except (ConnectionError, http.client.HTTPException, OSError):
                conn.close()
                conn = self._local.conn = None
                if attempt:
                    raise
        raise AssertionError("unreachable")

    def _reply(self, h: BaseHTTPRequestHandler, status: int, body: bytes) -> None:
        h.send_response(status)
        h.send_header("Content-Type", "application/xml")
        h.send_header("Content-Length", str(len(body)))
        h.end_headers()
        if h.command != "HEAD":
            h.wfile.write(body)

    @staticmethod
    def _reset(h: BaseHTTPRequestHandler) -> None:
        """Close with RST (SO_LINGER 0): the client sees 'connection reset by peer'."""
        h.close_connection = True
        try:
            h.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        except OSError:
            pass


#: Client timeouts short enough that a hung request costs a second, not two minutes.
TIMEOUT_S = 1


class QuickTimeouts(S3Options):
    timeout = f"{TIMEOUT_S}s"

    def client_options(self) -> dict:
        return {**super().client_options(), "timeout": self.timeout, "connect_timeout": self.timeout}


class QuickerTimeouts(QuickTimeouts):
    """For a single request at a time (no queue behind a busy proxy): a hang costs half a second."""

    timeout = "500ms"


def make_setup(request, tmp_path, backend: str, point: str = "") -> Setup:
    env = {"MODEL_MB": "24" if point.startswith("package_upload+") else "1"}
    if backend == "file":
        # The file store snapshots 80 small files in well under 0.05 s on a quiet machine: a timed kill
        # inside the snapshot needs more of them to land there.
        files = 2000 if point.startswith("snapshot+") else 80
        return setup_package(open_store((tmp_path / "store").as_uri()), tmp_path, env, files=files)
    server = request.getfixturevalue("s3_server")
    store = open_store(f"s3://{server.create_bucket()}/aicenter", server.options)
    return setup_package(store, tmp_path, {**server.env(), **env}, files=80)

