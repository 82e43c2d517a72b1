"""Running the ``aicenter`` command in tests: in this process through its entry function, or as the console script."""

from __future__ import annotations

import contextlib
import io
import os
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

AICENTER = str(Path(sys.executable).parent / "aicenter")


def _environment(env: dict[str, str] | None) -> dict[str, str]:
    """This process's environment without any store or S3 setting of its own, plus ``env``."""
    base = {k: v for k, v in os.environ.items() if not k.startswith(("AICENTER_", "AWS_"))}
    return {**base, **(env or {})}


def cli_process(args: Sequence[str], env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """The installed console script in a process of its own (what a user runs)."""
    return subprocess.run([AICENTER, *args], capture_output=True, text=True, env=_environment(env), timeout=120,
                          check=False)


def cli_in_process(args: Sequence[str], env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """The console script's entry function (``cli.main``) with the same argv and environment, in this process.

    A process start costs about 0.3 s, which most test calls spend only to reach ``main``; keep
    ``cli_process`` where the process itself matters (the environment read at start, the embedded
    Airflow default, the exit status the shell sees). Never use it for a command that reads Airflow:
    that would import Airflow into the test process.
    """
    from airflow_aicenter.cli import main

    saved = dict(os.environ)
    out, err = io.StringIO(), io.StringIO()
    try:
        os.environ.clear()
        os.environ.update(_environment(env))
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                code = main(list(args))
            except SystemExit as exc:  # argparse (usage errors, --help), as script() treats it
                if isinstance(exc.code, str):
                    print(exc.code, file=sys.stderr)
                code = exc.code if isinstance(exc.code, int) else int(exc.code is not None)
    finally:
        os.environ.clear()
        os.environ.update(saved)
    return subprocess.CompletedProcess([AICENTER, *args], code, out.getvalue(), err.getvalue())
