"""The user process's prediction loop writes the same bytes, whatever the loop's internals.

The loop in ``runtime/user.py`` is the hot path of batch prediction and gets tuned for speed
(batched reads and writes). What it writes must not change: every output line, every error
line, the line numbers, the blank lines skipped, the counts and the first error. The expected
bytes in ``predict_golden.json`` were written by the loop as it was before it was batched::

    .venv/bin/python -m tests.runtime.test_predict_bytes   # rewrites predict_golden.json

(run it only when the output format changes on purpose). Each case runs ``user.py`` as the agent
does: by path, in a process of its own, with an instructions file.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from airflow_aicenter.runtime import user
from tests.runtime.predict_bytes import CASES, GOLDEN, outputs


@pytest.mark.parametrize("case", list(CASES))
def test_outputs_are_the_bytes_the_unbatched_loop_wrote(written: dict[str, Any], case: str) -> None:
    expected = json.loads(GOLDEN.read_text())[case]
    got = written[case]
    for rel, want in expected["files"].items():
        assert rel in got["files"], f"{case}: {rel} was not written"
        assert got["files"][rel]["head"] == want["head"], f"{case}: {rel} starts differently"
        assert (got["files"][rel]["size"], got["files"][rel]["sha256"]) == (want["size"], want["sha256"]), rel
    assert sorted(got["files"]) == sorted(expected["files"])
    assert got["result"] == expected["result"]
    assert got["printed"] == expected["printed"]


if __name__ == "__main__":
    import tempfile

    with tempfile.TemporaryDirectory() as folder:
        GOLDEN.write_text(json.dumps(outputs(Path(folder), Path(user.__file__)), indent=1, ensure_ascii=False) + "\n")
    print(f"wrote {GOLDEN}")
