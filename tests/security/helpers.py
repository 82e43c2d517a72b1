"""Helpers of the attack tests, shared by their fixtures (conftest.py) and test modules."""

from __future__ import annotations

import zipfile
from pathlib import Path

from airflow_aicenter.package.archive import RATIO_MIN_SIZE
from tests.packages import MAIN


def small_entry_bomb(path: Path, entries: int = 1000) -> Path:
    """``entries`` entries of 1 MiB of zeros each: none is ratio-checked on its own."""
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED, compresslevel=9) as zf:
        zf.writestr("pkg/main.py", MAIN)
        zf.writestr("pkg/requirements.txt", "")
        for i in range(entries):
            zf.writestr(f"pkg/zeros/{i:04d}.bin", bytes(RATIO_MIN_SIZE))
    return path


BOMB_ENTRIES = 300
"""The reported bomb had 1,000 entries (1 GiB from 1.1 MB); 300 show the same and build faster."""

SECRET = "agent-secret-4a1f9c"
#: What the agent's environment holds and nothing package-supplied may see.
AGENT_ENV = {"AWS_SECRET_ACCESS_KEY": SECRET, "AWS_ACCESS_KEY_ID": "AKIAAGENT", "AIRFLOW_CONN_STORE": f"s3://x:{SECRET}@h",
             "USER_PARAM_TOKEN": SECRET}

