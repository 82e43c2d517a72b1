"""The ``aicenter`` command imports Airflow only when it must read the connection from Airflow (issue 24 item 7d).

Importing Airflow cost each call 1.8 s and 145 MB. Given a store (``--storage``,
``AICENTER_STORAGE``) or no store at all (``package validate``), no Airflow module may load. The
check reads Python's own import log (``PYTHONPROFILEIMPORTTIME``) of the installed console
script, not a timing: ``benchmarks/bench_cli.py`` measures the time and memory.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import EXAMPLE_PACKAGE

AICENTER = str(Path(sys.executable).parent / "aicenter")


def imported(args: list[str], env: dict[str, str]) -> tuple[subprocess.CompletedProcess[str], set[str]]:
    """The command's result and every module it imported (from ``-X importtime``'s log on stderr)."""
    base = {k: v for k, v in os.environ.items() if not k.startswith(("AICENTER_", "AWS_", "AIRFLOW"))}
    done = subprocess.run([AICENTER, *args], capture_output=True, text=True, timeout=120, check=False,
                          env={**base, "PYTHONPROFILEIMPORTTIME": "1", **env})
    modules = {line.rsplit("|", 1)[1].strip() for line in done.stderr.splitlines() if line.startswith("import time:")}
    assert "airflow_aicenter.cli" in modules, "the import log was not read"
    return done, modules


def airflow_modules(modules: set[str]) -> list[str]:
    return sorted(m for m in modules if m == "airflow" or m.startswith("airflow."))


@pytest.mark.parametrize("command", [["package", "list"], ["package", "show", "churn"], ["runs", "list"],
                                     ["package", "show", "chrun"]])
def test_a_given_store_needs_no_airflow(store_uri: str, tmp_path: Path, command: list[str]) -> None:
    home = {"AIRFLOW_HOME": str(tmp_path / "home")}  # set, so a stray import would find a home, not fail early
    for args, env in (([f"--storage={store_uri}", *command], home), (command, {**home, "AICENTER_STORAGE": store_uri})):
        done, modules = imported(args, env)
        assert done.returncode in (0, 1) and "error: there is no store" not in done.stderr, done.stderr[-2000:]
        assert not airflow_modules(modules), f"{args}: imported {airflow_modules(modules)[:5]}"
    assert not (tmp_path / "home").exists(), "nothing of Airflow's was touched"


def test_validate_needs_no_airflow(tmp_path: Path) -> None:
    done, modules = imported(["package", "validate", str(EXAMPLE_PACKAGE)], {"AIRFLOW_HOME": str(tmp_path / "home")})
    assert done.returncode == 0, done.stderr[-2000:]
    assert not airflow_modules(modules)


def test_without_a_store_airflow_is_read_for_the_connection(tmp_path: Path) -> None:
    """The control: with no store given the connection comes from Airflow, so the log does show Airflow's import."""
    home = tmp_path / "home"
    home.mkdir()
    done, modules = imported(["package", "list"], {"AIRFLOW_HOME": str(home)})
    assert "airflow" in modules, done.stderr[-2000:]
