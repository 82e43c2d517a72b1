"""Issue 18, finding 6: secrets in file names and in prediction errors.

A package that names an artifact, a checkpoint or a package file after a secret value (the
user's secret ``env`` value, or the store's own secret key) must not get that value into a
store key, a record, the UI or the log: the name is refused before anything is uploaded and
the run fails with an error that names the folder, not the value. ``predict()`` raising with
a secret (or returning one) must not leave any form of it in ``predictions/``.

Each run is a real runtime process (``python -m airflow_aicenter.runtime``); the whole store
is then read back, keys and bytes, and searched for every form of the secret.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from airflow_aicenter.records import Outcome, read
from airflow_aicenter.storage import Store, open_store
from tests.runtime.test_predict import setup_predict
from tests.runtime.test_run import run_runtime, setup_run
from tests.security.test_secrets import leaked

TOKEN = "tok-9f8e7d6c5b4a"  # the user's secret env value (API_TOKEN, a secret-looking key)
STORE_KEY = "testing-secret"  # the moto fixture's AWS_SECRET_ACCESS_KEY

NAMING = '''
import os

class Main:
    def __init__(self):
        pass
    def train(self, d):
        name = os.environ.get("NAME_FROM") or ""
        value = os.environ[name] if name in os.environ else {value}
        folder = os.environ[os.environ["WHERE"]] if os.environ["WHERE"] != "package" else "."
        os.makedirs(os.path.join(folder, "sub"), exist_ok=True)
        with open(os.path.join(folder, "sub", f"model-{{value}}.bin"), "w") as fh:
            fh.write("weights")
        with open(os.path.join(os.environ["artifacts_directory"], "fine.txt"), "w") as fh:
            fh.write("ok")
    def save(self):
        pass
'''


def everything(store: Store) -> str:
    """Every key and every object's content in the store, as one text to search."""
    parts = []
    for info in store.list(""):
        parts.append(info.key)
        parts.append(store.get_bytes(info.key).decode("utf-8", "replace"))
    return "\n".join(parts)


def s3_env_of(store: Store, request: pytest.FixtureRequest) -> dict[str, str]:
    return request.getfixturevalue("s3_env").env() if store.uri.startswith("s3://") else {}


@pytest.mark.parametrize("where", ["artifacts_directory", "checkpoint_directory", "package"])
def test_a_file_named_after_the_users_secret_is_refused(tmp_path: Path, where: str) -> None:
    store = open_store((tmp_path / "store").as_uri())
    _, spec = setup_run(store, tmp_path, train_py=NAMING.format(value="'unused'"),
                        checkpoint_prefix="runs/d/r/t/checkpoints/")
    spec.env.update(NAME_FROM="API_TOKEN", WHERE=where)
    done = run_runtime(spec, tmp_path, {"API_TOKEN": TOKEN})
    outcome = read(store, f"{spec.run_prefix}/outcome.json", Outcome)
    assert done.returncode == 1, done.stderr
    assert outcome.status == "failed" and outcome.blob is None
    folder = {"artifacts_directory": "artifacts_directory", "checkpoint_directory": "checkpoint_directory", "package": "package folder"}[where]
    assert "holds a secret value" in (outcome.error or "") and folder in (outcome.error or ""), outcome.error
    assert "rename" in (outcome.error or "")
    assert not leaked(everything(store), TOKEN), "a form of the secret reached the store"
    assert not leaked(done.stdout + done.stderr, TOKEN), "a form of the secret reached the log"
    assert not leaked(json.dumps(outcome.warnings), TOKEN)


def test_a_file_named_after_the_stores_secret_key_is_refused(tmp_path: Path, request: pytest.FixtureRequest) -> None:
    server = request.getfixturevalue("s3_server")
    store = open_store(f"s3://{server.create_bucket()}/aicenter", server.options)
    _, spec = setup_run(store, tmp_path, train_py=NAMING.format(value="'testing-' + 'secret'"))
    spec.env.update(WHERE="artifacts_directory")
    done = run_runtime(spec, tmp_path, s3_env_of(store, request))
    outcome = read(store, f"{spec.run_prefix}/outcome.json", Outcome)
    assert outcome.status == "failed", done.stderr
    assert "holds a secret value" in (outcome.error or "") and "artifacts" in (outcome.error or "")
    assert not leaked(everything(store), STORE_KEY)
    assert not leaked(done.stdout + done.stderr, STORE_KEY)


SECRET_LINES = 'first-line-SECRET\nsecond "line" \\ é-SECRET'

LEAKING = '''
import json, os, urllib.parse

class Main:
    def __init__(self):
        self.secret = os.environ["DB_PASSWORD"]
    def predict(self, input):
        s = self.secret
        if input == "raise":
            raise ValueError(f"cannot log in with {{s!r}} json={{json.dumps(s)}} url={{urllib.parse.quote(s)}} "
                             f"lines={{s.splitlines()[1]}}")
        return {{"echo": s, "url": urllib.parse.quote_plus(s)}}
'''


@pytest.mark.parametrize("input_type", ["json", "file"])
def test_prediction_errors_and_outputs_are_masked(store: Store, tmp_path: Path, request: pytest.FixtureRequest,
                                                  input_type: str) -> None:
    files = {"in.jsonl": "raise\nok\n"} if input_type == "json" else {"raise": "raise", "ok": "ok"}
    main = LEAKING if input_type == "json" else LEAKING.replace('input == "raise"', 'input == b"raise"')
    spec = setup_predict(store, tmp_path, files, main_py=main.format(), input_type=input_type,
                         user_env_names=["DB_PASSWORD"], max_failed=1)
    done = run_runtime(spec, tmp_path, {**s3_env_of(store, request), "DB_PASSWORD": SECRET_LINES})
    assert done.returncode == 0, done.stderr
    outcome = read(store, f"{spec.run_prefix}/outcome.json", Outcome)
    assert (outcome.predicted, outcome.failed) == (1, 1)
    predictions = [info.key for info in store.list(f"{spec.run_prefix}/predictions/")]
    assert predictions
    for key in predictions:
        text = store.get_bytes(key).decode()
        assert not leaked(text, SECRET_LINES), f"{key} holds the secret: {text}"
        assert "***" in text
        for line in text.splitlines():
            json.loads(line)  # still JSON Lines after masking
    assert not leaked(everything(store), SECRET_LINES)
    assert not leaked(done.stdout + done.stderr, SECRET_LINES)


LINKING = '''
import os

class Main:
    def __init__(self):
        pass
    def train(self, d):
        folder = os.environ[os.environ["WHERE"]]
        os.symlink("/etc/hostname", os.path.join(folder, "link-" + os.environ["API_TOKEN"]))
    def save(self):
        pass
'''


@pytest.mark.parametrize("where", ["artifacts_directory", "checkpoint_directory"])
def test_a_link_named_after_the_secret_leaves_no_trace_of_it(tmp_path: Path, where: str) -> None:
    """A link out of the folder is refused by the walk itself, whose error names it: masked everywhere."""
    store = open_store((tmp_path / "store").as_uri())
    _, spec = setup_run(store, tmp_path, train_py=LINKING, checkpoint_prefix="runs/d/r/t/checkpoints/",
                        checkpoint_interval=0.2)
    spec.env.update(WHERE=where)
    done = run_runtime(spec, tmp_path, {"API_TOKEN": TOKEN})
    outcome = read(store, f"{spec.run_prefix}/outcome.json", Outcome)
    assert outcome.status == "failed", done.stderr
    assert not leaked(everything(store), TOKEN), "a form of the secret reached the store"
    assert not leaked(done.stdout + done.stderr, TOKEN), "a form of the secret reached the log"


def test_json_lines_masking_covers_escaped_plain_broken_and_over_long_lines(tmp_path: Path) -> None:
    """The masking pass itself: each kind of line a prediction file can hold, memory bounded by ``limit``."""
    from airflow_aicenter.secrets import Redactor, redact_json_lines_file

    secret = SECRET_LINES
    lines = [
        json.dumps({"line": 1, "error": f"raised ValueError: {secret!r}"}),  # repr, escaped once more by JSON
        json.dumps({"line": 2, "output": "clean"}),
        "not json at all " + secret.splitlines()[0],
        json.dumps({"line": 4, "output": "x" * 5000 + secret + "y" * 5000}),  # over the limit below: as text
        json.dumps({"line": 5, "output": 7}),
    ]
    path = tmp_path / "p.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    assert redact_json_lines_file(path, Redactor([secret]), limit=4096)
    text = path.read_text(encoding="utf-8")
    assert not leaked(text, secret), text
    out = text.splitlines()
    assert len(out) == 5 and out[1] == lines[1] and out[4] == lines[4]
    assert json.loads(out[0])["error"] == "raised ValueError: '***'"
    assert out[2] == "not json at all ***"
    assert json.loads(out[3])["output"] == "x" * 5000 + "***" + "y" * 5000
    clean = tmp_path / "clean.jsonl"
    clean.write_text(lines[1] + "\n")
    assert not redact_json_lines_file(clean, Redactor([secret])) and clean.read_text() == lines[1] + "\n"
