"""Every `aicenter` command, given bad input, says what is wrong and how to fix it in one line: no traceback.

Issue 20, finding 5: ``aicenter package download p:1.0 /proc/x`` ended in a raw traceback, as did
other operating-system errors (a path this user may not read, a file where a folder is meant, a
store folder that cannot be made), a number that is not one (``--grace-hours nan``), and any
text from a record or a run's cause holding rich markup (``[/bold]``). The documented exit
codes (docs/cli.md): 0 done, 1 an error or a problem found, 2 a malformed command line.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.cli_helpers import cli_in_process
from tests.conftest import EXAMPLE_PACKAGE

AICENTER = str(Path(sys.executable).parent / "aicenter")


def aicenter(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith(("AICENTER_", "AWS_"))}
    return subprocess.run([AICENTER, *args], capture_output=True, text=True, env={**base, "COLUMNS": "200", **(env or {})},
                          timeout=120, check=False)


#: (arguments; {tmp} is the scratch folder), exit code, what stderr must say
BAD_INPUTS = [
    ("package download churn:1.0 /proc/x", 1, "cannot download into /proc/x"),
    ("package download churn:1.0 {tmp}/afile/x", 1, "is a file, not a folder"),
    ("package download churn:1.0 {tmp}/afile", 1, "is a file, not a folder"),
    ("package download churn:1.0 /sys/x", 1, "cannot download into /sys/x"),
    ("package upload /proc/1/root --name q", 1, "/proc/1/root"),
    ("package validate /proc/1/root", 1, "/proc/1/root"),
    ("package upload {tmp}/afile --name q", 1, "neither a folder nor a .zip"),
    ("package show churn:9.9", 1, "has no version 9.9"),
    ("package show ../x", 1, "invalid package name"),
    ("package promote churn:1.0 --alias ../x", 1, "invalid alias name"),
    ("runs show dag/run2/train/1", 1, "is not a valid Outcome record"),
    ("runs show nosuch", 1, "no run 'nosuch'"),
    ("runs compare nosuch other", 1, "no run 'nosuch'"),
    ("gc --grace-hours nan", 2, "--grace-hours: 'nan' is not a number of hours"),
    ("gc --grace-hours inf", 2, "--grace-hours: 'inf' is not a number of hours"),
    ("gc --grace-hours -1", 2, "--grace-hours: '-1' is negative"),
    ("runs list --status bad", 2, "invalid choice"),
    ("--storage file:///proc/1/root/x package list", 1, "cannot open the store at file:///proc/1/root/x"),
    ("--storage file:///sys/aicenter package upload {example} --name q", 1, "cannot open the store at file:///sys/aicenter"),
    ("--storage http://x package list", 1, "is not supported"),
    ("package promote churn:9.9 --alias production", 1, "has no version 9.9"),
    ("package list --bogus", 2, "unrecognized arguments"),
    ("verify --repair {tmp}/nothere", 1, "repair source"),
    ("verify --repair /proc/1/root", 1, "cannot read the repair source /proc/1/root"),
]


@pytest.mark.parametrize(("command", "code", "message"), BAD_INPUTS, ids=[c for c, _, _ in BAD_INPUTS])
def test_bad_input_is_one_clear_line(stored: tuple[str, Path], command: str, code: int, message: str) -> None:
    uri, tmp = stored
    args = command.format(tmp=tmp, example=EXAMPLE_PACKAGE).split()
    # in this process through cli.main (same argv and environment): the script itself is run below
    done = cli_in_process(args, env={"AICENTER_STORAGE": uri, "COLUMNS": "200"})
    assert "Traceback" not in done.stderr and "Traceback" not in done.stdout, done.stderr
    assert done.returncode == code, (done.returncode, done.stderr)
    assert message in done.stderr, done.stderr
    if code == 1:
        errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
        assert len(errors) == 1, done.stderr


def test_markup_in_records_is_shown_as_text(stored: tuple[str, Path]) -> None:
    """A run's cause or env (package code writes them) holding ``[/bold]`` is text, not rich markup."""
    uri, _ = stored
    env = {"AICENTER_STORAGE": uri}
    listed = aicenter("runs", "list", env=env)
    assert listed.returncode == 1 and "Traceback" not in listed.stderr, listed.stderr  # run2 is damaged: left out
    assert "[/bold] in [red]column[/red" in listed.stdout, listed.stdout
    assert "run dag/run2/train/1 left out" in listed.stderr
    shown = aicenter("runs", "show", "dag/run1/train/1", env=env)
    assert shown.returncode == 0 and "[/bold] in [red]column[/red" in shown.stdout, shown.stderr
    compared = aicenter("runs", "compare", "dag/run1/train/1", "dag/run1/train/1", env=env)
    assert compared.returncode == 0 and "env.[/x]" in compared.stdout, compared.stderr


def test_debug_shows_the_traceback(stored: tuple[str, Path]) -> None:
    uri, _ = stored
    done = aicenter("--debug", "package", "download", "churn:1.0", "/proc/x", env={"AICENTER_STORAGE": uri})
    assert done.returncode == 1 and "Traceback" in done.stderr and "cannot download into /proc/x" in done.stderr
    done = aicenter("package", "download", "churn:1.0", "/proc/x", env={"AICENTER_STORAGE": uri, "AICENTER_DEBUG": "1"})
    assert "Traceback" in done.stderr


def test_a_broken_airflow_configuration_is_one_line(tmp_path: Path) -> None:
    """No store given: the connection is read through Airflow, whose configuration may not even parse."""
    (tmp_path / "airflow.cfg").write_text("[core\nx")
    done = aicenter("package", "list", env={"AIRFLOW_HOME": str(tmp_path)})
    assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr
    assert "the aicenter_default connection could not be read through Airflow (MissingSectionHeaderError" in done.stderr
    assert "--storage URI" in done.stderr and len(done.stderr.strip().splitlines()) == 1, done.stderr
