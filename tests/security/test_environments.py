"""Package environments run no package code with credentials, and no package reaches another's (issue 18 findings 2, 4).

DESIGN "★ Environments". Real uv, real virtual environments, real stores (file and the moto S3
server), and a real source distribution with an in-tree build backend served from a PEP 503
index folder: its backend and the ``.pth`` file of the wheel it builds write ``os.environ`` to a
spy file each time they run, so the tests see exactly what package code saw and when.
"""

from __future__ import annotations

import json
import os
import subprocess
import tarfile
import textwrap
from pathlib import Path
from typing import Any, cast

import pytest

from airflow_aicenter.errors import RequirementsError
from airflow_aicenter.layout import env_key
from airflow_aicenter.records import read, write
from airflow_aicenter.runtime.environment import (
    INSTALL_INHERITED,
    Environment,
    EnvironmentRecord,
    _pack,
    environment_key,
    prepare_environment,
    requirement_material,
)
from airflow_aicenter.runtime.user import landlock_abi
from airflow_aicenter.storage import Store
from airflow_aicenter.storage.transfer import put_blob
from tests.runtime.test_environment import imports_tiny, package, simple_index, tiny_wheel
from tests.security.helpers import AGENT_ENV, SECRET

BACKEND = '''
import json, os, zipfile

SPY = {spy!r}


def _log(what):
    """What this hook sees; and whether it could write outside the build's folders (the spy file)."""
    seen = {{"what": what, "uid": os.getuid(), "gid": os.getgid(), "groups": os.getgroups(), "env": dict(os.environ)}}
    try:
        with open(os.path.join(SPY, "build.jsonl"), "a") as f:
            f.write(json.dumps(seen) + "\\n")
        seen["escape"] = "written"
    except OSError as exc:
        seen["escape"] = type(exc).__name__
    return seen


def get_requires_for_build_wheel(config_settings=None):
    _log("requires")
    return []


def prepare_metadata_for_build_wheel(directory, config_settings=None):
    _log("metadata")
    info = os.path.join(directory, "evilproj-1.0.dist-info")
    os.makedirs(info)
    with open(os.path.join(info, "METADATA"), "w") as f:
        f.write("Metadata-Version: 2.1\\nName: evilproj\\nVersion: 1.0\\n")
    return "evilproj-1.0.dist-info"


def build_wheel(directory, config_settings=None, metadata_directory=None):
    seen = _log("build")
    pth = ("import json, os; open(os.path.join(%r, 'pth.jsonl'), 'a').write("
           "json.dumps({{'argv': __import__('sys').argv, 'env': dict(os.environ)}}) + chr(10))\\n" % SPY)
    name = "evilproj-1.0-py3-none-any.whl"
    with zipfile.ZipFile(os.path.join(directory, name), "w") as whl:
        whl.writestr("evilproj.pth", pth)
        whl.writestr("evilproj/__init__.py", "VALUE = 'built'\\n")
        whl.writestr("evilproj/seen.json", json.dumps(seen))
        whl.writestr("evilproj-1.0.dist-info/METADATA", "Metadata-Version: 2.1\\nName: evilproj\\nVersion: 1.0\\n")
        whl.writestr("evilproj-1.0.dist-info/WHEEL",
                     "Wheel-Version: 1.0\\nGenerator: tests\\nRoot-Is-Purelib: true\\nTag: py3-none-any\\n")
        whl.writestr("evilproj-1.0.dist-info/RECORD", "")
    return name
'''


def evil_index(folder: Path, spy: Path) -> str:
    """A PEP 503 index holding only an sdist of ``evilproj`` whose in-tree backend spies; its file:// URL."""
    spy.mkdir(parents=True, exist_ok=True)
    source = folder / "src" / "evilproj-1.0"
    source.mkdir(parents=True)
    (source / "pyproject.toml").write_text(textwrap.dedent("""\
        [build-system]
        requires = []
        build-backend = "backend"
        backend-path = ["."]

        [project]
        name = "evilproj"
        version = "1.0"
        """))
    (source / "backend.py").write_text(BACKEND.format(spy=str(spy)))
    page = folder / "simple" / "evilproj"
    page.mkdir(parents=True)
    with tarfile.open(page / "evilproj-1.0.tar.gz", "w:gz") as tar:
        tar.add(source, arcname="evilproj-1.0")
    (page / "index.html").write_text('<html><body><a href="evilproj-1.0.tar.gz">evilproj-1.0.tar.gz</a></body></html>\n')
    return (folder / "simple").as_uri()


def built(env: Environment) -> dict[str, Any]:
    """What the build backend saw while it built the installed wheel (it ships it in the wheel)."""
    seen = next((env.python.parent.parent / "lib").glob("python*/site-packages/evilproj/seen.json"))
    return cast(dict[str, Any], json.loads(seen.read_text()))


def spied(spy: Path, name: str) -> list[dict[str, object]]:
    path = spy / name
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def leaks(entries: list[dict[str, object]]) -> list[str]:
    """What of the agent's environment package code saw."""
    found = []
    for entry in entries:
        env = entry["env"]
        assert isinstance(env, dict)
        found += [f"{k}={v}" for k, v in env.items() if SECRET in v or k.startswith(("AWS_", "AIRFLOW_", "USER_PARAM"))]
    return found


# -- finding 2: installing runs package code with the agent's credentials ----------------------
def test_installing_runs_no_package_code_with_the_agents_credentials(
        store: Store, tmp_path: Path, agent_env: dict[str, str]) -> None:
    spy = tmp_path / "spy"
    index = evil_index(tmp_path / "mirror", spy)
    root = package(tmp_path / "pkg", "evilproj==1.0\n")
    try:
        env = prepare_environment(root, store, cache_dir=tmp_path / "cache", indexes=[index], log=lambda m: None)
        env.finish(lambda m: None)
    except RequirementsError:
        pass
    assert leaks(spied(spy, "build.jsonl")) == [], "the build backend saw the agent's credentials"
    assert leaks(spied(spy, "pth.jsonl")) == [], "the wheel's .pth ran with the agent's credentials"


def test_a_source_distribution_is_refused_by_default_with_the_fix(store: Store, tmp_path: Path, agent_env: dict[str, str]) -> None:
    spy = tmp_path / "spy"
    index = evil_index(tmp_path / "mirror", spy)
    root = package(tmp_path / "pkg", "evilproj==1.0\n")
    with pytest.raises(RequirementsError) as info:
        prepare_environment(root, store, cache_dir=tmp_path / "cache", indexes=[index], log=lambda m: None)
    message = str(info.value)
    assert "evilproj" in message and "only as a source distribution" in message, message
    assert "allow_source_builds=True" in message and "wheel" in message, message
    assert spied(spy, "build.jsonl") == [], "nothing of the package ran"
    assert not any(store.list("envs/"))


def test_allowed_source_builds_run_without_credentials_and_are_cached_per_package(
        store: Store, tmp_path: Path, agent_env: dict[str, str]) -> None:
    spy = tmp_path / "spy"
    index = evil_index(tmp_path / "mirror", spy)
    a, b = package(tmp_path / "a", "evilproj==1.0\n"), package(tmp_path / "b", "evilproj==1.0\n")
    said: list[str] = []
    env = prepare_environment(a, store, cache_dir=tmp_path / "cache", indexes=[index], log=said.append,
                              allow_source_builds=True, package="pkg-a")
    env.finish(said.append)
    seen = built(env)
    assert seen["what"] == "build" and leaks([seen]) == []
    inherited = {k for k in seen["env"] if k in os.environ and seen["env"][k] == os.environ[k]}
    assert inherited <= INSTALL_INHERITED, inherited - INSTALL_INHERITED
    if landlock_abi() > 0:  # confined to its own folders: the spy file outside them cannot be written
        assert seen["escape"] == "PermissionError" and spied(spy, "build.jsonl") == [], seen["escape"]
    else:
        assert any("not confined" in line for line in said), said
    assert leaks(spied(spy, "pth.jsonl")) == [], "byte-compiling ran the .pth with the agent's credentials"
    assert spied(spy, "pth.jsonl") == [], "byte-compiling runs no .pth at all (-I -S)"

    # The package's own key: never the key another package with the same requirements gets.
    shared = environment_key(requirement_material(a))
    assert env.key == environment_key(requirement_material(a), package="pkg-a") != shared
    assert not store.exists(env_key(shared))
    record = read(store, env_key(env.key), EnvironmentRecord)
    assert record.package == "pkg-a"
    other = prepare_environment(b, store, cache_dir=tmp_path / "cache", indexes=[index], log=lambda m: None,
                                allow_source_builds=True, package="pkg-b")
    other.finish(lambda m: None)
    assert other.source == "installed" and other.key != env.key, "package B never gets package A's build"
    again = prepare_environment(a, store, cache_dir=tmp_path / "fresh", indexes=[index], log=lambda m: None,
                                allow_source_builds=True, package="pkg-a")
    assert again.source == "store" and again.key == env.key
    with pytest.raises(RequirementsError, match="evilproj"):  # the wheels-only default still refuses it
        prepare_environment(b, store, cache_dir=tmp_path / "cache", indexes=[index], log=lambda m: None)


def demote_to_nogroup() -> None:
    os.setgroups([])
    os.setgid(NOGROUP)


NOGROUP = 65534


@pytest.mark.skipif(os.getuid() != 0, reason="switching identity needs root (as in CI and in the runtime image's stage)")
@pytest.mark.parametrize("how", ["build_user", "demote"])
def test_a_source_build_runs_as_the_build_user_into_a_folder_copied_out_for_the_agent(
        store: Store, tmp_path: Path, agent_env: dict[str, str], how: str) -> None:
    """The local launcher's run_as_user runs source builds as that user (here: root's uid with the nogroup group,
    since this machine's base interpreter lies under /root, which another uid cannot reach). The environment used
    and packed is a copy made by the agent after uv exited: what the build left running holds only the build folder."""
    spy = tmp_path / "spy"
    index = evil_index(tmp_path / "mirror", spy)
    root = package(tmp_path / "a", "evilproj==1.0\n")
    said: list[str] = []
    env = prepare_environment(root, store, cache_dir=tmp_path / "cache", indexes=[index], log=said.append,
                              allow_source_builds=True, package="pkg-a", build_user=(0, NOGROUP),
                              demote=demote_to_nogroup if how == "demote" else None)
    env.finish(said.append)
    seen = built(env)
    assert (seen["gid"], seen["groups"]) == (NOGROUP, []) and leaks([seen]) == [], seen
    folder = env.python.parent.parent
    assert {p.stat().st_gid for p in [folder, *folder.rglob("*")] if not p.is_symlink()} == {os.getgid()}, \
        "the environment is the agent's, not the build user's"
    assert not list((tmp_path / "cache" / "builds").iterdir()), "the build folder is gone"
    done = subprocess.run([str(env.python), "-c", "import evilproj; print(evilproj.VALUE)"], capture_output=True, text=True,
                          check=True)
    assert done.stdout.strip() == "built"


def test_demote_without_the_user_it_switches_to_is_refused(store: Store, tmp_path: Path) -> None:
    from airflow_aicenter.errors import ConfigurationError

    root = package(tmp_path / "a", "evilproj==1.0\n")
    with pytest.raises(ConfigurationError, match="demote needs build_user"):
        prepare_environment(root, store, cache_dir=tmp_path / "cache", log=lambda m: None, allow_source_builds=True,
                            package="a", demote=demote_to_nogroup)
    with pytest.raises(ConfigurationError, match="allow_source_builds=True needs the package's name"):
        prepare_environment(root, store, cache_dir=tmp_path / "cache", log=lambda m: None, allow_source_builds=True)


# -- finding 4: the cache can be poisoned across packages ---------------------------------------
def test_what_package_code_writes_into_its_new_environment_never_reaches_the_store(store: Store, tmp_path: Path) -> None:
    index = simple_index(tmp_path / "mirror", tiny_wheel(tmp_path / "built"))
    marker = tmp_path / "b-ran-a-code"
    env_a = prepare_environment(package(tmp_path / "a", "aicenter-tiny==0.1\n"), store, cache_dir=tmp_path / "cache-a",
                                indexes=[index], log=lambda m: None)
    assert env_a.source == "installed"
    # Package A's train.py, the moment the environment is handed over (same user, as on the local launcher):
    site = next((env_a.python.parent.parent / "lib").glob("python*/site-packages"))
    (site / "zz_planted.pth").write_text(f"import pathlib; pathlib.Path({str(marker)!r}).write_text('ran')\n")
    (site / "aicenter_tiny" / "__init__.py").write_text("VALUE = 666\n")
    env_a.finish(lambda m: None)

    env_b = prepare_environment(package(tmp_path / "b", "aicenter-tiny==0.1\n"), store, cache_dir=tmp_path / "cache-b",
                                indexes=[index], log=lambda m: None)
    assert env_b.source == "store" and env_b.key == env_a.key
    assert imports_tiny(env_b).startswith("42 "), "package B imports what the install left, not A's edit"
    assert not marker.exists(), "package B ran package A's code"


def test_a_new_environment_is_read_only_to_package_code(store: Store, tmp_path: Path) -> None:
    index = simple_index(tmp_path / "mirror", tiny_wheel(tmp_path / "built"))
    env = prepare_environment(package(tmp_path / "a", "aicenter-tiny==0.1\n"), store, cache_dir=tmp_path / "cache",
                              indexes=[index], log=lambda m: None)
    env.finish(lambda m: None)
    folder = env.python.parent.parent
    writable = [p for p in [folder, *folder.rglob("*")] if not p.is_symlink() and p.stat().st_mode & 0o222]
    assert writable == [], writable[:5]
    restored = prepare_environment(package(tmp_path / "b", "aicenter-tiny==0.1\n"), store, cache_dir=tmp_path / "other",
                                   indexes=[index], log=lambda m: None)
    assert restored.source == "store"
    folder = restored.python.parent.parent
    assert [p for p in [folder, *folder.rglob("*")] if not p.is_symlink() and p.stat().st_mode & 0o222] == []


def plant(store: Store, tmp_path: Path, name: str, **fields: object) -> None:
    """What a run with create-only access to envs/ and blobs/ could write: a record naming its own blob."""
    evil = tmp_path / "evil-env"
    site = evil / "lib" / "python3" / "site-packages"
    site.mkdir(parents=True)
    (site / "zz.pth").write_text(f"import pathlib; pathlib.Path({str(tmp_path / 'planted-ran')!r}).write_text('ran')\n")
    sha256, size = _pack(evil, tmp_path / "evil.tar.zst")
    put_blob(store, tmp_path / "evil.tar.zst", sha256)
    values: dict[str, object] = {"key": name, "blob": {"sha256": sha256, "size": size}, "python": "x", "platform": "x",
                                 "requirements": []}
    values.update(fields)
    write(store, env_key(name), EnvironmentRecord.model_validate(values), create=True)


@pytest.mark.parametrize("lie", ["requirements", "python", "size", "key"])
def test_a_planted_record_that_does_not_match_its_key_is_not_used(store: Store, tmp_path: Path, lie: str) -> None:
    from airflow_aicenter.runtime.environment import platform_tag, python_tag

    index = simple_index(tmp_path / "mirror", tiny_wheel(tmp_path / "built"))
    root = package(tmp_path / "victim", "aicenter-tiny==0.1\n")
    key = environment_key(requirement_material(root))  # predictable from the package's requirements
    honest = {"python": python_tag(), "platform": platform_tag(), "requirements": requirement_material(root)}
    lies: dict[str, dict[str, object]] = {
        "requirements": {"requirements": ["evil==1"]},
        "python": {"python": "cpython-3.99"},
        "key": {"key": "0" * 64},
        "size": {},
    }
    plant(store, tmp_path, key, **{**honest, **lies[lie]})
    if lie == "size":
        record = read(store, env_key(key), EnvironmentRecord)
        write(store, env_key(key), record.model_copy(update={"blob": record.blob.model_copy(update={"size": 1})}))
    said: list[str] = []
    env = prepare_environment(root, store, cache_dir=tmp_path / "cache", indexes=[index], log=said.append)
    env.finish(said.append)
    assert env.source == "installed", said
    assert imports_tiny(env).startswith("42 ")
    assert not (tmp_path / "planted-ran").exists()
    assert any("does not match" in line for line in said), said
    subprocess.run([str(env.python), "-c", "pass"], check=True)


# -- finding 4 through the runtime: package A's train.py, package B's run --------------------------
PLANTING_TRAIN = '''
import os, sysconfig

class Main:
    def __init__(self):
        pass
    def train(self, training_directory):
        # Package A, right after the environment was handed over: a .pth runs in every later process.
        purelib = sysconfig.get_paths()["purelib"]
        code = "import os, pathlib; pathlib.Path(%r).write_text(os.environ.get('B_SECRET', 'none'))\\n" % {spy!r}
        try:
            with open(os.path.join(purelib, "zz_planted.pth"), "w") as f:
                f.write(code)
        except OSError:
            pass
    def save(self):
        pass
'''


def slow_to_compile_wheel(folder: Path) -> Path:
    """``aicenter-tiny`` with a module that takes about a second to byte-compile: the old runtime compiled
    it in the background while package code already ran, so what package code planted was packed."""
    import base64
    import hashlib
    import zipfile

    dist = "aicenter_tiny-0.1.dist-info"
    files = {
        "aicenter_tiny/__init__.py": "VALUE = 42\n",
        "aicenter_tiny/big.py": "\n".join(f"def f{i}(a, b):\n    return [a * {i} + b for _ in range(3)]" for i in range(20000)),
        f"{dist}/METADATA": "Metadata-Version: 2.1\nName: aicenter-tiny\nVersion: 0.1\n",
        f"{dist}/WHEEL": "Wheel-Version: 1.0\nGenerator: tests\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
    }
    record = [f"{path},sha256={base64.urlsafe_b64encode(hashlib.sha256(text.encode()).digest()).rstrip(b'=').decode()},"
              f"{len(text.encode())}" for path, text in files.items()]
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "aicenter_tiny-0.1-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as zf:
        for rel, text in files.items():
            zf.writestr(rel, text)
        zf.writestr(f"{dist}/RECORD", "\n".join([*record, f"{dist}/RECORD,,"]) + "\n")
    return path


def test_package_code_that_plants_a_pth_in_its_environment_never_runs_in_another_packages_run(tmp_path: Path) -> None:
    from airflow_aicenter.records import Outcome, RunSpec
    from airflow_aicenter.registry import Registry
    from airflow_aicenter.storage import open_store
    from tests.conftest import write_files
    from tests.packages import ECHO_MAIN
    from tests.runtime.test_run import run_runtime

    store = open_store((tmp_path / "store").as_uri())
    index = simple_index(tmp_path / "mirror", slow_to_compile_wheel(tmp_path / "built"))
    spy = tmp_path / "b-secret-seen"
    registry = Registry(store)
    specs = {}
    for name, train in (("a", PLANTING_TRAIN.format(spy=str(spy))), ("b", "class Main:\n    def __init__(self):\n        pass\n    def train(self, d):\n        pass\n"
                                                                        "    def save(self):\n        pass\n")):
        root = write_files(tmp_path / name, {"main.py": ECHO_MAIN, "train.py": train,
                                             "requirements.txt": "aicenter-tiny==0.1\n"})
        version = registry.upload(root, f"pkg-{name}")
        specs[name] = RunSpec(pipeline="train", storage=store.uri, run_prefix=f"runs/d/{name}/t/1", package=f"pkg-{name}",
                              version=version.version, blob=version.blob, install_requirements=True,
                              package_indexes=[index], env={"B_SECRET": f"{name}-secret-value"})
    done = run_runtime(specs["a"], tmp_path, {"AICENTER_CACHE": str(tmp_path / "machine-1")})
    assert done.returncode == 0, done.stderr
    outcome = read(store, "runs/d/a/t/1/outcome.json", Outcome)
    assert outcome.environment is not None and outcome.environment["source"] == "installed"

    done = run_runtime(specs["b"], tmp_path, {"AICENTER_CACHE": str(tmp_path / "machine-2")})
    assert done.returncode == 0, done.stderr
    outcome = read(store, "runs/d/b/t/1/outcome.json", Outcome)
    assert outcome.environment is not None and outcome.environment["source"] == "store"
    assert not spy.exists(), f"package B's run ran package A's .pth (it saw {spy.read_text()!r})"


def test_a_packed_environment_changed_before_its_upload_stores_nothing(store: Store, tmp_path: Path) -> None:
    """The upload sends the bytes packed before package code ran: a tarball changed meanwhile is refused."""
    from airflow_aicenter.errors import StorageError
    from airflow_aicenter.runtime.environment import _Packed, _store

    folder = tmp_path / "env"
    (folder / "lib").mkdir(parents=True)
    (folder / "lib" / "a.py").write_text("A = 1\n" * 1000)
    packed = _Packed(tmp_path / "env.tar.zst", *_pack(folder, tmp_path / "env.tar.zst"))
    with packed.path.open("r+b") as f:  # package code of the same user, between the pack and the upload
        f.seek(100)
        f.write(b"tampered")
    key = "f" * 64
    with pytest.raises(StorageError, match=r"the packed environment was not stored: .* changed while it was being stored"):
        _store(store, key, packed, [], None, lambda m: None)
    assert not store.exists(env_key(key))
    assert not [info.key for info in store.list("blobs/")]
    assert not packed.path.exists()


def test_the_runtime_refuses_a_source_build_unless_the_spec_allows_it(tmp_path: Path) -> None:
    from airflow_aicenter.records import Outcome, RunSpec
    from airflow_aicenter.registry import Registry
    from airflow_aicenter.storage import open_store
    from tests.conftest import write_files
    from tests.packages import ECHO_MAIN
    from tests.runtime.test_run import run_runtime

    store = open_store((tmp_path / "store").as_uri())
    spy = tmp_path / "spy"
    index = evil_index(tmp_path / "mirror", spy)
    train = ("import evilproj, os, shutil\nclass Main:\n    def __init__(self):\n        pass\n    def train(self, d):\n"
             "        shutil.copy(os.path.join(os.path.dirname(evilproj.__file__), 'seen.json'), "
             "os.environ['artifacts_directory'])\n    def save(self):\n        pass\n")
    root = write_files(tmp_path / "pkg", {"main.py": ECHO_MAIN, "train.py": train, "requirements.txt": "evilproj==1.0\n"})
    version = Registry(store).upload(root, "builds")
    spec = RunSpec(pipeline="train", storage=store.uri, run_prefix="runs/d/r/t/1", package="builds", version=version.version,
                   blob=version.blob, install_requirements=True, package_indexes=[index])
    env = {"AICENTER_CACHE": str(tmp_path / "cache"), **AGENT_ENV}

    done = run_runtime(spec, tmp_path, env)
    outcome = read(store, f"{spec.run_prefix}/outcome.json", Outcome)
    assert done.returncode == 1 and outcome.status == "failed" and outcome.phase == "requirements"
    assert outcome.error is not None and "evilproj is published only as a source distribution" in outcome.error
    assert "allow_source_builds=True" in outcome.error and spied(spy, "build.jsonl") == []

    spec = spec.model_copy(update={"run_prefix": "runs/d/r/t/2", "allow_source_builds": True})
    done = run_runtime(spec, tmp_path, env)
    assert done.returncode == 0, done.stderr
    outcome = read(store, f"{spec.run_prefix}/outcome.json", Outcome)
    assert outcome.status == "succeeded" and outcome.environment is not None
    assert outcome.environment["key"] == environment_key(requirement_material(root), package="builds")
    seen = json.loads(store.get_bytes(f"{spec.run_prefix}/artifacts/seen.json"))
    assert seen["what"] == "build" and leaks([seen]) == []


def test_the_operator_passes_allow_source_builds_into_the_run_spec(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from airflow_aicenter.errors import ConfigurationError
    from airflow_aicenter.operators import TrainPipelineOperator
    from airflow_aicenter.records import RunRef
    from airflow_aicenter.registry import Registry
    from airflow_aicenter.storage import open_store
    from tests.operators.conftest import file_connection_env

    uri = (tmp_path / "store").as_uri()
    for name, value in file_connection_env(uri).items():
        monkeypatch.setenv(name, value)
    from tests.conftest import write_files
    from tests.packages import ECHO_MAIN

    root = write_files(tmp_path / "pkg", {"main.py": ECHO_MAIN, "requirements.txt": "evilproj==1.0\n"})
    parent = Registry(open_store(uri)).upload(root, "builds")
    run = RunRef(dag_id="d", run_id="r", task_id="t")
    default = TrainPipelineOperator(task_id="t", package="builds")
    allowed = TrainPipelineOperator(task_id="t2", package="builds", allow_source_builds=True)
    assert default.build_spec(parent, run).allow_source_builds is False
    assert allowed.build_spec(parent, run).allow_source_builds is True
    with pytest.raises(ConfigurationError, match="allow_source_builds='yes' is not valid; give True or False"):
        TrainPipelineOperator(task_id="t3", package="builds", allow_source_builds="yes")  # type: ignore[arg-type]


@pytest.mark.skipif(os.getuid() != 0, reason="switching identity needs root (as in CI and in the runtime image's stage)")
def test_a_source_build_as_another_uid_runs_as_that_uid_or_says_what_it_cannot_reach(store: Store, agent_env: dict[str, str]) -> None:
    """``build_user`` with a real other uid (nobody). Where that uid can run the base interpreter, the build runs
    as it; where it cannot (this machine's interpreter lies under /root, mode 0700), the error says which uid and
    what it must reach."""
    import shutil
    import tempfile

    from airflow_aicenter.runtime.environment import base_python

    nobody = (65534, 65534)
    top = Path(tempfile.mkdtemp(prefix="aicenter-build-user-"))
    try:
        top.chmod(0o755)
        spy = top / "spy"
        index = evil_index(top / "mirror", spy)
        spy.chmod(0o777)
        root = package(top / "pkg", "evilproj==1.0\n")
        try:
            reachable = subprocess.run([str(base_python()), "-c", "pass"], user=nobody[0], group=nobody[1],
                                       extra_groups=[], capture_output=True, check=False).returncode == 0
        except PermissionError:
            reachable = False
        try:
            env = prepare_environment(root, store, cache_dir=top / "cache", indexes=[index], log=lambda m: None,
                                      allow_source_builds=True, package="pkg-a", build_user=nobody)
        except RequirementsError as exc:
            assert not reachable, f"the build failed although uid 65534 can run the interpreter: {exc}"
            assert "as uid 65534 (run_as_user, for the source build)" in str(exc), exc
            assert str(base_python()) in str(exc) and "AICENTER_CACHE" in str(exc)
            assert spied(spy, "build.jsonl") == []
        else:
            env.finish(lambda m: None)
            seen = built(env)
            assert seen["uid"] == 65534 and leaks([seen]) == []
            folder = env.python.parent.parent
            assert {p.lstat().st_uid for p in [folder, *folder.rglob("*")]} == {os.getuid()}
        assert not list((top / "cache" / "builds").iterdir()), "the build folder is gone"
    finally:
        subprocess.run(["chmod", "-R", "u+w", str(top)], check=False)
        shutil.rmtree(top)
