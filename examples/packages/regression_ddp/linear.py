"""The model and the data of the ``regression_ddp`` package, in plain Python (no dependency).

Data: CSV files with a header; every column but the last is a feature, the last is the target.
Model: ``y = w . x + b``, saved as ``./model.json`` (the working directory is the package root).
"""

from __future__ import annotations

import csv
import json
import os
import socket
import struct
import time
from pathlib import Path

MODEL_FILE = Path("model.json")


def read_csv_dir(folder: str) -> tuple[list[str], list[list[float]], list[float]]:
    """(feature names, rows, targets) of every ``*.csv`` under ``folder``, in sorted path order."""
    files = sorted(Path(folder).rglob("*.csv"))
    if not files:
        raise FileNotFoundError(f"no .csv file in {folder}: give a dataset of CSV files (last column = target)")
    header: list[str] = []
    xs: list[list[float]] = []
    ys: list[float] = []
    for path in files:
        with path.open(newline="") as fh:
            reader = csv.reader(fh)
            names = next(reader)
            if header and names != header:
                raise ValueError(f"{path.name} has columns {names}, the others {header}: use one header")
            header = names
            for line, row in enumerate(reader, 2):
                try:
                    values = [float(v) for v in row]
                except ValueError:
                    raise ValueError(f"{path.name} line {line}: {row} is not all numbers") from None
                xs.append(values[:-1])
                ys.append(values[-1])
    return header[:-1], xs, ys


def write_csv(path: Path, header: list[str], rows: list[list[float]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(header)
        writer.writerows(rows)


class LinearModel:
    def __init__(self, features: list[str], weights: list[float] | None = None, bias: float = 0.0) -> None:
        self.features = features
        self.weights = weights if weights is not None else [0.0] * len(features)
        self.bias = bias

    def predict_row(self, x: list[float]) -> float:
        return sum(w * v for w, v in zip(self.weights, x, strict=True)) + self.bias

    def gradient(self, xs: list[list[float]], ys: list[float]) -> tuple[list[float], float, float]:
        """Sums (not means) of the squared-error gradient over a shard, and its loss sum."""
        gw, gb, loss = [0.0] * len(self.weights), 0.0, 0.0
        for x, y in zip(xs, ys, strict=True):
            error = self.predict_row(x) - y
            loss += error * error
            for i, v in enumerate(x):
                gw[i] += 2 * error * v
            gb += 2 * error
        return gw, gb, loss

    def save(self, path: Path = MODEL_FILE) -> None:
        path.write_text(json.dumps({"features": self.features, "weights": self.weights, "bias": self.bias}))

    @classmethod
    def load(cls, path: Path = MODEL_FILE) -> LinearModel:
        data = json.loads(path.read_text())
        return cls(data["features"], data["weights"], data["bias"])


def r2(model: LinearModel, xs: list[list[float]], ys: list[float]) -> float:
    mean = sum(ys) / len(ys)
    total = sum((y - mean) ** 2 for y in ys) or 1.0
    residual = sum((model.predict_row(x) - y) ** 2 for x, y in zip(xs, ys, strict=True))
    return 1 - residual / total


class TcpAllReduce:
    """Sums a vector of floats over all ranks through rank 0 (what DDP's all-reduce does, without torch).

    Rank 0 listens on ``MASTER_ADDR:MASTER_PORT``; every other rank connects once. Each call:
    the others send their vector, rank 0 adds them to its own and sends the sum back.
    """

    def __init__(self, rank: int, world: int, addr: str, port: int, timeout: float = 300) -> None:
        self.rank, self.world = rank, world
        self.peers: list[socket.socket] = []
        if rank == 0:
            with socket.create_server((addr, port)) as server:
                server.settimeout(timeout)
                while len(self.peers) < world - 1:
                    conn, _ = server.accept()
                    conn.settimeout(timeout)
                    self.peers.append(conn)
        else:
            deadline = time.time() + timeout
            while True:
                try:
                    self.peers = [socket.create_connection((addr, port), timeout=timeout)]
                    break
                except OSError:
                    if time.time() > deadline:
                        raise
                    time.sleep(0.1)

    def sum(self, values: list[float]) -> list[float]:
        if self.rank == 0:
            total = list(values)
            for peer in self.peers:
                for i, v in enumerate(_receive(peer, len(values))):
                    total[i] += v
            for peer in self.peers:
                _send(peer, total)
            return total
        _send(self.peers[0], values)
        return _receive(self.peers[0], len(values))

    def close(self) -> None:
        for peer in self.peers:
            peer.close()


def _send(conn: socket.socket, values: list[float]) -> None:
    conn.sendall(struct.pack(f"<{len(values)}d", *values))


def _receive(conn: socket.socket, n: int) -> list[float]:
    size, data = 8 * n, b""
    while len(data) < size:
        chunk = conn.recv(size - len(data))
        if not chunk:
            raise ConnectionError("a peer rank closed its connection mid-training (it failed or was stopped)")
        data += chunk
    return list(struct.unpack(f"<{n}d", data))


def distributed() -> tuple[int, int, str, int]:
    """(rank, world size, master address, master port) from the variables the runtime sets."""
    return (int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1")),
            os.environ.get("MASTER_ADDR", "127.0.0.1"), int(os.environ.get("MASTER_PORT", "29500")))
