"""`aicenter package upload/list/download` as a user runs them: through the console script's entry function, and a few runs of the installed script itself."""

from __future__ import annotations

import json
import subprocess
import zipfile
from pathlib import Path

import pytest

from airflow_aicenter.registry import Registry
from airflow_aicenter.storage import open_store
from tests import cli_helpers
from tests.conftest import EXAMPLE_PACKAGE, write_files

MAIN_PY = "class Main:\n    def __init__(self):\n        pass\n    def predict(self, input):\n        return 1\n"


def cli_process(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return cli_helpers.cli_process(args, env)


def cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """In this process through ``cli.main`` (a process start was most of each call's time)."""
    return cli_helpers.cli_in_process(args, env)


def server_options(env: dict[str, str]):
    from airflow_aicenter.storage import S3Options

    return S3Options.from_env(env) if env else None


def test_upload_list_download_roundtrip(target, tmp_path):
    uri, env = target
    done = cli_process("--storage", uri, "package", "upload", str(EXAMPLE_PACKAGE), "--name", "churn", env=env)
    assert done.returncode == 0, done.stderr
    assert "Uploaded churn version 1.0" in done.stdout

    # the same content again makes no new major version: it is identical to 1.0 (exit 0, nothing written)
    again = cli("--storage", uri, "package", "upload", str(EXAMPLE_PACKAGE), "--name", "churn", env=env)
    assert again.returncode == 0, again.stderr
    assert "identical to churn 1.0" in again.stdout and "--force" in again.stdout and "2.0" not in again.stdout
    as_json = json.loads(cli("--storage", uri, "package", "upload", str(EXAMPLE_PACKAGE), "--name", "churn", "--json",
                             env=env).stdout)
    assert (as_json["version"], as_json["created"]) == ("1.0", False)
    assert Registry(open_store(uri, server_options(env))).latest_major("churn") == 1
    forced = cli("--storage", uri, "package", "upload", str(EXAMPLE_PACKAGE), "--name", "churn", "--force", env=env)
    assert forced.returncode == 0 and "Uploaded churn version 2.0" in forced.stdout, forced.stderr

    listed = json.loads(cli("--storage", uri, "package", "list", "--json", env=env).stdout)
    assert [(p["package"], p["latest"]) for p in listed] == [("churn", "2.0")]
    assert "churn" in cli("--storage", uri, "package", "list", env=env).stdout

    done = cli("--storage", uri, "package", "download", "churn:1.0", str(tmp_path / "out"), env=env)
    assert done.returncode == 0, done.stderr
    with zipfile.ZipFile(tmp_path / "out" / "churn-1.0.zip") as zf:
        assert {"main.py", "train.py", "requirements.txt", "aicenter.json"} <= set(zf.namelist())


def test_storage_from_environment_variable(tmp_path):
    uri = (tmp_path / "envstore").as_uri()
    done = cli_process("package", "upload", str(EXAMPLE_PACKAGE), "--name", "churn", env={"AICENTER_STORAGE": uri})
    assert done.returncode == 0, done.stderr
    assert Registry(open_store(uri)).resolve("churn", "latest").version == "1.0"


def test_upload_of_a_zip_with_one_root_folder(tmp_path):
    pkg = EXAMPLE_PACKAGE
    zpath = tmp_path / "churn.zip"
    with zipfile.ZipFile(zpath, "w") as zf:
        for f in sorted(pkg.rglob("*")):
            if f.is_file() and "__pycache__" not in f.parts:
                zf.write(f, f"churn/{f.relative_to(pkg).as_posix()}")
    uri = (tmp_path / "store").as_uri()
    done = cli("--storage", uri, "package", "upload", str(zpath), "--name", "churn")
    assert done.returncode == 0, done.stderr


def test_download_detects_a_corrupt_blob(tmp_path):
    uri = (tmp_path / "store").as_uri()
    record = Registry(open_store(uri)).upload(EXAMPLE_PACKAGE, "churn")
    blob = Path(open_store(uri).root) / "blobs" / "sha256" / record.blob.sha256
    blob.write_bytes(b"not the package")
    done = cli("--storage", uri, "package", "download", "churn:1.0", str(tmp_path / "out"))
    # a zip version's blob "is corrupt"; a per-file version's manifest (what uploads store now) "is damaged"
    assert done.returncode == 1 and ("is corrupt" in done.stderr or "is damaged" in done.stderr), done.stderr
    assert not (tmp_path / "out" / "churn-1.0.zip").exists()
    assert [p.name for p in (tmp_path / "out").iterdir()] == [], "no partial zip or staging folder is left"


@pytest.mark.parametrize("files, name, message", [
    ({"main.py": MAIN_PY}, "churn", "requirements.txt"),
    ({"requirements.txt": ""}, "churn", "main.py"),
    ({"main.py": "class Main(:\n", "requirements.txt": ""}, "churn", "main.py:1:"),
    ({"main.py": "class Main:\n    def __init__(self):\n        pass\n    def predict(self, input):\n        return 1\n",
      "requirements.txt": "", "train.py": "class Main:\n    def train(self, d)\n"}, "churn", "train.py:2:"),
    ({"main.py": "x = 1\n", "requirements.txt": ""}, "churn", "class Main"),
    ({"main.py": "class Main:\n    def __init__(self):\n        pass\n    def predict(self, input):\n        return 1\n",
      "requirements.txt": ""}, "class", "Python keyword"),
])
def test_upload_rejects_bad_packages_with_clear_errors(files, name, message, tmp_path):
    pkg = write_files(tmp_path / "pkg", files)
    uri = (tmp_path / "store").as_uri()
    done = cli("--storage", uri, "package", "upload", str(pkg), "--name", name)
    assert done.returncode == 1
    assert message in done.stderr, done.stderr
    assert not any((tmp_path / "store").rglob("*.json")), "nothing may be registered"


def test_unsafe_zip_is_refused(tmp_path):
    zpath = tmp_path / "evil.zip"
    with zipfile.ZipFile(zpath, "w") as zf:
        zf.writestr("main.py", MAIN_PY)
        zf.writestr("requirements.txt", "")
        zf.writestr("../escape.txt", "x")
    done = cli("--storage", (tmp_path / "store").as_uri(), "package", "upload", str(zpath), "--name", "churn")
    assert done.returncode == 1 and ".." in done.stderr
    assert not (tmp_path / "escape.txt").exists()


def test_download_needs_a_version_and_a_known_package(tmp_path):
    uri = (tmp_path / "store").as_uri()
    Registry(open_store(uri)).upload(EXAMPLE_PACKAGE, "churn")
    done = cli("--storage", uri, "package", "download", "churn", str(tmp_path / "out"))
    assert done.returncode == 1 and "NAME:VERSION" in done.stderr
    done = cli("--storage", uri, "package", "download", "ghost:1.0", str(tmp_path / "out"))
    assert done.returncode == 1 and "has no versions" in done.stderr
    assert f"in {uri}; upload it first with `aicenter package upload PATH --name ghost`" in done.stderr, "names the store"
    assert "(this command used the store" in done.stderr and "given with --storage" in done.stderr


def test_read_commands_never_create_a_store_only_writes_do(tmp_path):
    typo = tmp_path / "aicenter-typo"
    for args in (["package", "list"], ["package", "show", "churn"], ["runs", "list"], ["gc", "--dry-run"]):
        done = cli("--storage", typo.as_uri(), *args)
        assert done.returncode == 1, (args, done.stdout, done.stderr)
        assert f"there is no store at {typo.as_uri()}" in done.stderr and "aicenter package upload" in done.stderr, done.stderr
        assert not typo.exists(), f"`aicenter {' '.join(args)}` created the store"
    done = cli("--storage", typo.as_uri(), "package", "upload", str(EXAMPLE_PACKAGE), "--name", "churn")
    assert done.returncode == 0 and typo.is_dir(), done.stderr
    assert "churn" in cli("--storage", typo.as_uri(), "package", "list").stdout
    # with nothing configured, the embedded default ($AIRFLOW_HOME/aicenter) follows the same rule
    home = tmp_path / "airflow-home"
    done = cli_process("package", "list", env={"AIRFLOW_HOME": str(home), "AIRFLOW__CORE__LOAD_EXAMPLES": "False"})
    assert done.returncode == 1 and f"there is no store at {(home / 'aicenter').as_uri()}" in done.stderr, done.stderr


def test_a_mistyped_s3_prefix_is_an_error_like_a_mistyped_folder(s3_server, tmp_path):
    env = s3_server.env()
    bucket = s3_server.create_bucket()
    store = f"s3://{bucket}/aicenter"
    done = cli("--storage", store, "package", "upload", str(EXAMPLE_PACKAGE), "--name", "churn", env=env)
    assert done.returncode == 0, done.stderr
    assert "churn" in cli("--storage", store, "package", "list", env=env).stdout

    for args in (["package", "list"], ["runs", "list"], ["package", "show", "churn"], ["gc", "--dry-run"]):
        typo = cli("--storage", f"s3://{bucket}/aicentre", *args, env=env)
        assert typo.returncode == 1, (args, typo.stdout)
        assert f"there is no store at s3://{bucket}/aicentre (given with --storage)" in typo.stderr, typo.stderr
        assert "No packages yet" not in typo.stdout
    # a prefix that holds data, but not a store (the bucket's root here: only aicenter/ is in it)
    boto = __import__("boto3").client("s3", endpoint_url=s3_server.endpoint, region_name="us-east-1",
                                      aws_access_key_id="testing", aws_secret_access_key="testing-secret")
    boto.put_object(Bucket=bucket, Key="datasets/churn/a.csv", Body=b"x\n")
    other = cli("--storage", f"s3://{bucket}/datasets", "package", "list", env=env)
    assert other.returncode == 1 and "is not an aicenter store: it holds other data (churn)" in other.stderr, other.stderr
    folder = tmp_path / "not-a-store"
    (folder / "x").mkdir(parents=True)
    other = cli("--storage", folder.as_uri(), "runs", "list")
    assert other.returncode == 1 and "is not an aicenter store" in other.stderr


@pytest.mark.parametrize("damage", ["flipped", "truncated", "missing"])
def test_uploading_identical_content_again_repairs_its_blob(target, tmp_path, damage):
    """Issue 20, finding 1: the corruption error advises re-uploading the package, and identical content
    made no new version and never looked at the stored blob: re-uploading repaired nothing."""
    uri, env = target
    store = open_store(uri, server_options(env))
    first = cli("--storage", uri, "package", "upload", str(EXAMPLE_PACKAGE), "--name", "churn", env=env)
    assert first.returncode == 0, first.stderr
    record = Registry(store).get("churn", "1.0")
    key = f"blobs/sha256/{record.blob.sha256}"
    good = store.get_bytes(key)
    if damage == "missing":
        store.delete(key)
    else:
        store.put_bytes(key, good[:100] + bytes([good[100] ^ 1]) + good[101:] if damage == "flipped" else good[:-7])
    done = cli("--storage", uri, "package", "download", "churn:1.0", str(tmp_path / "out"), env=env)
    assert done.returncode == 1 and "package upload" in done.stderr and "verify --repair" in done.stderr, done.stderr

    again = cli("--storage", uri, "package", "upload", str(EXAMPLE_PACKAGE), "--name", "churn", env=env)
    assert again.returncode == 0, again.stderr
    found = "missing" if damage == "missing" else "damaged"
    assert f"churn 1.0 already stored; its blob was {found} and has been rewritten" in " ".join(again.stdout.split())
    assert store.get_bytes(key) == good
    assert Registry(store).latest_major("churn") == 1, "no new version"
    done = cli("--storage", uri, "package", "download", "churn:1.0", str(tmp_path / "out"), env=env)
    assert done.returncode == 0, done.stderr

    intact = json.loads(cli("--storage", uri, "package", "upload", str(EXAMPLE_PACKAGE), "--name", "churn", "--json",
                            env=env).stdout)
    assert (intact["version"], intact["created"], intact["repaired"]) == ("1.0", False, None)
