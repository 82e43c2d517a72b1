"""The prediction-loop cases of ``test_predict_bytes``: a package, its inputs, and what ``user.py`` wrote for each."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

from airflow_aicenter.runtime import user

GOLDEN = Path(__file__).with_name("predict_golden.json")

MAIN = '''
import json


class Main:
    def __init__(self):
        self.calls = 0

    def predict(self, input):
        self.calls += 1
        if isinstance(input, bytes):
            return {"size": len(input), "head": input[:4].hex()}
        if input.startswith("raise "):
            raise ValueError(input[6:] + "\\nsecond line of the message")
        if input == "exit":
            raise SystemExit(3)
        if input == "set":
            return {1, 2}
        if input == "nan":
            return float("nan")
        if input.startswith("big "):
            return "y" * int(input[4:])
        if input == "none":
            return None
        if input == "echo":
            return input
        row = json.loads(input)
        return {"n": row.get("n"), "call": self.calls, "text": row.get("text"), "ratio": row.get("n", 0) / 7}
'''


def edge_lines() -> bytes:
    """Every kind of line the loop treats apart: blank, white, CRLF, not UTF-8, failing, odd outputs."""
    rows = [
        b'{"n": 1, "text": "plain"}\n',
        b"\n",
        b"   \t \n",
        b'{"n": 2, "text": "crlf"}\r\n',
        b"\r\n",
        b"\r\n\r\n",
        b"\x0c\x1c\n",  # str.isspace: no input
        b'{"n": 3, "text": "caf\xc3\xa9 \xe2\x82\xac \xf0\x9f\x98\x80 \\"quoted\\" \\u0000"}\n',
        b"\xff\xfe not utf-8\n",
        b'{"n": 4, "text": "\xc3"}\n',  # cut UTF-8 sequence
        b"raise first\n",
        b"not json at all\n",
        b"exit\n",
        b"set\n",
        b"nan\n",
        b"raise fifth\n",
        b"none\n",
        b"echo\n",
        b'{"n": 5, "text": "a\\nb\\u2028c"}\n',
        b"big 70000\n",
        b'{"n": 6, "text": "inner\rcarriage"}\n',
        b'  {"n": 7, "text": "leading spaces"}  \n',
        b'{"n": 8, "text": "last line, no newline"}',
    ]
    return b"".join(rows)


def many_lines(count: int) -> bytes:
    """Many ordinary lines with a failure and a blank line now and then: batches of any size end inside them."""
    rows = []
    for n in range(count):
        if n % 997 == 5:
            rows.append(b"raise in the middle %d\n" % n)
        elif n % 1009 == 7:
            rows.append(b"\n")
        elif n % 2503 == 11:
            rows.append(b"big %d\n" % (50_000 + n))
        else:
            rows.append(json.dumps({"n": n, "text": "t" * (n % 50)}).encode() + b"\n")
    return b"".join(rows)


def dataset(root: Path) -> Path:
    data = root / "data"
    files = {"edge.jsonl": edge_lines(), "sub/many.jsonl": many_lines(6000), "empty.jsonl": b"",
             "long.jsonl": b'{"n": 9, "text": "' + b"L" * (3 << 20) + b'"}\n{"n": 10}\n',
             "img/one.bin": bytes(range(256)) * 3, "two.txt": b"hello", "raise me.txt": b"raise x"}
    for rel, content in files.items():
        (data / rel).parent.mkdir(parents=True, exist_ok=True)
        (data / rel).write_bytes(content)
    return data


#: Each case: one user process's share (``inputs`` as the agent writes them) and its input type.
CASES: dict[str, tuple[str, list[list[Any]]]] = {
    "one process": ("json", [["edge.jsonl", 0, sys.maxsize], ["empty.jsonl", 0, sys.maxsize],
                             ["long.jsonl", 0, sys.maxsize], ["sub/many.jsonl", 0, sys.maxsize]]),
    "first share": ("json", [["edge.jsonl", 0, 23], ["sub/many.jsonl", 0, 2500]]),
    "middle share": ("json", [["sub/many.jsonl", 2500, 2501]]),
    "last share": ("json", [["sub/many.jsonl", 2501, 6000], ["long.jsonl", 1, 2]]),
    "a share inside blank lines": ("json", [["edge.jsonl", 1, 7]]),
    "files": ("file", [["img/one.bin"], ["two.txt"]]),
}


def run_case(root: Path, data: Path, input_type: str, inputs: list[list[Any]], script: Path) -> dict[str, Any]:
    """Run ``script`` (``user.py``) by path on one share; what it wrote: output files, result (less its timing), stderr."""
    pkg, out = root / "pkg", root / "out"
    pkg.mkdir(parents=True, exist_ok=True)
    (pkg / "main.py").write_text(MAIN)
    instructions = root / "instructions.json"
    instructions.write_text(json.dumps({
        "root": str(pkg), "module": "main", "result": str(root / "result.json"), "parent": None, "steps": [],
        "predict": {"input_type": input_type, "data": str(data), "out": str(out), "inputs": inputs},
        "writable": None, "lib": None}))
    done = subprocess.run([sys.executable, str(script), str(instructions)], capture_output=True, text=True,
                          timeout=120, check=False)
    assert done.returncode == 0, done.stderr
    result = json.loads((root / "result.json").read_text())
    assert result.pop("predict_seconds") >= 0
    files = {}
    for path in sorted(p for p in out.rglob("*") if p.is_file()):
        content = path.read_bytes()
        files[path.relative_to(out).as_posix()] = {
            "sha256": hashlib.sha256(content).hexdigest(), "size": len(content),
            # the start of each file in clear, so that a difference can be read
            "head": content[:3000].decode("utf-8", "replace"),
        }
    # The printed tracebacks (the first three failures): where each one was, not the temporary paths.
    printed = [line.split(": Traceback")[0] for line in done.stderr.splitlines() if ": Traceback" in line]
    return {"files": files, "result": result, "printed": printed}


def outputs(tmp: Path, script: Path) -> dict[str, Any]:
    data = dataset(tmp)
    return {name: run_case(tmp / f"case-{i}", data, kind, inputs, script)
            for i, (name, (kind, inputs)) in enumerate(CASES.items())}


def small_batches(folder: Path) -> Path:
    """``user.py`` with blocks of 97 bytes: every block and output boundary falls inside the inputs above."""
    source = Path(user.__file__).read_text()
    assert source.count("\nBATCH_BYTES = ") == 1, "user.py no longer sets BATCH_BYTES: update this test"
    script = folder / "user.py"
    script.write_text(source.replace("\nBATCH_BYTES = ", "\nBATCH_BYTES = 97  # ", 1))
    return script
