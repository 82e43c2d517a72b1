"""Under ``run_as_user`` the end of a training does not hash the package files no one touched (issue 25).

The agent's own chown of the package folder to that user moves every file's change time, which
is what tells a staged file from a rewritten one; the files untouched right before that chown
stay known after it (storage/cache.py PlacedFiles.handing_over). Real: a root worker, a system
user, the local launcher.
"""

from __future__ import annotations

import pytest

from airflow_aicenter.records import Outcome, read
from airflow_aicenter.storage import open_store
from tests.packages import SAVES_WITHOUT_TOUCHING
from tests.runtime.test_run import setup_run
from tests.security import test_local_isolation
from tests.security.test_local_isolation import launch


def test_a_run_as_user_training_does_not_hash_the_files_it_never_touched(system_user, scratch, tmp_path, private_worker,
                                                                         monkeypatch: pytest.MonkeyPatch):
    # the worker as in test_local_isolation, with the runtime's lines (the task log) on its output
    monkeypatch.setattr(test_local_isolation, "WORKER", "import logging, sys\n"
                        "logging.basicConfig(level=logging.INFO, stream=sys.stdout)\n" + test_local_isolation.WORKER)
    store = open_store((scratch / "store").as_uri())
    _, spec = setup_run(store, tmp_path, train_py=SAVES_WITHOUT_TOUCHING)
    assert spec.blob.kind == "files"
    worker = launch(spec.model_copy(update={"install_requirements": True}), scratch, {}, private_worker.python,
                    run_as=system_user)
    assert worker.returncode == 0, worker.output[-3000:]
    outcome = read(store, f"{spec.run_prefix}/outcome.json", Outcome)
    assert outcome.status == "succeeded" and outcome.blob is not None
    # main.py, train.py, requirements.txt: staged, handed over to that user, untouched; model.txt is new
    assert "3 package files (" in worker.output and "untouched since staging: not read again" in worker.output, \
        worker.output[-3000:]
