"""The ``requirements`` phase: pip-install the package's ``requirements.txt`` before the run.

Runs inside the training pod (or the local child process when asked for). A failing install
is reported as such ("installing requirements failed: ..."), never as a training error, so
the user knows to fix ``requirements.txt`` rather than ``train.py``.

Where packages go: outside a virtual environment (the runtime image's system Python, non-root)
``pip install --user`` puts them under ``$PYTHONUSERBASE`` / ``$HOME/.local``, which the
Kubernetes launcher points at the run's work volume, so a read-only root filesystem is fine.
Inside a virtual environment (a dedicated interpreter given to the local launcher with
``python=``) user installs are invisible, so they go into that environment itself.
No Airflow import: this module runs in the pod.
"""

from __future__ import annotations

import importlib
import site
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

from airflow_aicenter.errors import RunError

REQUIREMENTS = "requirements.txt"
#: pip output lines kept for the error message when the install fails.
TAIL = 12


class RequirementsError(RunError):
    """``pip install -r requirements.txt`` failed: a packaging problem, not a training error."""


def lists_requirements(path: Path) -> bool:
    """True when the file has at least one line that is not blank or a comment."""
    if not path.is_file():
        return False
    return any(line.strip() and not line.lstrip().startswith("#") for line in path.read_text(errors="replace").splitlines())


def in_virtualenv() -> bool:
    return sys.prefix != getattr(sys, "base_prefix", sys.prefix)


def pip_command(*, user: bool) -> list[str]:
    command = [sys.executable, "-m", "pip", "install", "--disable-pip-version-check", "--no-input", "--progress-bar", "off"]
    if user:
        command.append("--user")
    return [*command, "-r", REQUIREMENTS]


def install_requirements(root: Path, log: Callable[[str], None]) -> bool:
    """Install ``root/requirements.txt`` (cwd = package root, so relative paths in it work).

    Returns False when there was nothing to install. Makes freshly installed user packages
    importable in this already-running interpreter (the user site may not have existed at
    start-up, so Python did not put it on ``sys.path``).
    """
    if not lists_requirements(root / REQUIREMENTS):
        log("requirements.txt lists nothing to install")
        return False
    user = not in_virtualenv()
    command = pip_command(user=user)
    log(f"installing requirements: {' '.join(command[1:])}")
    try:
        process = subprocess.Popen(
            command, cwd=root, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, errors="replace", bufsize=1,
        )
    except OSError as exc:
        raise RequirementsError(f"installing requirements failed: could not start pip ({exc}); use an image with pip") from None
    tail: list[str] = []
    assert process.stdout is not None
    for line in process.stdout:
        print(f"[pip] {line.rstrip()}", file=sys.stderr, flush=True)
        if line.strip():
            tail = [*tail[-(TAIL - 1):], line.strip()]
    code = process.wait()
    if code != 0:
        errors = [line for line in tail if line.startswith("ERROR")] or tail[-1:]
        cause = " ".join(errors)[:800] or "no output"
        raise RequirementsError(
            f"installing requirements failed: pip exited with code {code}: {cause}; fix requirements.txt in the package, "
            "or build the requirements into the image and pass install_requirements=False"
        )
    if user:
        user_site = site.getusersitepackages()
        if user_site not in sys.path:
            site.addsitedir(user_site)
    importlib.invalidate_caches()
    return True
