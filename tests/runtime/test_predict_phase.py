"""The fixed costs of batch prediction's ``user_code`` phase: what it pays beyond the predict loop.

The supervisor must see a user process end as soon as it ends: polling every 50 ms added 25 ms
on average to every run's phase (5% of a 10,000-input batch of 50 µs predicts, the whole margin
of the issue 25 target). Real processes, the agent's supervisor.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import pytest

from airflow_aicenter.runtime.supervisor import Supervisor, supervise

SLEEPS = '''
import os, sys, time
time.sleep(float(sys.argv[2]))
with open(sys.argv[1], "w") as fh:
    fh.write('{"ok": true}')
os._exit(0)  # as user.py ends
'''


def entry(tmp_path: Path, seconds: float) -> dict[str, object]:
    script = tmp_path / "sleeps.py"
    script.write_text(SLEEPS)
    result = tmp_path / "result.json"
    return {"label": "rank 0", "argv": [sys.executable, str(script), str(result), str(seconds)], "cwd": str(tmp_path),
            "env": {}, "result": str(result)}


def test_the_supervisors_wait_wakes_when_a_user_process_ends_not_before(tmp_path: Path) -> None:
    """One wait, woken by the end itself (its pidfd), neither a poll that comes back early nor one that comes late."""
    sup = Supervisor({"processes": []}, sys.stdout, sys.stderr)
    user = sup.start(entry(tmp_path, 0.5))
    try:
        began = time.monotonic()
        sup.pause([user])
        waited = time.monotonic() - began
        assert user.poll() is not None, f"the wait came back after {waited:.3f} s, before the process ended"
        assert waited < 0.95, f"the wait took {waited:.3f} s for a process of 0.5 s: it slept its whole slice"
    finally:
        sup.stop()
        sup.join()
        sup.close()
    assert user.pidfd is None, "closed once the run is over"



def test_without_pidfds_the_supervisor_polls(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A kernel without pidfd_open (before 5.3), or a seccomp filter refusing it: the run goes on, polled."""
    monkeypatch.delattr(os, "pidfd_open")
    record = supervise({"processes": [entry(tmp_path, 0.2)]})
    assert record["status"] == "succeeded", record
