"""One pipeline run: stage, call the package, upload, report. The same for every launcher.

Runs inside a Kubernetes pod or as a child process of the Airflow worker. The operator gives
it a :class:`RunSpec`; it answers with ``outcome.json`` in the run folder (and its exit code).
It never registers versions: the operator does that once it has read the outcome, so a run
that dies at any point leaves no version behind.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from airflow_aicenter.crashpoints import crash_point
from airflow_aicenter.errors import AICenterError, DatasetError, NotFoundError, RunError
from airflow_aicenter.package import extract_zip, iter_package_files, validate_package, write_zip
from airflow_aicenter.records import BlobRef, Outcome, RunSpec, redact, secret_values, write
from airflow_aicenter.runtime.requirements import install_requirements
from airflow_aicenter.runtime.snapshot import take_snapshot
from airflow_aicenter.runtime.usercode import PackageCode, UserCodeError, check_score
from airflow_aicenter.storage import Store, open_store
from airflow_aicenter.storage.transfer import (
    FileEntry,
    download_tree,
    get_blob,
    local_files,
    put_blob,
    run,
    sha256_file,
    upload_tree,
)

#: The folders package code sees, by their AI Center environment variable names.
DIRECTORIES = (
    "data_directory",
    "test_data_directory",
    "training_data_directory",
    "evaluation_data_directory",
    "artifacts_directory",
)
TERMINATION_LOG = "/dev/termination-log"


class Killed(BaseException):
    """SIGTERM arrived (on_kill, pod deletion): stop and record the run as killed."""


def log(message: str) -> None:
    print(f"[aicenter] {message}", file=sys.stderr, flush=True)


def human(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GB"


class Runner:
    def __init__(self, spec: RunSpec, store: Store, workdir: Path) -> None:
        self.spec, self.store = spec, store
        self.work = workdir.resolve()
        self.dirs = {name: self.work / name.removesuffix("_directory") for name in DIRECTORIES}
        self.outcome = Outcome.starting(spec)
        self.entries: dict[str, list[FileEntry]] = {}
        #: Values of secret-looking variables (the user's secret env, S3 keys): never in outcome.json.
        self.secrets = secret_values(os.environ)

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        self.outcome.phase = name
        write(self.store, self.key("outcome.json"), self.outcome)  # live progress; says where a hard crash hit
        crash_point(name)
        log(f"{name} ...")
        began = time.perf_counter()
        yield
        self.outcome.phases[name] = round(time.perf_counter() - began, 3)
        log(f"{name} done in {self.outcome.phases[name]:.2f} s")

    def key(self, name: str) -> str:
        return f"{self.spec.run_prefix}/{name}"

    # -- the run -------------------------------------------------------------------------
    def run(self) -> Outcome:
        write(self.store, self.key("outcome.json"), self.outcome)
        try:
            self._run()
            self.outcome.status, self.outcome.phase = "succeeded", None
        except Killed:
            self.outcome.status, self.outcome.error = "killed", f"killed during {self.outcome.phase}"
        except UserCodeError as exc:
            print(redact(exc.details, self.secrets), file=sys.stderr, flush=True)
            self._fail(str(exc))
        except AICenterError as exc:
            self._fail(str(exc))
        except Exception as exc:  # noqa: BLE001 - report, never hide
            import traceback

            print(redact(traceback.format_exc(), self.secrets), file=sys.stderr, flush=True)
            self._fail(f"internal error during {self.outcome.phase}: {type(exc).__name__}: {exc}")
        finally:
            self.outcome.end_at = time.time()
            if self.outcome.status != "succeeded":
                self._upload_artifacts_best_effort()
            crash_point("outcome")
            write(self.store, self.key("outcome.json"), self.outcome)
            log(f"run {self.outcome.status} in {self.outcome.execution_time:.2f} s")
        return self.outcome

    def _fail(self, cause: str) -> None:
        cause = redact(cause, self.secrets)
        self.outcome.status, self.outcome.error = "failed", cause
        log(f"FAILED: {cause}")

    def _run(self) -> None:
        spec = self.spec
        for path in self.dirs.values():
            path.mkdir(parents=True, exist_ok=True)
        with self.phase("stage_package"):
            root = self._stage_package()
        if spec.install_requirements:
            with self.phase("requirements"):
                install_requirements(root, log)
        with self.phase("stage_data"):
            self._stage_data()
        self._set_env()
        with self.phase("user_code"):
            self._call_package(root)
        if spec.pipeline in ("train", "full"):
            with self.phase("package_upload"):
                self.outcome.blob = self._store_package(root)
        with self.phase("artifacts_upload"):
            self._upload_artifacts()
        with self.phase("snapshot"):
            if spec.save_training_data and spec.pipeline != "evaluate":
                self._snapshot("data_directory", spec.dataset)
            if spec.save_test_data and (spec.pipeline == "evaluate" or spec.evaluation_dataset):
                self._snapshot("test_data_directory", spec.evaluation_dataset)

    # -- phases --------------------------------------------------------------------------
    def _stage_package(self) -> Path:
        spec = self.spec
        zip_path = self.work / "package.zip"
        get_blob(self.store, spec.blob.sha256, zip_path)
        root = extract_zip(zip_path, self.work / "package")
        zip_path.unlink()
        validate_package(root, spec.pipeline)
        return root

    def _stage_data(self) -> None:
        spec = self.spec
        data, test = self.dirs["data_directory"], self.dirs["test_data_directory"]
        if spec.dataset_mount:
            mount = Path(spec.dataset_mount)
            if not mount.is_dir() or not any(mount.iterdir()):
                raise DatasetError(f"mounted dataset {mount} is empty or missing; check the volume claim and sub path")
            data.rmdir()
            self.dirs["data_directory"] = mount
            log(f"dataset mounted read-only at {mount}")
        if spec.dataset and not spec.dataset_mount:
            self.entries["data_directory"] = self._download(spec.dataset, data)
        if spec.evaluation_dataset:
            self.entries["test_data_directory"] = self._download(spec.evaluation_dataset, test)
            if spec.pipeline == "full":
                shutil.copytree(test, self.dirs["evaluation_data_directory"], dirs_exist_ok=True)

    def _download(self, uri: str, dest: Path) -> list[FileEntry]:
        began = time.perf_counter()
        try:
            source = open_store(uri, create=False)
        except NotFoundError:
            raise DatasetError(f"dataset {uri} does not exist; upload the data there or fix the URI") from None
        entries = run(download_tree(source, dest))
        took = time.perf_counter() - began
        size = sum(e.size for e in entries)
        log(f"staged {len(entries)} files ({human(size)}) from {uri} in {took:.2f} s")
        return entries

    def _set_env(self) -> None:
        env = {name: str(path) for name, path in self.dirs.items()}
        env["save_training_data"] = str(self.spec.save_training_data)
        env["save_test_data"] = str(self.spec.save_test_data)
        os.environ.update(self.spec.env)
        os.environ.update(env)

    def _call_package(self, root: Path) -> None:
        spec, dirs = self.spec, self.dirs
        code = PackageCode(root)
        if spec.pipeline == "train":
            code.call("train", str(dirs["data_directory"]))
            code.call("save")
        elif spec.pipeline == "evaluate":
            self.outcome.score = check_score(code.call("evaluate", str(dirs["test_data_directory"])))
            log(f"score: {self.outcome.score}")
        else:
            code.call("process_data", str(dirs["data_directory"]))
            if not local_files(dirs["training_data_directory"]):
                raise RunError(
                    "Main.process_data() wrote nothing to training_data_directory "
                    f"({dirs['training_data_directory']}); write the training split there "
                    "(os.environ['training_data_directory'])"
                )
            code.call("train", str(dirs["training_data_directory"]))
            if local_files(dirs["evaluation_data_directory"]):
                self.outcome.score = check_score(code.call("evaluate", str(dirs["evaluation_data_directory"])))
                log(f"score: {self.outcome.score}")
            else:
                warning = (
                    "evaluation_data_directory is empty, so Main.evaluate() was not called and the score is null; "
                    "write the evaluation split there in process_data() or pass evaluation_dataset"
                )
                self.outcome.warnings.append(warning)
                log(f"WARNING: {warning}")
            code.call("save")
        os.chdir(self.work)

    def _store_package(self, root: Path) -> BlobRef:
        with tempfile.TemporaryDirectory(dir=self.work) as tmp:
            zip_path = Path(tmp) / "package.zip"
            digest = write_zip(root, zip_path)
            wrote = put_blob(self.store, zip_path, digest.sha256)
        files = sum(1 for _ in iter_package_files(root))
        log(f"new package content: {files} files, {human(digest.size)} zipped, sha256:{digest.sha256[:12]}"
            f"{'' if wrote else ' (already stored)'}")
        return BlobRef(sha256=digest.sha256, size=digest.size)

    def _upload_artifacts(self) -> None:
        entries = run(upload_tree(self.dirs["artifacts_directory"], self.store, self.key("artifacts")))
        self.outcome.artifacts = len(entries)
        self.outcome.artifacts_bytes = sum(e.size for e in entries)
        log(f"uploaded {len(entries)} artifacts ({human(self.outcome.artifacts_bytes)})")

    def _upload_artifacts_best_effort(self) -> None:
        try:
            if local_files(self.dirs["artifacts_directory"]):
                self._upload_artifacts()
        except Exception as exc:  # noqa: BLE001 - the failure being reported matters more
            log(f"could not upload artifacts of the failed run: {exc}")

    def _snapshot(self, name: str, source: str | None) -> None:
        folder = self.dirs[name]
        entries = self.entries.get(name)
        if entries is None:  # a mounted dataset: hash it in place
            entries = [FileEntry(rel, *_digest(folder / rel)) for rel in local_files(folder)]
        key = self.key(f"{name}.manifest.json")
        stats = take_snapshot(self.store, folder, entries, source=source, directory=name, key=key, log=log)
        self.outcome.snapshots[name] = self.store.url(key)
        log(f"snapshot of {name}: {stats.files} files ({human(stats.bytes)}), "
            f"{stats.uploaded_files} new blobs ({human(stats.uploaded_bytes)}) written")


def _digest(path: Path) -> tuple[str, int]:
    entry = sha256_file(path)
    return entry.sha256, entry.size


def _on_sigterm(signum: int, frame: object) -> None:
    raise Killed


def write_termination_message(message: str) -> None:
    """Kubernetes shows this file's content as the container's termination reason."""
    path = Path(os.environ.get("AICENTER_TERMINATION_LOG", TERMINATION_LOG))
    with contextlib.suppress(OSError):
        if path.parent.is_dir() and (path.exists() or os.access(path.parent, os.W_OK)):
            path.write_text(message[:4000])


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    raw = os.environ.get("AICENTER_RUN_SPEC")
    if args:
        raw = Path(args[0]).read_text()
    if not raw:
        print("usage: python -m airflow_aicenter.runtime SPEC.json (or set AICENTER_RUN_SPEC)", file=sys.stderr)
        return 2
    spec = RunSpec.model_validate_json(raw)
    signal.signal(signal.SIGTERM, _on_sigterm)
    workdir = Path(os.environ.get("AICENTER_WORKDIR") or tempfile.mkdtemp(prefix="aicenter-run-"))
    workdir.mkdir(parents=True, exist_ok=True)
    try:
        outcome = Runner(spec, open_store(spec.storage), workdir).run()
    finally:
        if not os.environ.get("AICENTER_KEEP_WORKDIR"):
            shutil.rmtree(workdir, ignore_errors=True)
    if outcome.status != "succeeded":
        write_termination_message(outcome.error or outcome.status)
        return 1
    write_termination_message(f"succeeded in {outcome.execution_time:.1f} s")
    return 0
