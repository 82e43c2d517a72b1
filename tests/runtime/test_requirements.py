"""The runtime's ``requirements`` phase: when it installs, how, and how a failure reads.

Real installs run in the pod tests (tests/operators/test_kubernetes_launcher.py), inside the
airflow-free runtime venv; nothing here installs into this project's environment.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from airflow_aicenter.runtime import requirements
from airflow_aicenter.runtime.requirements import RequirementsError, install_requirements, lists_requirements, pip_command


@pytest.mark.parametrize("text, expected", [
    ("", False),
    ("\n  \n", False),
    ("# No dependencies: this package uses the Python standard library only.\n", False),
    ("  # indented comment\n\n", False),
    ("numpy==2.1.0\n", True),
    ("# pinned\n--index-url https://pypi.internal/simple\n", True),
])
def test_lists_requirements(tmp_path: Path, text: str, expected: bool) -> None:
    (tmp_path / "requirements.txt").write_text(text)
    assert lists_requirements(tmp_path / "requirements.txt") is expected
    assert lists_requirements(tmp_path / "missing.txt") is False


def test_pip_goes_to_the_user_site_outside_a_virtualenv() -> None:
    """The runtime image: system Python, non-root, HOME on the work volume -> --user."""
    assert pip_command(user=True)[:4] == [sys.executable, "-m", "pip", "install"]
    assert "--user" in pip_command(user=True) and "--user" not in pip_command(user=False)
    assert pip_command(user=True)[-2:] == ["-r", "requirements.txt"]


def test_nothing_to_install_runs_no_pip(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "requirements.txt").write_text("# none\n")
    monkeypatch.setattr(subprocess, "Popen", lambda *a, **k: pytest.fail("pip must not run"))
    said: list[str] = []
    assert install_requirements(tmp_path, said.append) is False
    assert said == ["requirements.txt lists nothing to install"]


def test_a_failing_install_names_the_requirement_problem(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # An unparsable line fails inside pip before anything is downloaded or installed.
    (tmp_path / "requirements.txt").write_text("# deps\nnot a requirement ===\n")
    monkeypatch.setattr(requirements, "in_virtualenv", lambda: True)  # never --user into this machine's home
    with pytest.raises(RequirementsError) as failed:
        install_requirements(tmp_path, lambda message: None)
    message = str(failed.value)
    assert message.startswith("installing requirements failed: pip exited with code 1: ERROR: Invalid requirement")
    assert message.endswith("or build the requirements into the image and pass install_requirements=False")
