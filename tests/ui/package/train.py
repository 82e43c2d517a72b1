"""Training entry point of the UI tests' ML package: writes a text, a CSV and a PNG artifact.

``FAIL_IN`` (env) names a method that raises, so a test gets a failed run of the same package.
``SLOW_EPOCHS`` (env) makes ``train`` report that many epochs with ``aicenter.report``, ``EPOCH_SECONDS`` apart
(a run in progress for the live page).
"""

import json
import os
import struct
import time
import zlib
from pathlib import Path


def _png(width, height, rgb):
    """A solid-colour PNG, made with the standard library only."""
    raw = b"".join(b"\x00" + bytes(rgb) * width for _ in range(height))

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b"")


class Main:
    def __init__(self):
        self.artifacts = Path(os.environ.get("artifacts_directory", "artifacts"))  # noqa: SIM112 (AI Center names it so)
        self.artifacts.mkdir(parents=True, exist_ok=True)
        self.values = []

    def _check(self, method):
        if os.environ.get("FAIL_IN") == method:
            raise RuntimeError(f"{method} failed on purpose (FAIL_IN={method})")

    def _read(self, directory):
        for path in sorted(Path(directory).rglob("*.csv")):
            for line in path.read_text().splitlines()[1:]:
                self.values.append(float(line.split(",")[1]))

    def process_data(self, input_directory):
        self._check("process_data")
        for name in ("training_data_directory", "evaluation_data_directory"):
            out = Path(os.environ[name])
            out.mkdir(parents=True, exist_ok=True)
            for path in Path(input_directory).glob("*.csv"):
                (out / path.name).write_text(path.read_text())

    def train(self, training_directory):
        epochs = int(os.environ.get("SLOW_EPOCHS", "0"))
        for epoch in range(1, epochs + 1):
            time.sleep(float(os.environ.get("EPOCH_SECONDS", "1")))
            print(f"epoch {epoch}/{epochs} loss={1 / epoch:.3f}", flush=True)
            try:
                import aicenter

                aicenter.report(step=epoch, total=epochs, loss=1 / epoch, accuracy=1 - 0.5 / epoch)
            except ImportError:
                pass
        print(f"training on {training_directory}", flush=True)
        self._check("train")
        self._read(training_directory)
        self.threshold = sum(self.values) / len(self.values)
        (self.artifacts / "metrics.txt").write_text(f"rows: {len(self.values)}\nthreshold: {self.threshold:.3f}\n")
        with open(self.artifacts / "predictions.csv", "w") as f:
            f.write("row,value,positive\n")
            for i, v in enumerate(self.values):
                f.write(f"{i},{v},{v > self.threshold}\n")
        (self.artifacts / "plots").mkdir(exist_ok=True)
        (self.artifacts / "plots" / "chart.png").write_bytes(_png(24, 16, (1, 124, 238)))
        (self.artifacts / "report.md").write_text(
            f"# Training report\n\nThreshold **{self.threshold:.3f}** over {len(self.values)} rows.\n\n"
            "| row | value |\n|---|---|\n" + "".join(f"| {i} | {v} |\n" for i, v in enumerate(self.values))
            + "\n<script>window.__markdownScript = 1</script>\n\n[a bad link](javascript:window.__markdownLink=1)\n")
        (self.artifacts / "plots" / "loss.svg").write_text(
            '<svg xmlns="http://www.w3.org/2000/svg" width="120" height="60"><script>parent.__svgScript = 1</script>'
            '<polyline points="0,10 40,35 80,45 120,50" fill="none" stroke="#017cee" stroke-width="3"/></svg>')

    def evaluate(self, evaluation_directory):
        self._check("evaluate")
        return 0.8133333333333334

    def save(self):
        Path("model.json").write_text(json.dumps({"threshold": self.threshold}))
