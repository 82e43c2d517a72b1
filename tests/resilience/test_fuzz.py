"""Fuzzing the package intake: malformed packages into validate_package, extract_zip and registry.upload.

Whatever the input, the outcome is either success or one of the project's own errors
(AICenterError subclasses) with a message; never another exception, never a hang (each
example has a deadline), and never a file written outside the target folder.
"""

from __future__ import annotations

import io
import os
import shutil
import tempfile
import zipfile
from datetime import timedelta
from pathlib import Path

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from airflow_aicenter.errors import AICenterError
from airflow_aicenter.package import extract_zip, validate_package, write_zip
from airflow_aicenter.registry import Registry
from airflow_aicenter.storage import open_store
from tests.packages import ECHO_MAIN

pytestmark = pytest.mark.filterwarnings("ignore:Duplicate name:UserWarning")

CI = bool(os.environ.get("CI"))
FUZZ = settings(
    max_examples=int(os.environ.get("AICENTER_FUZZ_EXAMPLES", "120")),  # more by hand: AICENTER_FUZZ_EXAMPLES=2000
    deadline=timedelta(seconds=30),  # a hang guard, not a speed assertion
    derandomize=CI,  # CI replays the same examples; by hand each run explores new ones
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture, HealthCheck.data_too_large],
    database=None,
)

MAIN = ECHO_MAIN
TRAIN = ("class Main:\n    def __init__(self):\n        pass\n    def train(self, training_directory):\n        pass\n"
         "    def save(self):\n        pass\n")


class Sandbox:
    """A fresh folder per example; afterwards everything in it must be under the allowed paths."""

    def __init__(self) -> None:
        self.root = Path(tempfile.mkdtemp(prefix="aicenter-fuzz-"))
        self.outside = Path(tempfile.mkdtemp(prefix="aicenter-fuzz-outside-"))  # a sibling a '../' could hit

    def __enter__(self) -> Sandbox:
        return self

    def __exit__(self, *exc: object) -> None:
        shutil.rmtree(self.root, ignore_errors=True)
        shutil.rmtree(self.outside, ignore_errors=True)

    def files(self) -> set[str]:
        out = set()
        for dirpath, dirnames, filenames in os.walk(self.root):
            for name in filenames + [d for d in dirnames if os.path.islink(os.path.join(dirpath, d))]:
                out.add(os.path.relpath(os.path.join(dirpath, name), self.root))
        return out

    def assert_contained(self, before: set[str], allowed: tuple[str, ...]) -> None:
        new = self.files() - before
        stray = sorted(p for p in new if not p.startswith(allowed))
        assert not stray, f"files written outside {allowed}: {stray[:5]}"
        assert not any(Path(self.outside).iterdir()), "a file escaped the sandbox"
        assert not list(self.root.glob("**/.*partial*")), "a failed extraction left its staging folder"


def expect_own_error(fn, *args, **kwargs) -> object:
    """Run ``fn``; only success or an AICenterError with a message is acceptable."""
    try:
        return fn(*args, **kwargs)
    except AICenterError as exc:
        assert str(exc).strip(), f"{type(exc).__name__} without a message"
        return exc
    # anything else propagates and fails the test, with its traceback


# -- strategies ------------------------------------------------------------------------------
name_part = st.one_of(
    st.text(min_size=1, max_size=12),
    st.sampled_from(["..", ".", "", "a", "main.py", "train.py", "requirements.txt", "__MACOSX", "C:", "\\..\\x",
                     "con", "\x00", "é", "名前", "a" * 300, " ", "..."]),
)
entry_name = st.one_of(
    st.lists(name_part, min_size=1, max_size=6).map("/".join),
    st.lists(name_part, min_size=1, max_size=3).map(lambda p: "/" + "/".join(p)),
    st.integers(min_value=20, max_value=400).map(lambda depth: "/".join(["d"] * depth) + "/main.py"),  # deep folders
)
source = st.one_of(
    st.binary(max_size=300),  # non-UTF-8, NUL bytes, anything
    st.text(max_size=300),
    st.sampled_from([
        MAIN, TRAIN, "Main = 5\n", "def Main():\n    pass\n", "Main = lambda: 0\n", "import Main\n",
        "from x import Main\n", "if True:\n    class Main:\n        pass\n", "class Main(Base):\n    pass\n",
        "class Main:\n    def __init__(self, a, b):\n        pass\n    def predict(self):\n        pass\n",
        "class Main:\n    def train(self, a, b, c):\n        pass\n    def save(self, x):\n        pass\n",
        "class Main:\n    @property\n    def train(self):\n        pass\n    save = 3\n",
        "class Main:\n    async def train(*args):\n        pass\n", "class Main(Main):\n    pass\n",
        "class A(B):\n    pass\nclass B(A):\n    pass\nclass Main(A):\n    pass\n",
        "# -*- coding: latin-1 -*-\nclass Main: pass\n", "# -*- coding: nope -*-\n", "\ufeffclass Main: pass\n",
        "class Main:\n" + "    def f(self): pass\n" * 50, "(" * 500 + ")" * 500, "x = '''\n",
    ]),
)
metadata = st.one_of(st.none(), st.binary(max_size=80), st.sampled_from([
    '{"gpu": true}', '{"gpu": -1}', '{"retrainable": "no"}', "[]", "null", '{"description": 5}', "{", '{"input_type": "x"}']))


def build_zip(entries: list[tuple[str, bytes]], *, compress: int = zipfile.ZIP_DEFLATED) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=compress) as zf:
        for name, data in entries:
            info = zipfile.ZipInfo(name)
            zf.writestr(info, data)
    return buf.getvalue()


def package_zip(main: bytes | str, train: bytes | str | None, meta: bytes | str | None, extra: list[tuple[str, bytes]]) -> bytes:
    enc = lambda v: v if isinstance(v, bytes) else v.encode("utf-8", "surrogatepass")  # noqa: E731
    entries = [("main.py", enc(main)), ("requirements.txt", b"")]
    if train is not None:
        entries.append(("train.py", enc(train)))
    if meta is not None:
        entries.append(("aicenter.json", enc(meta)))
    return build_zip(entries + extra)


# -- the tests -------------------------------------------------------------------------------
@FUZZ
@given(data=st.binary(max_size=4000))
def test_random_bytes_as_a_package_zip(data):
    with Sandbox() as box:
        path = box.root / "pkg.zip"
        path.write_bytes(data)
        before = box.files()
        expect_own_error(extract_zip, path, box.root / "out")
        expect_own_error(Registry(open_store((box.root / "store").as_uri())).upload, path, "fuzz")
        box.assert_contained(before, ("out", "store"))


@FUZZ
@given(main=source, train=st.one_of(st.none(), source), meta=metadata, cut=st.floats(0, 1), flip=st.lists(st.integers(0, 10**6), max_size=4))
def test_truncated_and_corrupted_zips(main, train, meta, cut, flip):
    data = bytearray(package_zip(main, train, meta, []))
    for i in flip:
        data[i % len(data)] ^= 0x5A
    data = bytes(data[: max(1, int(len(data) * cut))]) if cut < 0.999 else bytes(data)
    with Sandbox() as box:
        path = box.root / "pkg.zip"
        path.write_bytes(data)
        before = box.files()
        result = expect_own_error(extract_zip, path, box.root / "out")
        if isinstance(result, Path):
            for pipeline in ("serve", "train", "evaluate", "full"):
                expect_own_error(validate_package, result, pipeline)
        expect_own_error(Registry(open_store((box.root / "store").as_uri())).upload, path, "fuzz")
        box.assert_contained(before, ("out", "store"))


@FUZZ
@given(names=st.lists(entry_name, min_size=1, max_size=8), payload=st.binary(max_size=64))
def test_odd_names_and_deep_folders(names, payload):
    entries = [("main.py", MAIN.encode()), ("requirements.txt", b"")] + [(n, payload) for n in names]
    try:
        data = build_zip(entries)
    except (ValueError, UnicodeEncodeError, OSError):
        assume(False)  # the zipfile module itself refuses to write such a name
    with Sandbox() as box:
        path = box.root / "pkg.zip"
        path.write_bytes(data)
        before = box.files()
        result = expect_own_error(extract_zip, path, box.root / "out")
        if isinstance(result, Path):
            expect_own_error(validate_package, result, "serve")
        expect_own_error(Registry(open_store((box.root / "store").as_uri())).upload, path, "fuzz")
        box.assert_contained(before, ("out", "store"))


@FUZZ
@given(main=source, train=st.one_of(st.none(), source), meta=metadata,
       pipeline=st.sampled_from(["serve", "train", "evaluate", "full"]))
def test_malformed_sources_in_a_package_folder(main, train, meta, pipeline):
    """Folder packages: non-UTF-8 sources, Main that is not a class, wrong arity, broken metadata."""
    with Sandbox() as box:
        pkg = box.root / "pkg"
        pkg.mkdir()
        (pkg / "main.py").write_bytes(main if isinstance(main, bytes) else main.encode("utf-8", "surrogatepass"))
        (pkg / "requirements.txt").write_text("")
        if train is not None:
            (pkg / "train.py").write_bytes(train if isinstance(train, bytes) else train.encode("utf-8", "surrogatepass"))
        if meta is not None:
            (pkg / "aicenter.json").write_bytes(meta if isinstance(meta, bytes) else meta.encode())
        before = box.files()
        expect_own_error(validate_package, pkg, pipeline)
        result = expect_own_error(Registry(open_store((box.root / "store").as_uri())).upload, pkg, "fuzz")
        if not isinstance(result, AICenterError):  # accepted: it must round-trip through the store
            assert result.version == "1.0"
        box.assert_contained(before, ("store",))


def test_huge_entry_count_is_refused_before_writing(tmp_path):
    entries = [("main.py", MAIN.encode()), ("requirements.txt", b"")] + [(f"f/{i}", b"") for i in range(20_001)]
    path = tmp_path / "many.zip"
    path.write_bytes(build_zip(entries, compress=zipfile.ZIP_STORED))
    error = expect_own_error(extract_zip, path, tmp_path / "out")
    assert isinstance(error, AICenterError) and "20003 entries" in str(error)
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.partial-*"))
    error = expect_own_error(Registry(open_store((tmp_path / "store").as_uri())).upload, path, "fuzz")
    assert isinstance(error, AICenterError)


def test_valid_package_round_trips(tmp_path):
    """The control: a well-formed package is accepted by the same paths (so the fuzz tests can fail)."""
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    (pkg / "main.py").write_text(MAIN)
    (pkg / "train.py").write_text(TRAIN)
    (pkg / "requirements.txt").write_text("")
    write_zip(pkg, tmp_path / "pkg.zip")
    root = extract_zip(tmp_path / "pkg.zip", tmp_path / "out")
    validate_package(root, "train")
    assert Registry(open_store((tmp_path / "store").as_uri())).upload(tmp_path / "pkg.zip", "ok").version == "1.0"
